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


def last_states(model, ids: torch.Tensor, split: int, together: bool, tree: bool = False) -> torch.Tensor:
    """The last block's output for ids[split:] after a cached prefill of ids[:split]: in one
    verification forward (a chain, or the same chain as a tree mask) or one token at a time."""
    n = ids.shape[1]
    with torch.inference_mode():
        cache = model.new_cache(1, n + 4)
        model(ids[:, :split], kv_cache=cache)
        if together:
            mask = None
            if tree:  # the chain written as a tree: what D²SD's verification passes
                mask = torch.ones(n - split, n, dtype=torch.bool).tril(split)[None, None]
            return model(ids[:, split:], kv_cache=cache, attn_mask_override=mask, hidden_layers=[-1]).hidden_states[0][0]
        return torch.cat([model(ids[:, j:j + 1], kv_cache=cache, hidden_layers=[-1]).hidden_states[0][0]
                          for j in range(split, n)])


@pytest.mark.parametrize("tree", [False, True])
def test_int8_verification_gives_each_token_the_bits_of_one_at_a_time(tree):
    """What lossless speculation on an int8 target needs: Q tokens verified in one cached forward
    leave the blocks with exactly the states of Q one-token forwards (int8 sums are exact and each
    query attends on its own). A 1e-6 difference in fp32 attention would otherwise flip int8
    roundings and grow through the layers: on SmolLM2 to 14.6 at the last block."""
    q8, _ = resolve_model(None, None, "cpu", None, method="ar", quantize="int8")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    one = last_states(q8, ids, 5, together=False)
    assert torch.equal(last_states(q8, ids, 5, together=True, tree=tree), one)


def test_int8_tree_node_gets_the_bits_of_its_own_branch_decoded_alone():
    """A tree node reads its ancestors' keys, not the sibling beside it in the cache."""
    q8, _ = resolve_model(None, None, "cpu", None, method="ar", quantize="int8")
    prefix, a, b, c = [3, 4, 5, 6, 7], 8, 9, 10  # b and c are both children of a
    with torch.inference_mode():
        cache = q8.new_cache(1, 12)
        q8(torch.tensor([prefix]), kv_cache=cache)
        mask = torch.ones(3, 8, dtype=torch.bool)
        mask[0, 6:] = False  # a: the prefix and itself
        mask[1, 7] = False  # b: prefix, a, b
        mask[2, 6] = False  # c: prefix, a, c
        tree = q8(torch.tensor([[a, b, c]]), kv_cache=cache, positions=torch.tensor([5, 6, 6]),
                  attn_mask_override=mask[None, None], hidden_layers=[-1]).hidden_states[0][0]
    branch = last_states(q8, torch.tensor([prefix + [a, c]]), 5, together=False)
    assert torch.equal(tree[2], branch[1]) and torch.equal(tree[0], branch[0])


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
