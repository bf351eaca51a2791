"""`--quantize int8`: the blocks' matmuls in int8 on the CPU; speculation stays lossless against the
same int8 weights; the FLOP estimate keeps the model's size."""
from __future__ import annotations

import pytest
import torch

from diffspec.api import generate, resolve_model
from diffspec.models.quantized import Int8Linear, quantize_blocks
from diffspec.tasks import load_examples

PROMPTS = [e.prompt for e in load_examples("arith", limit=3)]


def test_int8_blocks_change_the_model_but_not_its_cost_estimate():
    fp, _ = resolve_model(None, None, "cpu", None, method="ar")
    q8, _ = resolve_model(None, None, "cpu", None, method="ar", quantize="int8")
    assert q8.num_params() == fp.num_params() and q8.forward_flops(4, 9) == fp.forward_flops(4, 9)
    blocks = q8.parts().blocks
    assert any(isinstance(m, Int8Linear) for m in blocks.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in blocks.modules())
    assert all(m.qweight.dtype == torch.int8 for m in blocks.modules() if isinstance(m, Int8Linear))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        a, b = fp(ids).logits, q8(ids).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.5)  # int8 rounding, not another model
    with pytest.raises(ValueError, match="already quantized"):
        quantize_blocks(q8)
    with pytest.raises(ValueError, match="unknown --quantize scheme"):
        resolve_model(None, None, "cpu", None, method="ar", quantize="int4")


def test_a_tokens_int8_output_does_not_depend_on_the_tokens_beside_it():
    """Per-token activation scales and exact int32 sums: the property verification needs. A
    per-call scale (torch's dynamic quantization) moves a token's output when a large one joins it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q8 = Int8Linear(lin)
    x = torch.randn(7, 64)
    x[3] *= 50  # an outlier token
    together = q8(x)
    alone = torch.cat([q8(x[i:i + 1]) for i in range(7)])
    assert torch.equal(together, alone)
    assert (together - lin(x)).abs().max() < 0.05 * lin(x).abs().max()  # close to the fp32 layer
    assert q8(x.reshape(7, 1, 64)).shape == (7, 1, 96) and q8(x[:0]).shape == (0, 96)


def test_int8_verification_forward_gives_each_token_the_logits_of_one_at_a_time():
    """What AR-spec's verification relies on, on the bundled target: Q tokens in one cached forward
    score like Q cached one-token forwards (the fp32 model's own difference is the yardstick)."""
    def gap(model) -> float:
        ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
        with torch.inference_mode():
            cache = model.new_cache(1, 16)
            model(ids[:, :4], kv_cache=cache)
            together = model(ids[:, 4:], kv_cache=cache).logits[0]
            cache = model.new_cache(1, 16)
            model(ids[:, :4], kv_cache=cache)
            alone = torch.cat([model(ids[:, i:i + 1], kv_cache=cache).logits[0] for i in range(4, 10)])
        return (together - alone).abs().max().item()

    fp, _ = resolve_model(None, None, "cpu", None, method="ar")
    q8, _ = resolve_model(None, None, "cpu", None, method="ar", quantize="int8")
    assert gap(q8) <= 10 * gap(fp) + 1e-5


@pytest.mark.parametrize("method", ["ar-spec", "dflash", "d2sd"])
def test_speculation_is_lossless_against_the_same_int8_weights(method):
    ar = generate(PROMPTS, method="ar", quantize="int8", gen_length=32)
    spec = generate(PROMPTS, method=method, quantize="int8", gen_length=32)
    assert spec.raw_ids == ar.raw_ids


def test_masked_diffusion_models_quantize_too():
    res = generate(PROMPTS[:1], method="fast-dllm", quantize="int8")
    assert res.texts[0].strip()


def test_cli_quantize_flag(capsys):
    from diffspec.cli import main

    raw = ["generate", "--method", "ar", "--template", "raw", "--gen-length", "48", "--prompt", PROMPTS[0]]
    assert main(raw + ["--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(generate(PROMPTS[:1], method="ar", quantize="int8", gen_length=48).texts[0] + "\n")
    assert main(["generate", "--method", "ar", "--quantize", "int4", "--prompt", "x"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["eval", "--method", "ar", "--quantize", "int8", "--limit", "2"]) == 0
