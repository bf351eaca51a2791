"""Fast-dLLM v2 (model_type Fast_dLLM_Qwen): a tiny checkpoint in the published layout loads, its forward
matches the reference math, and the `fast-dllm-v2` sampler matches the reference loop.

config.json is the published Efficient-Large-Model/Fast_dLLM_v2_7B `config.json` (every key) with the
size keys shrunk; generation_config.json and the tokenizer's special tokens are the published ones at
their real ids (`|<MASK>|` 151665, which config.json does not name); the weights are written in two
safetensors shards under the published tensor names (Qwen2's, q/k/v biases, no o_proj bias).

The reference forward (`Fast_dLLM_QwenForCausalLM`'s eval path: Qwen2 with a bool block-causal mask
through SDPA, its `past_key_values` cache updated only by `update_past_key_values` forwards, and its
`use_block_cache` block cache overwritten in place at `replace_position`) and the reference loop (the
checkpoint's `generate`, greedy at temperature 0, as the model card runs it) are written here in plain
torch over the state dict read back from the shards.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffspec.decoding.capabilities import capabilities
from diffspec.decoding.fastdllm_v2 import FastDLLMv2DecodeConfig, fastdllm_v2_generate
from diffspec.decoding.llada2 import BlockKVCache
from diffspec.models.checkpoint import CheckpointError
from diffspec.models.fastdllm_v2 import FastDLLMv2Config, FastDLLMv2Model, load_fastdllm_v2
from diffspec.models.llada2 import block_causal_mask
from block_diffusion_common import checkpoint_fixtures, cli_generate, random_state, ref_rms as rms
from test_real_configs import decoder_entries, write_tokenizer_json

# Efficient-Large-Model/Fast_dLLM_v2_7B config.json
FASTDLLM_V2_7B = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig", "AutoModel": "modeling.Fast_dLLM_QwenModel",
                 "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
    "bd_size": 32, "bos_token_id": 151643, "conplemenrary_mask": True, "eos_token_id": 151645, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "layer_types": ["full_attention"] * 28, "max_position_embeddings": 32768, "max_window_layers": 28,
    "model_type": "Fast_dLLM_Qwen", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "pad_token_id": 151645, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.53.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                     "pad_token_id": 151643, "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20,
                     "top_p": 0.8, "transformers_version": "4.53.1"}
TINY = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 48, "max_window_layers": 2, "layer_types": ["full_attention"] * 2}
MASK, ENDOFTEXT, IM_END = 151665, 151643, 151645
SPECIALS = {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": 151644, "<|im_end|>": IM_END, "|<MASK>|": MASK}


def write_checkpoint(path: Path, config: dict, seed: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    torch.manual_seed(seed)
    cfg = FastDLLMv2Config.from_hf_dict({**config, "mask_token_id": MASK})
    state = random_state(FastDLLMv2Model(cfg))
    keys, weight_map = list(state), {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        part = {k: state[k] for k in keys[i::2]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer_json(path, SPECIALS)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "added_tokens_decoder": decoder_entries(SPECIALS),
        "additional_special_tokens": ["|<MASK>|"], "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer"}))


ckpt, loaded = checkpoint_fixtures("fastdllm_v2", "fastdllm-v2-7b", write_checkpoint, {**FASTDLLM_V2_7B, **TINY},
                                   load_fastdllm_v2)


# ---------------------------------------------------------------- the reference, in plain torch


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class RefModel:
    """`Fast_dLLM_QwenForCausalLM.forward` in eval mode, over a state dict; raw (unshifted) logits.

    past: the `past_key_values` list of per-layer [k, v] (None: a fresh cache, dropped after the call);
    a forward attends to it and, with `update`, appends its own K/V. block_cache: the `use_block_cache`
    list (empty: filled with this forward's K/V; else this forward's K/V overwrite it at `replace`)."""

    def __init__(self, path: Path):
        index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        self.W = {}
        for f in sorted(set(index.values())):
            self.W.update(load_file(str(path / f)))
        self.c = json.loads((path / "config.json").read_text())
        self.calls = 0

    def __call__(self, ids, past, update=False, mask_block=32, block_cache=None, replace=None):
        self.calls += 1
        W, c = self.W, self.c
        H, Hkv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
        D = c["hidden_size"] // H
        T = ids.shape[1]
        past = [] if past is None else past
        cache_len = past[0][0].shape[2] if past else 0
        start = cache_len + (replace or 0)
        inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
        freqs = torch.arange(start, start + T).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()
        if block_cache:
            mask = None
        else:
            q_idx, k_idx = torch.arange(T) + cache_len, torch.arange(T + cache_len)
            mask = (q_idx[:, None] // mask_block) >= (k_idx[None, :] // mask_block)
        h = W["model.embed_tokens.weight"][ids]
        fresh_block_cache = block_cache is not None and not block_cache
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn."
            x = rms(h, W[f"model.layers.{i}.input_layernorm.weight"], eps)
            q, k, v = (F.linear(x, W[p + n + "_proj.weight"], W[p + n + "_proj.bias"]).view(1, T, -1, D).transpose(1, 2)
                       for n in "qkv")
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            if block_cache is not None:
                if fresh_block_cache:
                    block_cache.append([k, v])
                else:
                    bk, bv = block_cache[i]
                    bk[:, :, replace:replace + T], bv[:, :, replace:replace + T] = k, v
                    k, v = bk, bv
            if update:
                if len(past) > i:
                    past[i] = [torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)]
                else:
                    past.append([k, v])
                k, v = past[i]
            elif len(past) > i:
                k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            scores = (q @ k.transpose(2, 3)) * D ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            att = torch.softmax(scores, -1) @ v
            h = h + F.linear(att.transpose(1, 2).reshape(1, T, H * D), W[p + "o_proj.weight"])
            x = rms(h, W[f"model.layers.{i}.post_attention_layernorm.weight"], eps)
            m = f"model.layers.{i}.mlp."
            h = h + F.linear(F.silu(F.linear(x, W[m + "gate_proj.weight"])) * F.linear(x, W[m + "up_proj.weight"]),
                             W[m + "down_proj.weight"])
        return F.linear(rms(h, W["model.norm.weight"], eps), W["lm_head.weight"])


def shift(logits):
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def ref_stopped(x, prompt_length, stop_token, mask_id):
    gen = x[0, prompt_length:]
    if stop_token not in gen:
        return False
    first = int((gen == stop_token).nonzero()[0])
    return not bool((gen[:first] == mask_id).any())


def ref_generate(model, prompt, max_new_tokens, block_size, small_block_size, threshold, stop_token, mask_id,
                 use_block_cache=False, prefill_whole_prompt_block=False, stats=None):
    """The checkpoint's `generate`, greedy (temperature 0), one prompt; `prefill_whole_prompt_block`
    prefills a prompt of exactly one block (the reference's test is `> block_size`)."""
    L, S = block_size, small_block_size
    x = torch.tensor([prompt])
    original_input_length = x.shape[1]
    past = None
    if x.shape[1] > L or (prefill_whole_prompt_block and x.shape[1] == L):
        past = []
        raw = model(x[:, :x.shape[1] // L * L], past, update=True, mask_block=L)
        if x.shape[1] % L == 0:
            x = torch.cat([x, raw[:, -1:].argmax(-1)], 1)
    for _ in range(max_new_tokens // L):
        if stop_token in x[0, original_input_length:]:
            break
        prompt_length = x.shape[1]
        x = torch.cat([x, torch.full((1, L - prompt_length % L), mask_id)], 1)
        block_cache = None
        while True:
            if ref_stopped(x, prompt_length, stop_token, mask_id):
                break
            if (x[:, -L:] == mask_id).sum() == 0:
                past = [] if past is None else past
                raw = model(x[:, -L:], past, update=True, mask_block=L)
                x = torch.cat([x, raw[:, -1:].argmax(-1)], 1)
                break
            for a in range(0, L, S):
                start, end = -L + a, (None if a + S == L else -L + a + S)
                while True:
                    mask_idx = x[:, -L:] == mask_id
                    if mask_idx[:, start:end].sum() == 0 or ref_stopped(x, prompt_length, stop_token, mask_id):
                        break
                    if use_block_cache and (block_cache is None or x[0, -L + a] == mask_id):
                        block_cache = []
                        logits = shift(model(x[:, -L:], past, block_cache=block_cache))[:, start:end]
                    elif use_block_cache:
                        logits = shift(model(x[:, start:end], past, block_cache=block_cache, replace=a))
                        if stats is not None:
                            stats["partial"] += 1
                    else:
                        logits = shift(model(x[:, -L:], past))[:, start:end]
                    p_1t = torch.softmax(logits, dim=-1)
                    x_1 = p_1t.argmax(-1)
                    x1_p = torch.where(mask_idx[:, start:end], p_1t.gather(-1, x_1[..., None])[..., 0], -torch.inf)
                    unmask = x1_p > threshold
                    unmask[0, x1_p[0].argmax()] = True
                    unmask &= mask_idx[:, start:end]
                    if stats is not None and unmask.sum() > 1:
                        stats["threshold_steps"] += 1
                    x[:, start:end][unmask] = x_1[unmask]
    gen = x[0, original_input_length:]
    if stop_token in gen:
        gen = gen[:int((gen == stop_token).nonzero()[0]) + 1]
    return gen.tolist()


def _reference(ckpt, tok, prompt, stop=IM_END, **kw):
    model = RefModel(ckpt)
    with torch.no_grad():
        ids = ref_generate(model, tok.encode(prompt), stop_token=stop, mask_id=MASK, **kw)
    return ids, model.calls


# ---------------------------------------------------------------- tests

def test_loader_reads_published_layout(loaded):
    model, tok = loaded
    cfg = model.config
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.bd_size, cfg.head_dim) == (MASK, IM_END, 32, 8)
    assert cfg.extra["conplemenrary_mask"] is True  # a training switch, kept and unused
    names = set(model.state_dict())
    assert {"model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.v_proj.bias",
            "model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    caps = capabilities(model)
    assert caps.block_causal and caps.logits_shifted and caps.eos_ids == (IM_END,) and caps.mask_id == MASK


def test_forward_matches_reference(ckpt, loaded):
    """The whole window under the block-causal mask, and the cached path: prompt blocks stored, then a
    block fed alone against them (the reference's default mask of 32-column blocks there)."""
    model, _ = loaded
    ref = RefModel(ckpt)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, 24))
    ids[0, 19:] = MASK
    pos = torch.arange(24)
    with torch.no_grad():
        ours = model(ids, attention_mask=block_causal_mask(pos, pos, 8), shift=False).logits
        want = ref(ids, None, mask_block=8)
        assert (ours - want).abs().max().item() <= 1e-4 and want.abs().max().item() > 1.0
        assert torch.equal(model(ids, attention_mask=block_causal_mask(pos, pos, 8)).logits, shift(ours))
        kv = BlockKVCache(2)
        kv.commit(16)
        model(ids[:, :16], positions=pos[:16], attention_mask=block_causal_mask(pos[:16], pos[:16], 8), kv_cache=kv)
        cached = model(ids[:, 16:], positions=pos[16:], kv_cache=kv, shift=False).logits
        past = []
        ref(ids[:, :16], past, update=True, mask_block=8)
        assert (cached - ref(ids[:, 16:], past)).abs().max().item() <= 1e-4
        assert (cached - want[:, 16:]).abs().max().item() <= 1e-4


# 2 bytes (inside the first block), 25 (whole blocks prefilled, the first block starts with a prompt cell)
# and 16 (whole blocks only: the prefill's AR token opens the first block)
PROMPTS = ["Hi", "The quick brown fox jumps", "exactly 16 bytes"]
M = 16  # the reference's max_new_tokens; it returns M - P % L + 1 ids, its last block's AR token included


@pytest.mark.parametrize("L, S, threshold, sub_block_cache", [
    (8, 4, 0.9, False), (8, 4, 0.02, False), (8, 4, 0.9, True), (8, 8, 0.3, True), (8, 2, 0.9, True),
    (4, 4, 1.0, False)])
def test_sampler_matches_reference_loop(ckpt, loaded, L, S, threshold, sub_block_cache):
    model, tok = loaded
    stats = {"threshold_steps": 0, "partial": 0}
    for prompt in PROMPTS:
        want, calls = _reference(ckpt, tok, prompt, max_new_tokens=M, block_size=L, small_block_size=S,
                                 threshold=threshold, use_block_cache=sub_block_cache, stats=stats)
        G = M - len(tok.encode(prompt)) % L + 1
        assert len(want) == G and MASK not in want and IM_END not in want
        for cache in ("block",) if sub_block_cache else ("block", "none"):
            cfg = FastDLLMv2DecodeConfig(gen_length=G, block_length=L, small_block_size=S, threshold=threshold,
                                         sub_block_cache=sub_block_cache, cache=cache)
            res = fastdllm_v2_generate(model, tok, [prompt], cfg)
            assert res.raw_ids[0] == want, (prompt, cache)
            if cache == "block":  # the same forwards: prefill, one per step, one per finished block
                assert res.meter.models["model"].nfe == calls, prompt
    if threshold < 0.5:
        assert stats["threshold_steps"] > 0
    if sub_block_cache:
        assert stats["partial"] > 0


def test_a_prompt_of_one_block(ckpt, loaded):
    """At P = L the reference caches nothing and decodes the first block at positions 0..L-1 without the
    prompt (its prefill test is P > L): two different prompts give the same answer. Here the prompt is
    prefilled like any prompt of whole blocks, as the reference does from P = 2L on."""
    model, tok = loaded
    kw = dict(max_new_tokens=16, block_size=8, small_block_size=4, threshold=0.9)
    a, _ = _reference(ckpt, tok, "8 bytes!", **kw)
    b, _ = _reference(ckpt, tok, "other 8.", **kw)
    assert a == b  # the answer never saw the prompt
    for prompt in ("8 bytes!", "other 8."):
        want, _ = _reference(ckpt, tok, prompt, prefill_whole_prompt_block=True, **kw)
        cfg = FastDLLMv2DecodeConfig(gen_length=len(want), block_length=8, small_block_size=4, threshold=0.9)
        assert fastdllm_v2_generate(model, tok, [prompt], cfg).raw_ids[0] == want


def test_stop_id_ends_the_answer(ckpt, loaded):
    """A token the random model emits mid-answer is made the stop id: both stop as soon as it has no
    masked cell before it, with fewer forwards than the full answer."""
    model, tok = loaded
    kw = dict(block_length=8, small_block_size=4, threshold=0.9)
    free = fastdllm_v2_generate(model, tok, [PROMPTS[1]], FastDLLMv2DecodeConfig(gen_length=16, **kw))
    stop = free.raw_ids[0][5]
    m2 = copy.deepcopy(model)
    m2.config.eos_token_id = stop
    want, calls = _reference(ckpt, tok, PROMPTS[1], stop=stop, max_new_tokens=16, block_size=8, small_block_size=4,
                             threshold=0.9)
    assert want[-1] == stop and len(want) <= 6
    for cache in ("block", "none"):
        res = fastdllm_v2_generate(m2, tok, [PROMPTS[1]], FastDLLMv2DecodeConfig(gen_length=16, cache=cache, **kw))
        assert res.token_ids[0] == want[:-1] and res.raw_ids[0][len(want) - 1:] == [stop] * (17 - len(want))
        assert res.meter.models["model"].nfe < free.meter.models["model"].nfe
    assert fastdllm_v2_generate(m2, tok, [PROMPTS[1]], FastDLLMv2DecodeConfig(gen_length=16, **kw)).meter.nfe == calls


def test_cache_is_exact_and_cheaper(loaded):
    model, tok = loaded
    kw = dict(gen_length=24, block_length=8, small_block_size=4, threshold=0.3)
    out = {c: fastdllm_v2_generate(model, tok, PROMPTS, FastDLLMv2DecodeConfig(cache=c, **kw))
           for c in ("none", "block")}
    assert out["block"].raw_ids == out["none"].raw_ids
    assert out["block"].meter.tokens_processed < out["none"].meter.tokens_processed / 2
    assert out["block"].meter.flops < out["none"].meter.flops
    # every cached forward is charged its cached keys too: keys = whole cached blocks + the fed block
    shapes = [tuple(map(int, k.split(","))) for k in out["block"].meter.models["model"].shapes]
    assert any(keys > q for _, q, keys in shapes) and all((keys - q) % 8 == 0 for _, q, keys in shapes)
    sub = fastdllm_v2_generate(model, tok, PROMPTS, FastDLLMv2DecodeConfig(sub_block_cache=True, **kw))
    assert sub.meter.tokens_processed < out["block"].meter.tokens_processed


def test_streamer_hears_every_token_once(loaded):
    from diffspec.decoding.streamer import Streamer

    class Recorder(Streamer):
        def __init__(self):
            self.cells = {}

        def on_commit(self, row, positions, token_ids):
            for p, t in zip(positions, token_ids):
                assert (row, p) not in self.cells
                self.cells[row, p] = t

    model, tok = loaded
    rec = Recorder()
    res = fastdllm_v2_generate(model, tok, PROMPTS, FastDLLMv2DecodeConfig(gen_length=12, block_length=8,
                                                                           small_block_size=4), streamer=rec)
    assert {(r, i): t for r, ids in enumerate(res.raw_ids) for i, t in enumerate(ids)} == rec.cells


def test_factor_rule_and_sampling(loaded):
    """Fast-dLLM's factor rule replaces the threshold: a vanishing factor commits one cell a step (the
    threshold-1 run), a huge one a whole sub-block a step. Sampling is reproducible by its seed."""
    model, tok = loaded
    kw = dict(gen_length=24, block_length=8, small_block_size=4)
    one = fastdllm_v2_generate(model, tok, PROMPTS, FastDLLMv2DecodeConfig(threshold=1.0, **kw))
    assert fastdllm_v2_generate(model, tok, PROMPTS, FastDLLMv2DecodeConfig(factor=1e-9, **kw)).raw_ids == one.raw_ids
    every = fastdllm_v2_generate(model, tok, PROMPTS, FastDLLMv2DecodeConfig(factor=1e9, **kw))
    assert every.meter.nfe < one.meter.nfe / 2
    hot = FastDLLMv2DecodeConfig(temperature=0.8, seed=3, **kw)
    assert fastdllm_v2_generate(model, tok, PROMPTS, hot).raw_ids == fastdllm_v2_generate(model, tok, PROMPTS,
                                                                                          hot).raw_ids


def test_cli_generate_and_refusals(ckpt, tokenizer):
    from diffspec.api import generate
    from diffspec.models.sdar import SDARConfig, SDARModel

    cli_generate(ckpt, "fast-dllm-v2", "--gen-length", "8", "--block-length", "8", "--small-block-size", "4",
                 "--sub-block-cache", "true")
    for method in ("vanilla", "fast-dllm", "dream", "llada2", "sdar"):
        with pytest.raises(ValueError, match="block-causal Fast-dLLM v2 model; use method fast-dllm-v2"):
            generate("Hello", model=str(ckpt), method=method, gen_length=16)
    sdar = SDARModel(SDARConfig(vocab_size=512, mask_token_id=300, eos_token_id=301))
    with pytest.raises(ValueError, match="another block-diffusion family's sampler.*use method llada2 / sdar"):
        generate("1+1=", model=sdar, tokenizer=tokenizer, method="fast-dllm-v2", gen_length=8)
    for options, message in [
        (dict(small_block_size=3), "must divide block_length"),
        (dict(steps=4), "takes no --steps"),
        (dict(sub_block_cache=True, cache="none"), "sub_block_cache sits on the cache"),
        (dict(threshold=0.5, factor=1.0), "give one of them"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(cache="dual"), "takes cache auto / block / none"),
        (dict(remasking_strategy="sequential"), "only applies to method 'sdar'"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate("Hello", model=str(ckpt), method="fast-dllm-v2", gen_length=16, **options)


def test_on_a_bidirectional_model(tiny_model, tokenizer):
    from diffspec.api import generate

    res = generate("1+1=", model=tiny_model, tokenizer=tokenizer, method="fast-dllm-v2", gen_length=8,
                   block_length=8, small_block_size=4)
    assert res.config.cache == "none" and res.meter.nfe > 0 and len(res.raw_ids[0]) == 8
    with pytest.raises(ValueError, match="sub_block_cache needs the cache of finished blocks"):
        generate("1+1=", model=tiny_model, tokenizer=tokenizer, method="fast-dllm-v2", gen_length=8,
                 sub_block_cache=True)


@pytest.mark.parametrize("change, message", [
    ({"use_sliding_window": True}, "sliding"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"num_key_value_heads": 3}, "divisible by num_key_value_heads"),
    ({"eos_token_id": 10 ** 6}, "outside the vocabulary"),
    ({"num_hidden_layers": 3}, "do not match config.json"),
])
def test_bad_config(ckpt, tmp_path, change, message):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **change}))
    with pytest.raises(CheckpointError, match=message):
        load_fastdllm_v2(d)


def test_a_mask_found_nowhere_is_one_line(ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    write_tokenizer_json(d, {k: v for k, v in SPECIALS.items() if k != "|<MASK>|"})
    with pytest.raises(CheckpointError, match="no mask_token_id"):
        load_fastdllm_v2(d)


def test_the_llada2_and_sdar_samplers_refuse_it(loaded):
    """Their loops read logit i at i and never write the AR token: on this model they would decode
    garbage without a word, so the decode functions themselves refuse it (not only the API)."""
    from diffspec.decoding.llada2 import LLaDA2DecodeConfig, llada2_generate
    from diffspec.decoding.sdar import SDARDecodeConfig, sdar_generate

    model, tok = loaded
    with pytest.raises(ValueError, match="another block-diffusion family's sampler.*fast-dllm-v2"):
        llada2_generate(model, tok, PROMPTS[:1], LLaDA2DecodeConfig(gen_length=8, block_length=8, steps=8))
    with pytest.raises(ValueError, match="another block-diffusion family's sampler.*fast-dllm-v2"):
        sdar_generate(model, tok, PROMPTS[:1], SDARDecodeConfig(gen_length=8, block_length=4, steps=4))
