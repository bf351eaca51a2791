"""Llama and Qwen2 layouts of the causal target (diffspec/models/causal.py) against transformers.

Tiny random configs in fp32: logits and every hidden state equal transformers' `LlamaForCausalLM` /
`Qwen2ForCausalLM` (and `Qwen3ForCausalLM` with `attention_bias`) within 1e-4, with q/k norm, QKV / O /
MLP biases, tied or untied heads and a head_dim that is not hidden_size / heads as the config says.
Directories transformers writes load with `load_causal`, and the KV cache, tree mask and hidden-state
taps the speculative methods use work on a Llama target as on a Qwen3 one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffspec.models.causal import CausalConfig, CausalLM, Qwen3Model, is_causal_config, load_causal, save_causal
from diffspec.models.checkpoint import CheckpointError
from diffspec.models.tokenizer import EOS_TOKEN, MASK_TOKEN
from weights_common import randomize

transformers = pytest.importorskip("transformers")

VOCAB = 300  # the conftest tokenizer's size, so directories carry a real tokenizer.json
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=64, rms_norm_eps=1e-5,
            eos_token_id=0)
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# (model_type, overrides): every switch the three layouts have.
VARIANTS = {
    "llama": ("llama", dict(tie_word_embeddings=False)),
    "llama-tied-theta": ("llama", dict(tie_word_embeddings=True, rope_theta=100000.0)),
    "llama-bias-headdim": ("llama", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, head_dim=16)),
    "llama-mha": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2-tied-headdim": ("qwen2", dict(tie_word_embeddings=True, head_dim=16)),
    "qwen3-bias": ("qwen3", dict(tie_word_embeddings=False, attention_bias=True, head_dim=16)),
}


def make(variant: str, seed: int = 0) -> CausalLM:
    model_type, over = VARIANTS[variant]
    return randomize(CausalLM(CausalConfig(model_type=model_type, **{**BASE, **over})).eval(), seed)


def hf_from_ours(ours: CausalLM) -> torch.nn.Module:
    """transformers' model built from the config.json we write, carrying our weights."""
    d = ours.config.to_hf_dict()
    hf_cfg = transformers.AutoConfig.for_model(**d)
    assert type(hf_cfg).__name__.lower().startswith(ours.config.model_type)
    hf = getattr(transformers, HF_CLASSES[ours.config.model_type])(hf_cfg).eval()
    tied = ours.config.tie_word_embeddings
    hf_state, ours_state = hf.state_dict(), ours.state_dict()
    assert set(ours_state) == set(hf_state) - ({"lm_head.weight"} if tied else set())
    hf.load_state_dict(ours_state, strict=not tied)
    if tied:
        assert torch.equal(hf.lm_head.weight, ours.model.embed_tokens.weight)
    assert sum(p.numel() for p in hf.parameters()) == ours.num_params(non_embedding=False)
    return hf


def rand_ids(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def assert_parity(ours: CausalLM, hf: torch.nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = ours(ids, output_hidden_states=True)
    assert out.logits.shape == ref.logits.shape
    assert ref.logits.abs().max() > 1.0  # not a degenerate near-zero comparison
    assert (out.logits - ref.logits).abs().max() <= 1e-4
    # transformers' last hidden state is after the final norm; ours is before it (the taps D²SD reads).
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.config.num_hidden_layers + 1
    for mine, theirs in zip(out.hidden_states[:-1], ref.hidden_states[:-1]):
        assert (mine - theirs).abs().max() <= 1e-4
    assert (ours.model.norm(out.hidden_states[-1]) - ref.hidden_states[-1]).abs().max() <= 1e-4


# --- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_hidden_states_match_transformers(variant: str) -> None:
    ours = make(variant)
    cfg = ours.config
    attn = ours.model.layers[0].self_attn
    assert hasattr(attn, "q_norm") == (cfg.model_type == "qwen3")
    assert (attn.q_proj.bias is not None) == (cfg.model_type == "qwen2" or cfg.attention_bias)
    assert (attn.o_proj.bias is not None) == (cfg.model_type != "qwen2" and cfg.attention_bias)
    assert (ours.model.layers[0].mlp.up_proj.bias is not None) == cfg.mlp_bias
    assert_parity(ours, hf_from_ours(ours), rand_ids(2, 13))


@pytest.mark.parametrize("variant", ["llama", "qwen2-tied-headdim"])
def test_left_padded_batch_matches_transformers(variant: str) -> None:
    """Padding via attention_mask and explicit positions, as ar_generate batches prompts."""
    ours = make(variant, seed=3)
    hf = hf_from_ours(ours)
    ids = rand_ids(2, 10, seed=5)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = ours(ids, positions=positions, attention_mask=mask).logits
        ref = hf(ids, attention_mask=mask.long(), position_ids=positions).logits
    assert (out[0, 4:] - ref[0, 4:]).abs().max() <= 1e-4 and (out[1] - ref[1]).abs().max() <= 1e-4


# --- config.json both ways -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama-bias-headdim", "qwen2", "llama-tied-theta"])
def test_transformers_directory_loads_and_ours_loads_in_transformers(tmp_path: Path, tokenizer, variant: str) -> None:
    ours = make(variant, seed=4)
    hf = hf_from_ours(ours)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf" / "tokenizer.json")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert is_causal_config(written)
    loaded, tok = load_causal(tmp_path / "hf")
    assert loaded.config.model_type == ours.config.model_type and tok.vocab_size == VOCAB
    for f in ("head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias", "rope_theta", "rms_norm_eps",
              "num_key_value_heads"):
        assert getattr(loaded.config, f) == getattr(ours.config, f), f
    ids = rand_ids(1, 9, seed=6)
    with torch.no_grad():
        assert (loaded(ids).logits - ours(ids).logits).abs().max() <= 1e-6

    save_causal(ours, tokenizer, tmp_path / "ours")
    back = getattr(transformers, HF_CLASSES[ours.config.model_type]).from_pretrained(
        tmp_path / "ours", dtype=torch.float32).eval()
    assert_parity(ours, back, ids)


def test_published_llama_config_reads_and_counts() -> None:
    """HuggingFaceTB/SmolLM2-135M-Instruct's config.json as published: the parameter count is the model's."""
    smol = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
            "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
            "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
            "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
            "use_cache": True, "vocab_size": 49152}
    cfg = CausalConfig.from_hf_dict(smol)
    assert (cfg.model_type, cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta, cfg.tie_word_embeddings) == \
        ("llama", 64, 3, 100000, True)
    with torch.device("meta"):
        model = CausalLM(cfg)
    assert model.num_params(non_embedding=False) == 134_515_008  # SmolLM2-135M
    back = cfg.to_hf_dict()
    assert back["architectures"] == ["LlamaForCausalLM"] and back["mlp_bias"] is False
    assert CausalConfig.from_hf_dict(back) == cfg


@pytest.mark.parametrize("model_type, d, expect", [
    # keys a config.json may omit mean what transformers makes of them
    ("llama", {}, dict(tie_word_embeddings=False, num_key_value_heads=4, head_dim=12, rope_theta=10000.0)),
    ("qwen2", {"attention_bias": True, "mlp_bias": True}, dict(attention_bias=False, mlp_bias=False)),
    ("qwen3", {"mlp_bias": True, "attention_bias": True}, dict(attention_bias=True, mlp_bias=False)),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, dict(rope_theta=5e5)),
])
def test_missing_and_foreign_keys_read_as_transformers_does(model_type: str, d: dict, expect: dict) -> None:
    raw = {"model_type": model_type, "vocab_size": 64, "hidden_size": 48, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, **d}
    cfg = CausalConfig.from_hf_dict(raw)
    assert {k: getattr(cfg, k) for k in expect} == expect


@pytest.mark.parametrize("change, match", [
    (dict(model_type="qwen2", attention_bias=True), "qwen2 model's biases are fixed"),
    (dict(model_type="qwen3", mlp_bias=True), "mlp_bias is a Llama option"),
    (dict(model_type="gemma"), "'gemma' is not supported"),
])
def test_bad_switches_raise(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CausalConfig(**{**BASE, **change})


@pytest.mark.parametrize("d, match", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "'mistral'"),
])
def test_unsupported_llama_configs_raise(d: dict, match: str) -> None:
    raw = {**make("llama").config.to_hf_dict(), **d}
    raw.pop("rope_parameters")
    with pytest.raises(ValueError, match=match):
        CausalConfig.from_hf_dict(raw)


def test_foreign_directory_error_names_the_supported_types(tmp_path: Path, tokenizer) -> None:
    path = save_causal(make("llama"), tokenizer, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="'llama', 'qwen2', 'qwen3'"):
        load_causal(path)


# --- the speculative path on a Llama target ------------------------------------------------------


def test_cache_tree_mask_and_taps_on_llama() -> None:
    model = make("llama-bias-headdim", seed=7)
    ids = rand_ids(2, 12, seed=8)
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        cache = model.new_cache(2, 16)
        pieces = [model(ids[:, :5], kv_cache=cache).logits]
        for t in range(5, 12):
            pieces.append(model(ids[:, t:t + 1], kv_cache=cache).logits)
        torch.testing.assert_close(torch.cat(pieces, 1), full.logits, atol=1e-5, rtol=1e-5)
        picked = model(ids, hidden_layers=[1, -1]).hidden_states
        assert torch.equal(picked[0], full.hidden_states[1]) and torch.equal(picked[1], full.hidden_states[-1])
        # Two branches after a 6-token prefix, verified in one forward with a tree mask.
        cache.crop(6)
        a, b = ids[:1, 6:8], ids[1:, 6:7]
        one = model.new_cache(1, 16)
        model(ids[:1, :6], kv_cache=one)
        mask = torch.zeros(1, 1, 3, 9, dtype=torch.bool)
        mask[..., :6] = True
        mask[0, 0, 0, 6] = mask[0, 0, 1, 6] = mask[0, 0, 1, 7] = mask[0, 0, 2, 8] = True
        out = model(torch.cat([a, b], 1), kv_cache=one, positions=torch.tensor([6, 7, 6]),
                    attn_mask_override=mask).logits
        ref_a = model(torch.cat([ids[:1, :6], a], 1)).logits[:, 6:]
        ref_b = model(torch.cat([ids[:1, :6], b], 1)).logits[:, 6:]
    torch.testing.assert_close(out[:, :2], ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 2:], ref_b, atol=1e-5, rtol=1e-5)


def test_ar_greedy_and_d2sd_on_an_untied_llama_target_equal_transformers_greedy(tokenizer) -> None:
    """ar_generate on a Llama target (KV cache, left-padded batch) is transformers' greedy loop, and D²SD
    with random DFlash drafters (the target's untied LM head shared) reproduces it token for token."""
    from diffspec.models.dflash import DFlashConfig, DFlashDrafter
    from diffspec.speculative.ar import ARConfig, ar_generate
    from diffspec.speculative.d2sd import D2SDConfig, d2sd_generate

    model_type, over = VARIANTS["llama-bias-headdim"]
    cfg = CausalConfig(model_type=model_type, **{**BASE, **over, "vocab_size": tokenizer.vocab_size,
                                                 "eos_token_id": tokenizer.token_to_id(EOS_TOKEN)})
    target = randomize(Qwen3Model(cfg).eval(), 11)
    hf = hf_from_ours(target)
    prompts = ["Question: 12+7=", "Question: what is 3 * 45?\nAnswer:"]
    n = 10
    ar = ar_generate(target, tokenizer, prompts, ARConfig(gen_length=n, stop_at_eos=False))
    for prompt, got in zip(prompts, ar.raw_ids):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat([ids, hf(ids).logits[:, -1:].argmax(-1)], dim=1)
        assert got == ids[0, -n:].tolist()

    mask_id = tokenizer.token_to_id(MASK_TOKEN)
    block = randomize(DFlashDrafter(DFlashConfig.for_target(target, mask_id, target_layers=(1, 3), block_size=4),
                                    target).eval(), 12)
    vp = randomize(DFlashDrafter(DFlashConfig.for_target(target, mask_id, n_layers=1, target_layers=(2,),
                                                         block_size=8), target).eval(), 13)
    d2 = D2SDConfig(gen_length=n, gamma=4, gamma2=8, k=2, stop_at_eos=False)
    res = d2sd_generate(target, block, vp, tokenizer, prompts, d2)
    assert res.raw_ids == ar.raw_ids
