"""SDAR (model_type sdar): a tiny checkpoint in the published layout loads, its forward matches the
reference math, and the `sdar` sampler matches the reference loop.

config.json is JetAstra/SDAR's published `training/model/SDAR-4B-Chat/config.json` (every key) with
the size keys shrunk; generation_config.json names the stop ids [151645, 151643] as published; the
tokenizer holds the published special tokens at their real ids (`<|MASK|>` 151669). The reference
forward (Qwen3 with q/k norm, a bool block-causal mask through SDPA, as `modeling_sdar.py`'s eval
path) and the reference loop (`block_diffusion_generate` of `generate.py`, recomputing the window
instead of its exact cache; greedy at temperature 0, where the reference would divide by zero)
are written here in plain torch over the state dict read back from the shards.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffspec.decoding.sdar import SDARDecodeConfig, sdar_generate
from diffspec.models.checkpoint import CheckpointError
from diffspec.models.llada2 import block_causal_mask
from diffspec.models.sdar import SDARConfig, SDARModel, load_sdar
from block_diffusion_common import checkpoint_fixtures, cli_generate, random_state, ref_rms as rms
from test_real_configs import decoder_entries, write_tokenizer_json

# JetAstra/SDAR training/model/SDAR-4B-Chat/config.json
SDAR_4B = {
    "architectures": ["SDARForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                 "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
    "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
    "bos_token_id": 151643, "debug": False, "eos_token_id": 151643, "block_size": 4, "mask_token_id": 151669,
    "ep_size": 1, "fuse_cross_entropy": True, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
    "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 32768,
    "max_window_layers": 36, "micro_forward": False, "model_type": "sdar", "num_attention_heads": 32,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "skip_checkpoint": False, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False, "use_deepep": False,
    "use_sliding_window": False, "vocab_size": 151936,
}
GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                     "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
TINY = {"hidden_size": 32, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "intermediate_size": 48, "max_window_layers": 2}
MASK, ENDOFTEXT, IM_END = 151669, 151643, 151645
SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|MASK|>": MASK}


def write_checkpoint(path: Path, config: dict, seed: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    torch.manual_seed(seed)
    state = random_state(SDARModel(SDARConfig.from_hf_dict(config)))
    keys, weight_map = list(state), {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        part = {k: state[k] for k in keys[i::2]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer_json(path, SPECIALS)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder_entries(SPECIALS), "eos_token": "<|endoftext|>", "mask_token": "<|MASK|>",
        "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer"}))


ckpt, loaded = checkpoint_fixtures("sdar", "sdar-4b", write_checkpoint, {**SDAR_4B, **TINY}, load_sdar)


# ---------------------------------------------------------------- the reference, in plain torch


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def ref_forward(W, c, ids, block):
    H, Hkv, D, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    T = ids.shape[1]
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = torch.arange(T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    nb = -(-T // block)
    mask = torch.tril(torch.ones(nb, nb)).repeat_interleave(block, 0).repeat_interleave(block, 1)[:T, :T].bool()
    h = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"], eps)
        q = rms(F.linear(x, W[p + "self_attn.q_proj.weight"]).view(1, T, H, D), W[p + "self_attn.q_norm.weight"],
                eps).transpose(1, 2)
        k = rms(F.linear(x, W[p + "self_attn.k_proj.weight"]).view(1, T, Hkv, D), W[p + "self_attn.k_norm.weight"],
                eps).transpose(1, 2)
        v = F.linear(x, W[p + "self_attn.v_proj.weight"]).view(1, T, Hkv, D).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        scores = (q @ k.transpose(2, 3)) * D ** -0.5
        att = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
        h = h + F.linear(att.transpose(1, 2).reshape(1, T, H * D), W[p + "self_attn.o_proj.weight"])
        x = rms(h, W[p + "post_attention_layernorm.weight"], eps)
        h = h + F.linear(F.silu(F.linear(x, W[p + "mlp.gate_proj.weight"])) * F.linear(x, W[p + "mlp.up_proj.weight"]),
                         W[p + "mlp.down_proj.weight"])
    return F.linear(rms(h, W["model.norm.weight"], eps), W["lm_head.weight"])


def ref_generate(forward, prompt, mask_id, gen_length, block_length, denoising_steps, strategy, threshold,
                 stop_ids, stats=None):
    """generate.py's block_diffusion_generate, greedy, the window recomputed instead of cached."""
    P = len(prompt)
    nb = (P + gen_length + block_length - 1) // block_length
    x = torch.full((1, nb * block_length), mask_id, dtype=torch.long)
    x[:, :P] = torch.tensor(prompt)
    base, rem = block_length // denoising_steps, block_length % denoising_steps
    ntt = [base + (1 if i < rem else 0) for i in range(denoising_steps)]
    for b in range(P // block_length, nb):
        s, e = b * block_length, (b + 1) * block_length
        cur = x[:, s:e].clone()
        for step in range(denoising_steps + 1):
            mask_index = cur == mask_id
            if mask_index.sum() == 0:
                break
            window = torch.cat([x[:, :s], cur], 1)
            logits = forward(window, block_length)[:, s:e]
            x0 = logits.argmax(-1)
            x0_p = F.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if strategy == "sequential":
                first = mask_index[0].nonzero()[0].item()
                transfer[0, first:first + ntt[step]] = True
            elif strategy == "low_confidence_static":
                conf = torch.where(mask_index, x0_p, -torch.inf)
                transfer[0, torch.topk(conf[0], ntt[step]).indices] = True
            else:
                conf = torch.where(mask_index, x0_p, -torch.inf)
                high = conf[0] > threshold
                if high.sum() >= ntt[step]:
                    transfer[0] = high
                    if stats is not None and high.sum() > ntt[step]:
                        stats["threshold_steps"] += 1
                else:
                    transfer[0, torch.topk(conf[0], ntt[step]).indices] = True
            cur[transfer] = x0[transfer]
        x[:, s:e] = cur
        if any(t in x[0, P:] for t in stop_ids):
            break
    return x[0, P:P + gen_length].tolist()


def ref_state(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for f in sorted(set(index.values())):
        state.update(load_file(str(path / f)))
    return state


# ---------------------------------------------------------------- tests

def test_loader_reads_published_layout(loaded):
    model, _ = loaded
    cfg = model.config
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.stop_token_ids, cfg.block_size) == (
        MASK, ENDOFTEXT, (IM_END, ENDOFTEXT), 4)  # the stop ids come from generation_config.json
    names = set(model.state_dict())
    assert {"model.embed_tokens.weight", "model.layers.1.self_attn.q_norm.weight", "model.layers.1.mlp.up_proj.weight",
            "model.norm.weight", "lm_head.weight"} <= names


def test_forward_matches_reference(ckpt, loaded):
    model, _ = loaded
    W, c = ref_state(ckpt), json.loads((ckpt / "config.json").read_text())
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (1, 19))
    ids[0, 12:] = MASK
    pos = torch.arange(19)
    with torch.no_grad():
        ours = model(ids, attention_mask=block_causal_mask(pos, pos, 4)).logits
        ref = ref_forward(W, c, ids, 4)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 1.0


# 2, 18 and 36 bytes: the prompt's partial block leaves >= 2 masked cells, the most a step takes below
PROMPTS = ["Hi", "The quick brown fo", "Once upon a time, in a land far away"]


def _reference(ckpt, tok, prompt, stop_ids=(IM_END, ENDOFTEXT), **kw):
    W, c = ref_state(ckpt), json.loads((ckpt / "config.json").read_text())
    with torch.no_grad():
        return ref_generate(lambda ids, block: ref_forward(W, c, ids, block), tok.encode(prompt), MASK,
                            stop_ids=stop_ids, **kw)


@pytest.mark.parametrize("strategy, steps, threshold", [
    ("low_confidence_dynamic", 4, 0.85), ("low_confidence_dynamic", 2, 0.02), ("low_confidence_static", 2, 0.85),
    ("sequential", 4, 0.85)])
def test_sampler_matches_reference_loop(ckpt, loaded, strategy, steps, threshold):
    model, tok = loaded
    stats = {"threshold_steps": 0}
    for prompt in PROMPTS:
        want = _reference(ckpt, tok, prompt, gen_length=14, block_length=4, denoising_steps=steps,
                          strategy=strategy, threshold=threshold, stats=stats)
        for cache in ("none", "block"):
            cfg = SDARDecodeConfig(gen_length=14, block_length=4, steps=steps, remasking=strategy,
                                   threshold=threshold, cache=cache)
            got = sdar_generate(model, tok, [prompt], cfg).raw_ids[0]
            stop = next((i for i, t in enumerate(want) if t in (IM_END, ENDOFTEXT)), None)
            n = len(want) if stop is None else stop + 1  # the reference leaves decoded cells after a stop
            assert got[:n] == want[:n], (prompt, cache)
    if threshold < 0.5:
        assert stats["threshold_steps"] > 0


def test_prompt_cells_are_never_overwritten(ckpt, loaded):
    """Where the reference's top-k floor asks for more cells than its first block has masked (19
    bytes = 3 prompt cells + 1 mask in the block, 2 cells a step), it overwrites a prompt cell with
    a prediction; ours takes only masked cells (the documented deviation)."""
    model, tok = loaded
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    W, c = ref_state(ckpt), json.loads((ckpt / "config.json").read_text())
    seen = []

    def forward(window, block):
        seen.append(window[0, :len(ids)].tolist())
        return ref_forward(W, c, window, block)

    with torch.no_grad():
        ref_generate(forward, ids, MASK, gen_length=8, block_length=4, denoising_steps=2,
                     strategy="low_confidence_dynamic", threshold=0.85, stop_ids=(IM_END, ENDOFTEXT))
    assert any(s != ids for s in seen)  # the reference's prompt changed under it
    res = sdar_generate(model, tok, [prompt], SDARDecodeConfig(gen_length=8, block_length=4, steps=2))
    assert len(res.raw_ids[0]) == 8 and MASK not in res.raw_ids[0]


def test_stop_ids_end_the_answer(ckpt, loaded):
    """A token the random model emits mid-answer is made a stop id: both stop after that block."""
    import copy

    model, tok = loaded
    kw = dict(gen_length=16, block_length=4, steps=4)
    free = sdar_generate(model, tok, [PROMPTS[0]], SDARDecodeConfig(**kw)).raw_ids[0]
    stop = free[6]
    m2 = copy.deepcopy(model)
    m2.config.stop_token_ids = (stop,)
    want = _reference(ckpt, tok, PROMPTS[0], stop_ids=(stop,), gen_length=16, block_length=4, denoising_steps=4,
                      strategy="low_confidence_dynamic", threshold=0.85)
    first = want.index(stop)
    assert first <= 6 and all(t == MASK for t in want[8:])  # the reference stopped after that block
    for cache in ("none", "block"):
        res = sdar_generate(m2, tok, [PROMPTS[0]], SDARDecodeConfig(cache=cache, **kw))
        assert res.token_ids[0] == want[:first]


def test_cache_is_exact_and_cheaper(loaded):
    model, tok = loaded
    kw = dict(gen_length=24, block_length=4, steps=4)
    out = {c: sdar_generate(model, tok, PROMPTS, SDARDecodeConfig(cache=c, **kw)) for c in ("none", "block")}
    assert out["block"].raw_ids == out["none"].raw_ids
    assert out["block"].meter.tokens_processed < out["none"].meter.tokens_processed / 2
    assert out["block"].meter.flops < out["none"].meter.flops


def test_factor_rule_in_low_confidence_dynamic(loaded):
    """Fast-dLLM's factor rule (issue #39 item 4) replaces the threshold of low_confidence_dynamic: a
    huge factor fills a block in one forward, a vanishing one commits the schedule's floor like
    low_confidence_static; the other strategies refuse it."""
    model, tok = loaded
    kw = dict(gen_length=24, block_length=4, steps=4)
    static = sdar_generate(model, tok, PROMPTS, SDARDecodeConfig(remasking="low_confidence_static", **kw))
    assert sdar_generate(model, tok, PROMPTS, SDARDecodeConfig(factor=1e-9, **kw)).raw_ids == static.raw_ids
    every = sdar_generate(model, tok, PROMPTS, SDARDecodeConfig(factor=1e9, **kw))
    assert every.meter.models["model"].nfe < static.meter.models["model"].nfe / 3
    with pytest.raises(ValueError, match="leave factor unset"):
        SDARDecodeConfig(factor=1.0, remasking="sequential")


def test_cli_generate_and_refusals(ckpt):
    from diffspec.api import generate

    cli_generate(ckpt, "sdar", "--gen-length", "8", "--remasking-strategy", "low_confidence_static")
    for method in ("vanilla", "fast-dllm", "dkv-cache", "dream"):
        with pytest.raises(ValueError, match="block-causal LLaDA2 / SDAR model"):
            generate("Hello", model=str(ckpt), method=method, gen_length=16)
    with pytest.raises(ValueError, match="remasking"):
        generate("Hello", model=str(ckpt), method="sdar", remasking_strategy="entropy_bounded")
    with pytest.raises(ValueError, match="temperature > 0"):
        generate("Hello", model=str(ckpt), method="sdar", top_k=20)


def test_sdar_on_a_bidirectional_model(tiny_model, tokenizer):
    from diffspec.api import generate

    res = generate("1+1=", model=tiny_model, tokenizer=tokenizer, method="sdar", gen_length=8)
    assert res.config.cache == "none" and res.meter.nfe > 0


@pytest.mark.parametrize("change, message", [
    ({"use_sliding_window": True}, "sliding"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope"),
    ({"num_key_value_heads": 3}, "divisible by num_key_value_heads"),
    ({"mask_token_id": 10 ** 6}, "outside the vocabulary"),
    ({"num_hidden_layers": 3}, "do not match config.json"),
])
def test_bad_config(ckpt, tmp_path, change, message):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **change}))
    with pytest.raises(CheckpointError, match=message):
        load_sdar(d)


def test_missing_shard(ckpt, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    (d / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="named in the index is missing"):
        load_sdar(d)
