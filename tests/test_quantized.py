"""`--quantize int8`: the blocks' matmuls in int8 on the CPU; speculation stays lossless against the
same int8 weights; the FLOP estimate keeps the model's size."""
from __future__ import annotations

import pytest
import torch

from diffspec.api import generate, resolve_model
from diffspec.models.quantized import quantize_blocks
from diffspec.tasks import load_examples

PROMPTS = [e.prompt for e in load_examples("arith", limit=3)]


def test_int8_blocks_change_the_model_but_not_its_cost_estimate():
    fp, _ = resolve_model(None, None, "cpu", None, method="ar")
    q8, _ = resolve_model(None, None, "cpu", None, method="ar", quantize="int8")
    assert q8.num_params() == fp.num_params() and q8.forward_flops(4, 9) == fp.forward_flops(4, 9)
    blocks = q8.parts().blocks
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in blocks.modules())
    assert not any(type(m) is torch.nn.Linear for m in blocks.modules())
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        a, b = fp(ids).logits, q8(ids).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.5)  # int8 rounding, not another model
    with pytest.raises(ValueError, match="already quantized"):
        quantize_blocks(q8)
    with pytest.raises(ValueError, match="unknown --quantize scheme"):
        resolve_model(None, None, "cpu", None, method="ar", quantize="int4")


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
