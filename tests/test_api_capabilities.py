"""One answer to "is it AR / where is the mask / which ids end an answer": `decoding.capabilities`."""
from __future__ import annotations

import pytest

from diffspec.api import load_any, resolve_model
from diffspec.decoding.capabilities import capabilities
from diffspec.decoding.meter import CostMeter, MeteredModel
from diffspec.speculative.armethods import DEFAULT_TARGET, ASSETS, ar_method_generate, build_ar_config


@pytest.fixture(scope="module")
def models():
    return {name: load_any(ASSETS / name) for name in ("llada-arith", "dream-arith", "qwen3-arith")}


def test_each_family_answers_every_question(models):
    llada = capabilities(models["llada-arith"][0])
    assert (llada.family, llada.logits_shifted, llada.mask_id, llada.eos_ids, llada.max_positions) == \
        ("diffusion", False, 1, (0,), 512)
    dream = capabilities(models["dream-arith"][0])  # a shifted network, but a masked model
    assert (dream.family, dream.is_ar, dream.logits_shifted, dream.mask_id) == ("diffusion", False, True, 1)
    qwen = capabilities(models["qwen3-arith"][0])
    assert (qwen.family, qwen.is_ar, qwen.logits_shifted, qwen.mask_id, qwen.max_positions) == \
        ("ar", True, True, None, 512)
    assert not any(c.block_causal for c in (llada, dream, qwen))


def test_a_metered_model_has_its_network_s_capabilities(models):
    model = models["dream-arith"][0]
    wrapped = MeteredModel(MeteredModel(model, CostMeter(), "a"), CostMeter(), "b")
    assert capabilities(wrapped) == capabilities(model)


def test_the_api_and_the_ar_methods_ask_the_seam(models):
    dream, tok = models["dream-arith"]
    with pytest.raises(ValueError, match="needs an autoregressive"):  # shifted logits do not make it AR
        resolve_model(dream, tok, method="ar")
    with pytest.raises(ValueError, match="needs an autoregressive"):
        ar_method_generate(dream, tok, ["x"], build_ar_config("ar", gen_length=4))
    qwen, qtok = models["qwen3-arith"]
    assert resolve_model(qwen, qtok, method="ar")[0] is qwen
    assert DEFAULT_TARGET == ASSETS / "qwen3-arith"
