"""Qwen3 causal LM: parity with transformers, KV-cache decoding, masks, checkpoint IO and errors.

(Llama and Qwen2 layouts of the same class: tests/test_llama_targets.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffspec.models.causal import CausalKVCache, Qwen3Config, Qwen3Model, load_causal, save_causal
from diffspec.models.checkpoint import CheckpointError

# Small but with every shape quirk: GQA (4 query heads, 2 kv heads) and a
# head_dim (16) unrelated to hidden_size / heads (48 / 4 = 12).
TINY = dict(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=64, eos_token_id=0)

# Qwen/Qwen3-0.6B's config.json as published (transformers 4.51 layout).
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
    "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


def make_qwen(seed: int = 0, **overrides) -> Qwen3Model:
    """A tiny Qwen3 with weights large enough (and norm gains far enough from 1) that bugs show in logits."""
    torch.manual_seed(seed)
    model = Qwen3Model(Qwen3Config(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module")
def qwen() -> Qwen3Model:
    return make_qwen()


def rand_ids(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (b, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run(model: Qwen3Model, ids: torch.Tensor, **kw):
    return model(ids, **kw)


# --- parity with transformers ------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_matches_transformers(tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3ForCausalLM"):
        pytest.skip("this transformers has no Qwen3")
    ours = make_qwen(tie_word_embeddings=tied)
    # Built from our own to_hf_dict, so this also checks the config we write.
    hf_cfg = transformers.Qwen3Config(**ours.config.to_hf_dict())
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    hf_state = hf.state_dict()
    ours_state = ours.state_dict()
    assert set(ours_state) == set(hf_state) - ({"lm_head.weight"} if tied else set())
    hf.load_state_dict(ours_state, strict=not tied)
    if tied:
        assert torch.equal(hf.lm_head.weight, ours.model.embed_tokens.weight)
    assert sum(p.numel() for p in hf.parameters()) == ours.num_params(non_embedding=False)

    ids = rand_ids(2, 13)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = ours(ids, output_hidden_states=True)
    assert out.logits.shape == ref.logits.shape == (2, 13, TINY["vocab_size"])
    assert ref.logits.abs().max() > 1.0  # not a degenerate near-zero comparison
    assert (out.logits - ref.logits).abs().max() <= 1e-4
    # transformers' last hidden state is after the final norm; ours (like LLaDA's) is before it.
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for mine, theirs in zip(out.hidden_states[:-1], ref.hidden_states[:-1]):
        assert (mine - theirs).abs().max() <= 1e-4
    assert (ours.model.norm(out.hidden_states[-1]) - ref.hidden_states[-1]).abs().max() <= 1e-4


def test_real_qwen3_config_reads_and_counts() -> None:
    cfg = Qwen3Config.from_hf_dict(QWEN3_06B)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (128, 8, 1e6, True)
    assert cfg.eos_token_ids == (151645,) and cfg.extra["torch_dtype"] == "bfloat16"
    with torch.device("meta"):
        model = Qwen3Model(cfg)
    assert model.num_params(non_embedding=False) == 596_049_920  # the published Qwen3-0.6B size
    assert model.forward_flops(10, 20) > 2 * model.num_params() * 10
    back = cfg.to_hf_dict()
    assert back["model_type"] == "qwen3" and back["architectures"] == ["Qwen3ForCausalLM"]
    assert Qwen3Config.from_hf_dict(back) == cfg
    # transformers 5.x layout: theta inside rope_parameters; eos may be a list.
    v5 = {k: v for k, v in QWEN3_06B.items() if k not in ("rope_theta", "rope_scaling")}
    v5.update(rope_parameters={"rope_type": "default", "rope_theta": 5e5}, eos_token_id=[151645, 151643])
    cfg5 = Qwen3Config.from_hf_dict(v5)
    assert cfg5.rope_theta == 5e5 and cfg5.eos_token_ids == (151645, 151643)


# --- KV cache ----------------------------------------------------------------------------------


def test_incremental_decoding_matches_full_forward(qwen) -> None:
    ids = rand_ids(2, 14)
    full = run(qwen, ids).logits
    cache = qwen.new_cache(2, 32)
    pieces = [run(qwen, ids[:, :6], kv_cache=cache).logits]  # prefill
    pieces.append(run(qwen, ids[:, 6:9], kv_cache=cache).logits)  # a chunk on top of a cache
    for t in range(9, 14):  # then one token at a time
        pieces.append(run(qwen, ids[:, t:t + 1], kv_cache=cache).logits)
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_metered_cache_charges_every_attended_key(qwen) -> None:
    """CausalKVCache is a KVCacheHook: the meter reads its last_n_keys (past + Q) with no wrapper class."""
    from diffspec.decoding.meter import CostMeter, MeteredModel

    meter = CostMeter()
    metered = MeteredModel(qwen, meter, "target")
    cache = qwen.new_cache(1, 16)
    with torch.no_grad():
        metered(rand_ids(1, 5), kv_cache=cache)
        assert cache.last_n_keys == 5
        metered(rand_ids(1, 3, seed=2), kv_cache=cache)
        assert cache.last_n_keys == 8
    expected = qwen.forward_flops(5, 5) + qwen.forward_flops(3, 8)
    assert meter.models["target"].flops == expected and meter.models["target"].tokens_processed == 8


def test_crop_then_refeed_matches_full_forward(qwen) -> None:
    ids, other = rand_ids(2, 12, seed=2), rand_ids(2, 12, seed=3)
    cache = qwen.new_cache(2, 16)
    run(qwen, ids[:, :10], kv_cache=cache)
    cache.crop(6)  # reject the last 4 "draft" tokens
    assert cache.length == 6
    refed = run(qwen, other[:, 6:], kv_cache=cache).logits
    mixed = torch.cat([ids[:, :6], other[:, 6:]], dim=1)
    torch.testing.assert_close(refed, run(qwen, mixed).logits[:, 6:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(13)


def test_left_padded_batch_matches_rows(qwen) -> None:
    lengths, width, steps = [5, 9], 9, 3
    rows = [rand_ids(1, n + steps, seed=10 + n)[0] for n in lengths]
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        ids[r, width - n:] = row[:n]
        mask[r, width - n:] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)

    cache = qwen.new_cache(2, width + steps)
    out = run(qwen, ids, positions=positions, attention_mask=mask, kv_cache=cache).logits
    assert torch.isfinite(out).all()  # padded queries see only themselves: no NaN leaks
    decoded = []
    for s in range(steps):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
        step_ids = torch.stack([row[n + s] for row, n in zip(rows, lengths)])[:, None]
        pos = positions[:, -1:] + 1 + s
        decoded.append(run(qwen, step_ids, positions=pos, attention_mask=mask, kv_cache=cache).logits)
    decoded = torch.cat(decoded, dim=1)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        alone = run(qwen, row[None]).logits[0]
        torch.testing.assert_close(out[r, width - n:], alone[:n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decoded[r], alone[n:], atol=1e-5, rtol=1e-5)


def test_attn_mask_override_causal_equals_default(qwen) -> None:
    ids = rand_ids(2, 9, seed=4)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    default = run(qwen, ids).logits
    per_head = causal.expand(2, TINY["num_attention_heads"], 9, 9)
    torch.testing.assert_close(run(qwen, ids, attn_mask_override=causal[None, None]).logits, default)
    torch.testing.assert_close(run(qwen, ids, attn_mask_override=per_head).logits, default)
    # With a cache: 4 cached positions, then 5 new queries against 9 keys.
    cache = qwen.new_cache(2, 9)
    run(qwen, ids[:, :4], kv_cache=cache)
    chunk = run(qwen, ids[:, 4:], kv_cache=cache, attn_mask_override=causal[4:].expand(2, 1, 5, 9)).logits
    torch.testing.assert_close(chunk, default[:, 4:], atol=1e-5, rtol=1e-5)


def test_tree_mask_verifies_branches_in_one_forward(qwen) -> None:
    """The use the override exists for: two draft branches after one prefix, verified together."""
    prefix, a, b = rand_ids(1, 4, seed=5), rand_ids(1, 2, seed=6), rand_ids(1, 1, seed=7)
    cache = qwen.new_cache(1, 8)
    run(qwen, prefix, kv_cache=cache)
    tree = torch.cat([a, b], dim=1)  # slots 4, 5 (branch a) and 6 (branch b)
    mask = torch.zeros(1, 1, 3, 7, dtype=torch.bool)
    mask[..., :4] = True
    mask[0, 0, 0, 4] = True  # a1 sees a1
    mask[0, 0, 1, 4:6] = True  # a2 sees a1, a2
    mask[0, 0, 2, 6] = True  # b1 sees b1 only
    out = run(qwen, tree, kv_cache=cache, positions=torch.tensor([4, 5, 4]), attn_mask_override=mask).logits
    torch.testing.assert_close(out[:, :2], run(qwen, torch.cat([prefix, a], 1)).logits[:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 2:], run(qwen, torch.cat([prefix, b], 1)).logits[:, 4:], atol=1e-5, rtol=1e-5)


def test_hidden_layers_selects_states(qwen) -> None:
    ids = rand_ids(1, 7)
    every = run(qwen, ids, output_hidden_states=True).hidden_states
    picked = run(qwen, ids, hidden_layers=[2, 0, -1]).hidden_states
    assert len(every) == TINY["num_hidden_layers"] + 1
    assert [torch.equal(p, e) for p, e in zip(picked, (every[2], every[0], every[-1]))] == [True] * 3
    assert run(qwen, ids).hidden_states is None
    with pytest.raises(ValueError, match="out of range"):
        run(qwen, ids, hidden_layers=[TINY["num_hidden_layers"] + 1])


def test_cache_and_input_errors(qwen) -> None:
    cache = qwen.new_cache(2, 8)
    assert isinstance(cache, CausalKVCache) and cache.k[0].shape == (2, 2, 8, 16)
    with pytest.raises(ValueError, match="do not fit"):
        run(qwen, rand_ids(2, 9), kv_cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        run(qwen, rand_ids(3, 2), kv_cache=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        run(qwen, rand_ids(2, 4), attention_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask_override"):
        run(qwen, rand_ids(2, 4), attn_mask_override=torch.ones(2, 1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions"):
        run(qwen, rand_ids(2, 4), positions=torch.arange(5))
    assert cache.length == 0  # rejected calls leave the cache untouched


# --- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_roundtrip(tmp_path: Path, tokenizer, tied: bool) -> None:
    model = make_qwen(tie_word_embeddings=tied)
    path = save_causal(model, tokenizer, tmp_path / "qwen")
    state = load_file(str(path / "model.safetensors"))
    assert "model.layers.0.self_attn.q_norm.weight" in state
    assert ("lm_head.weight" in state) is not tied
    loaded, tok = load_causal(path, device="cpu", dtype="float32")
    assert not loaded.training and loaded.config == model.config
    assert tok.vocab_size == tokenizer.vocab_size
    ids = rand_ids(2, 8)
    assert torch.equal(run(loaded, ids).logits, run(model, ids).logits)
    half, _ = load_causal(path, dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(run(half, ids).logits).all()


def test_load_sharded_and_tolerates_extra_tied_head(tmp_path: Path, tokenizer, qwen) -> None:
    path = save_causal(qwen, tokenizer, tmp_path / "qwen")
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in shards.items():
        extra = {"lm_head.weight": state["model.embed_tokens.weight"].clone()} if fname.startswith("model-00002") else {}
        save_file({**{k: state[k] for k in keys}, **extra}, str(path / fname))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded, _ = load_causal(path)
    ids = rand_ids(1, 6)
    assert torch.equal(run(loaded, ids).logits, run(qwen, ids).logits)


def test_checkpoint_errors(tmp_path: Path, tokenizer, tiny_checkpoint, qwen) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_causal(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a Llama / Qwen2 / Qwen3 config"):
        load_causal(tiny_checkpoint)  # a LLaDA directory
    path = save_causal(qwen, tokenizer, tmp_path / "qwen")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_causal(path)
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match="shape"):
        load_causal(path)
    (path / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match="divisible"):
        load_causal(path)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_causal(path)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_key_value_heads=3), "divisible by num_key_value_heads"),
        (dict(head_dim=None, hidden_size=50), "not divisible by num_attention_heads"),
        (dict(head_dim=15), "even"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be an integer >= 1"),
        (dict(eos_token_id=999), "outside the vocabulary"),
        (dict(model_type="mistral"), "'mistral'; supported: 'llama', 'qwen2', 'qwen3'"),
        (dict(vocab_size=None), "lacks qwen3 keys"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(use_sliding_window=True), "sliding_window"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_bad_configs_raise(change: dict, match: str) -> None:
    d = {**Qwen3Config(**TINY).to_hf_dict(), **change}
    d = {k: v for k, v in d.items() if v is not None or k not in ("vocab_size", "head_dim")}
    d.pop("rope_parameters")  # let rope_scaling speak for itself
    with pytest.raises(ValueError, match=match):
        Qwen3Config.from_hf_dict(d)


@pytest.mark.parametrize("case", ["none", "causal", "mask"])
def test_grouped_query_attention_paths_agree(case: str, monkeypatch) -> None:
    """SDPA's enable_gqa (the CPU path) and repeating K/V heads must give the same attention, with each
    query head h reading key/value head h // group (the Qwen3 / Llama layout); a wrong grouping (heads
    tiled instead of interleaved) differs by O(1)."""
    from diffspec.models import layers

    g = torch.Generator().manual_seed(0)
    B, H, Hk, Q, K, D = 2, 6, 2, 3, 3 if case == "causal" else 7, 8
    q, k, v = torch.randn(B, H, Q, D, generator=g), torch.randn(B, Hk, K, D, generator=g), torch.randn(B, Hk, K, D,
                                                                                                        generator=g)
    mask = torch.rand(B, 1, Q, K, generator=g) > 0.3 if case == "mask" else None
    if mask is not None:
        mask[..., 0] = True  # every query attends somewhere
    kr, vr = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, is_causal=case == "causal")
    want = want.transpose(1, 2).reshape(B, Q, -1)
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5):
        assert layers._NATIVE_GQA  # else both passes below would test the repeat path only
    for native in (True, False):
        monkeypatch.setattr(layers, "_NATIVE_GQA", native and layers._NATIVE_GQA)
        got = layers.attend(q, k, v, mask, is_causal=case == "causal")
        assert torch.allclose(got, want, atol=1e-6)
