"""LLaDA2 MoE (model_type llada2_moe): a tiny checkpoint in the published layout loads, its forward
matches the reference math, and the `llada2` sampler matches the reference loop.

The reference here is written inside this file from the published `modeling_llada2_moe.py`
(`LLaDA2MoeGate`, `LLaDA2MoeSparseMoeBlock.moe_infer`, `LLaDA2MoeAttention`,
`apply_rotary_pos_emb` with partial rotary, eager attention with an additive mask) and its
`LLaDA2MoeModelLM.generate` (full recompute of the window every step), in plain torch over the
state dict read back from the safetensors shards, sharing no code with `diffspec.models.llada2`
or `diffspec.decoding.llada2`.

config.json: the published field names (those `LLaDA2MoeConfig` and the modeling code read)
with LLaDA2.0-mini's values except the size keys; the vocabulary keeps its real size so the
published special ids (EOS/pad 156892, mask 156895: the reference `generate` defaults and
SGLang's LLaDA2 mask id) stay valid. The mask id is not in config.json; the loader takes it
from the tokenizer's `<|mask|>` (the token texts are our assumption).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffspec.decoding.llada2 import LLaDA2DecodeConfig, llada2_generate
from diffspec.models.checkpoint import CheckpointError
from diffspec.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModel, load_llada2
from block_diffusion_common import ref_state, loader_peak, checkpoint_fixtures, cli_generate, random_state, ref_rms
from test_real_configs import decoder_entries, write_tokenizer_json

# LLaDA2.0-mini's config.json: the keys and values that copies of it in public test code agree on
# (xLLM's model-args loader test, dFactory-based scripts, the mlx ports), with no eos_token_id or
# mask_token_id (the reference `generate` takes them as arguments, 156892 / 156895); the sizes are
# shrunk below.
LLADA2_MINI = {
    "architectures": ["LLaDA2MoeModelLM"],
    "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                 "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                 "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
    "model_type": "llada2_moe", "dtype": "bfloat16", "first_k_dense_replace": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5120,
    "max_position_embeddings": 32768, "moe_intermediate_size": 512, "moe_router_enable_expert_bias": True,
    "n_group": 8, "norm_head": False, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 256,
    "num_experts_per_tok": 8, "num_hidden_layers": 20, "num_key_value_heads": 4, "num_shared_experts": 1,
    "output_router_logits": False, "pad_token_id": 156892, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
    "rope_theta": 600000, "routed_scaling_factor": 2.5, "router_dtype": "fp32", "score_function": "sigmoid",
    "tie_word_embeddings": False, "topk_group": 4, "use_bias": False, "use_qk_norm": True, "use_qkv_bias": False,
    "vocab_size": 157184,
}
TINY = {"hidden_size": 32, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 3, "intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 8,
        "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3}
EOS, MASK = 156892, 156895
SPECIALS = {"<|endoftext|>": EOS, "<|role_start|>": 156893, "<|role_end|>": 156894, "<|mask|>": MASK}
TEMPLATE = ("{% for m in messages %}<role>{{ m['role'] | upper }}</role>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}")


def write_checkpoint(path: Path, config: dict, seed: int = 0, shards: int = 3) -> dict[str, torch.Tensor]:
    """Random weights (large enough to route and attend unevenly, nonzero expert biases, norms not 1)
    written as fp32 safetensors shards with an index, plus tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    cfg = LLaDA2MoeConfig.from_hf_dict({**config, "mask_token_id": MASK, "eos_token_id": EOS})
    torch.manual_seed(seed)
    state = random_state(LLaDA2MoeModel(cfg), {"expert_bias": 0.5})
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}))
    write_tokenizer_json(path, SPECIALS)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder_entries(SPECIALS), "chat_template": TEMPLATE, "eos_token": "<|endoftext|>",
        "mask_token": "<|mask|>", "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return state


ckpt, loaded = checkpoint_fixtures("llada2", "mini", write_checkpoint, {**LLADA2_MINI, **TINY}, load_llada2)


# ---------------------------------------------------------------- the reference, in plain torch


def ref_mlp(x, W, p):
    return F.linear(F.silu(F.linear(x, W[p + "gate_proj.weight"])) * F.linear(x, W[p + "up_proj.weight"]),
                    W[p + "down_proj.weight"])


def ref_moe(x, W, p, c):
    """LLaDA2MoeGate + moe_infer, token by token."""
    E, k, G = c["num_experts"], c["num_experts_per_tok"], c["n_group"]
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        logits = flat[n].float() @ W[p + "gate.weight"].float().T
        scores = torch.sigmoid(logits)
        routing = scores + W[p + "gate.expert_bias"]
        groups = routing.view(G, E // G)
        gscore = torch.stack([g.sort(descending=True).values[:2].sum() for g in groups])
        allowed_groups = set(gscore.sort(descending=True).indices[:c["topk_group"]].tolist())
        allowed = torch.tensor([(e // (E // G)) in allowed_groups for e in range(E)])
        chosen = routing.masked_fill(~allowed, float("-inf")).sort(descending=True).indices[:k]
        w = scores[chosen]
        if k > 1:
            w = w / (w.sum() + 1e-20)
        w = w * c["routed_scaling_factor"]
        for e, we in zip(chosen.tolist(), w):
            out[n] += we * ref_mlp(flat[n], W, p + f"experts.{e}.")
    y = out.view(x.shape)
    if c.get("num_shared_experts"):
        y = y + ref_mlp(x, W, p + "shared_experts.")
    return y


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def ref_forward(W, c, ids):
    """LLaDA2MoeModelLM.forward with the reference's 4D additive block-causal mask (block c['_block'],
    or none), positions 0..T-1; fp32 logits (1, T, V)."""
    H, Hkv, D, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    T = ids.shape[1]
    rd = int(D * c["partial_rotary_factor"])
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
    freqs = torch.arange(T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    L = c.get("_block")
    add = torch.zeros(T, T)
    if L:
        nb = -(-T // L)
        blocks = torch.tril(torch.ones(nb, nb)).repeat_interleave(L, 0).repeat_interleave(L, 1)[:T, :T]
        add = blocks.log()
    h = W["model.word_embeddings.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = ref_rms(h, W[p + "input_layernorm.weight"], eps)
        qkv = F.linear(x, W[p + "attention.query_key_value.weight"]).view(1, T, H + 2 * Hkv, D)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=-2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = ref_rms(q, W[p + "attention.query_layernorm.weight"], eps)
        k = ref_rms(k, W[p + "attention.key_layernorm.weight"], eps)
        q = torch.cat([q[..., :rd] * cos + rotate_half(q[..., :rd]) * sin, q[..., rd:]], -1)
        k = torch.cat([k[..., :rd] * cos + rotate_half(k[..., :rd]) * sin, k[..., rd:]], -1)
        k = k[:, :, None].expand(1, Hkv, H // Hkv, T, D).reshape(1, H, T, D)
        v = v[:, :, None].expand(1, Hkv, H // Hkv, T, D).reshape(1, H, T, D)
        att = torch.softmax(q @ k.transpose(2, 3) * D ** -0.5 + add, dim=-1) @ v
        h = h + F.linear(att.transpose(1, 2).reshape(1, T, H * D), W[p + "attention.dense.weight"])
        x = ref_rms(h, W[p + "post_attention_layernorm.weight"], eps)
        h = h + (ref_moe(x, W, p + "mlp.", c) if i >= c["first_k_dense_replace"] else ref_mlp(x, W, p + "mlp."))
    h = ref_rms(h, W["model.norm.weight"], eps)
    return F.linear(h, W["lm_head.weight"]).float()


def ref_generate(forward, prompt, gen_length, block_length, steps, threshold, eos_id, mask_id,
                 eos_early_stop=True, minimal_topk=1, stats=None):
    """LLaDA2MoeModelLM.generate at temperature 0 (no top-k / top-p), batch of one, no cache."""
    steps = min(steps, gen_length // minimal_topk)
    P = len(prompt)
    nb = (P + gen_length + block_length - 1) // block_length
    x = torch.full((1, nb * block_length), mask_id, dtype=torch.long)
    x[0, :P] = torch.tensor(prompt)
    base, rem = block_length // steps, block_length % steps
    sched = [base + (1 if i < rem else 0) for i in range(steps)]
    for b in range(P // block_length, nb):
        end = (b + 1) * block_length
        cur = x[:, :end]
        for step in range(steps):
            active = cur[:, -block_length:] == mask_id
            if active.sum() == 0:
                break
            logits = forward(cur, block_length)[:, -block_length:]
            probs = F.softmax(logits, -1)
            x0 = logits.argmax(-1)
            x0_p = probs.gather(-1, x0[..., None])[..., 0]
            conf = torch.where(active, x0_p, -torch.inf)
            high = conf[0] > threshold
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if high.sum().item() >= sched[step]:
                transfer[0] = high
                if stats is not None and high.sum().item() > sched[step]:
                    stats["threshold_steps"] += 1
            else:
                idx = torch.topk(conf[0], k=min(sched[step], active.sum().item())).indices
                transfer[0, idx] = True
            cur[:, -block_length:][transfer] = x0[transfer]
            if eos_early_stop and (x0[transfer] == eos_id).any():
                eos_pos = (cur[0, P:] == eos_id).nonzero()[0].item() + P
                if (cur[0, P:eos_pos] != mask_id).all():
                    if stats is not None:
                        stats["early_stop"] = True
                    return x[0, P:eos_pos + 1].tolist()
        if (x[0, P:end] == eos_id).any():
            break
    ans = x[0, P:P + gen_length]
    e = (ans == eos_id).nonzero()
    return ans[: e[0].item() + 1 if len(e) else gen_length].tolist()




def ref_config(path: Path, block: int | None) -> dict:
    return {**json.loads((path / "config.json").read_text()), "_block": block}


# ---------------------------------------------------------------- (a) forward parity

@pytest.mark.parametrize("block", [None, 8])
def test_forward_matches_reference(ckpt, loaded, block):
    from diffspec.models.llada2 import block_causal_mask

    model, _ = loaded
    W, c = ref_state(ckpt), ref_config(ckpt, block)
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (1, 21))
    ids[0, 15:] = MASK
    pos = torch.arange(21)
    mask = block_causal_mask(pos, pos, block) if block else None
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref = ref_forward(W, c, ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 1.0  # not a trivially small output


def test_loader_reads_published_layout(ckpt, loaded):
    model, tok = loaded
    cfg = model.config
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.rotary_dim) == (MASK, EOS, 8)  # mask from the tokenizer
    names = set(model.state_dict())
    assert "model.layers.0.mlp.gate_proj.weight" in names  # first_k_dense_replace = 1: a dense layer
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.expert_bias",
            "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
            "model.layers.2.attention.query_key_value.weight", "model.layers.2.attention.query_layernorm.weight",
            "model.layers.2.attention.dense.weight", "model.word_embeddings.weight", "lm_head.weight"} <= names
    # cost: a token runs 3 of the 8 routed experts
    assert model.active_params() < model.num_params()


# ---------------------------------------------------------------- (b, c) the sampler

PROMPTS = ["Hi", "The quick brown fox jumps", "Once upon a time, in a land far away, a dragon"]


def _reference_ids(ckpt, tok, prompt, eos_id=EOS, **kw):
    W = ref_state(ckpt)
    c = ref_config(ckpt, None)

    def forward(ids, block):
        return ref_forward(W, {**c, "_block": block}, ids)

    with torch.no_grad():
        return ref_generate(forward, tok.encode(prompt), eos_id=eos_id, mask_id=MASK, **kw)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sampler_matches_reference_loop(ckpt, loaded, prompt):
    """Prompt shorter than, longer than and spanning blocks; threshold 0.95 (the reference's)."""
    model, tok = loaded
    kw = dict(gen_length=20, block_length=8, steps=8, threshold=0.95)
    want = _reference_ids(ckpt, tok, prompt, **kw)
    for cache in ("none", "block"):
        res = llada2_generate(model, tok, [prompt], LLaDA2DecodeConfig(cache=cache, **kw))
        got = res.raw_ids[0][: len(want)]
        assert got == want, cache


def test_threshold_branch_and_uneven_schedule(ckpt, loaded):
    """A low threshold commits several cells per step; 3 steps for a block of 8 (3, 3, 2)."""
    model, tok = loaded
    stats = {"threshold_steps": 0}
    kw = dict(gen_length=24, block_length=8, steps=3, threshold=0.02)
    want = _reference_ids(ckpt, tok, PROMPTS[1], stats=stats, **kw)
    assert stats["threshold_steps"] > 0
    for cache in ("none", "block"):
        got = llada2_generate(model, tok, [PROMPTS[1]], LLaDA2DecodeConfig(cache=cache, **kw)).raw_ids[0]
        assert got[: len(want)] == want


def test_eos_early_stop(ckpt, loaded):
    """A token the random model emits mid-answer is made the EOS: both stop at the same cell."""
    import copy

    model, tok = loaded
    kw = dict(gen_length=24, block_length=8, steps=8, threshold=0.95)
    free = llada2_generate(model, tok, [PROMPTS[0]], LLaDA2DecodeConfig(eos_early_stop=False, **kw)).raw_ids[0]
    eos = free[12]
    m2 = copy.deepcopy(model)
    m2.config.eos_token_id = eos
    for early in (True, False):
        stats = {"threshold_steps": 0}
        want = _reference_ids(ckpt, tok, PROMPTS[0], eos_id=eos, eos_early_stop=early, stats=stats, **kw)
        assert want[-1] == eos and len(want) <= 13
        for cache in ("none", "block"):
            res = llada2_generate(m2, tok, [PROMPTS[0]], LLaDA2DecodeConfig(cache=cache, eos_early_stop=early, **kw))
            assert res.token_ids[0] + [eos] == want
            assert res.raw_ids[0][: len(want)] == want


def test_cache_is_exact_and_cheaper(loaded):
    model, tok = loaded
    kw = dict(gen_length=32, block_length=8, steps=8, threshold=0.95, eos_early_stop=False)
    out = {c: llada2_generate(model, tok, PROMPTS, LLaDA2DecodeConfig(cache=c, **kw)) for c in ("none", "block")}
    assert out["block"].raw_ids == out["none"].raw_ids

    def keys(res):  # query × key products charged over all forwards
        shapes = res.meter.models["model"].shapes
        return sum(int(q) * int(k) * n for s, n in shapes.items() for _, q, k in [s.split(",")])

    none, block = out["none"].meter, out["block"].meter
    assert keys(out["block"]) < keys(out["none"]) / 2
    assert block.tokens_processed < none.tokens_processed / 2
    assert block.flops < none.flops
    # the cache costs no extra forward: one per step, the finished block rides on the next block's first step
    assert block.models["model"].nfe == none.models["model"].nfe


# ---------------------------------------------------------------- (d) the CLI and the API

def test_cli_generate(ckpt):
    cli_generate(ckpt, "llada2", "--gen-length", "16", "--block-length", "8")


def test_api_generate_and_refusals(ckpt, loaded):
    from diffspec.api import generate

    res = generate("Hello", model=str(ckpt), method="llada2", gen_length=16, block_length=8, steps=8)
    assert len(res.raw_ids[0]) == 16 and res.config.block_length == 8
    for method in ("vanilla", "fast-dllm", "dkv-cache", "dream"):  # psd / dualdiffusion run within a block
        with pytest.raises(ValueError, match="block-causal LLaDA2 / SDAR model"):
            generate("Hello", model=str(ckpt), method=method, gen_length=16)
    model, tok = loaded
    with pytest.raises(ValueError, match="block-causal"):
        generate("Hello", model=model, tokenizer=tok, method="fast-dllm", gen_length=16)
    with pytest.raises(ValueError, match="do not apply to method 'llada2'"):
        generate("Hello", model=model, tokenizer=tok, method="llada2", policy="factor")
    with pytest.raises(ValueError, match="takes cache auto / block / none"):
        generate("Hello", model=model, tokenizer=tok, method="llada2", cache="dual")


def test_llada2_on_a_bidirectional_model(tiny_model, tokenizer):
    """LLaDA / Dream checkpoints run the same rules over the whole canvas, full attention, no cache
    ('auto' resolves to 'none'); the exact cache needs a block-causal model and says so."""
    from diffspec.api import generate

    res = generate("1+1=", model=tiny_model, tokenizer=tokenizer, method="llada2", gen_length=8, block_length=4)
    assert res.config.cache == "none" and res.meter.nfe > 0
    with pytest.raises(ValueError, match="cache 'block' needs a block-causal model"):
        generate("1+1=", model=tiny_model, tokenizer=tokenizer, method="llada2", gen_length=8, cache="block")


# ---------------------------------------------------------------- (e) bad checkpoints

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "m")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors named in the index is missing"):
        load_llada2(d)


@pytest.mark.parametrize("change, message", [
    ({"num_experts": 7}, "divisible by n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"score_function": "softmax"}, "score_function"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rotary_dim": 6}, "rotary_dim 6 disagrees"),  # some ports write rotary_dim
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
    ({"num_key_value_heads": 3}, "divisible by num_key_value_heads"),
    ({"eos_token_id": 10 ** 6}, "outside the vocabulary"),
])
def test_bad_config(ckpt, tmp_path, change, message):
    d = _copy(ckpt, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message):
        load_llada2(d)


def test_weights_that_do_not_fit_the_config(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_experts": 16}))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        load_llada2(d)


def test_eos_falls_back_to_the_pad_id(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "m")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("eos_token")
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    assert load_llada2(d)[0].config.eos_token_id == 156892  # config.json's pad_token_id


def test_no_mask_id_anywhere(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "m")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("mask_token")
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    write_tokenizer_json(d, {k: v for k, v in SPECIALS.items() if k != "<|mask|>"})
    with pytest.raises(CheckpointError, match="no mask_token_id"):
        load_llada2(d)


LOADER_RAW = {"model_type": "llada2_moe", "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1536,
       "moe_intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
       "head_dim": 64, "partial_rotary_factor": 0.5, "num_experts": 32, "num_shared_experts": 1,
       "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "use_qk_norm": True,
       "routed_scaling_factor": 2.5, "eos_token_id": 0, "pad_token_id": 0, "mask_token_id": 1}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_loader_peak_memory(tmp_path):
    """Sharded bf16 weights load in bf16 at about their own bytes (one tensor in flight)."""
    m = loader_peak(tmp_path, LOADER_RAW, "diffspec.models.llada2", "LLaDA2MoeConfig", "LLaDA2MoeModel",
                    "load_llada2")
    assert m["weights_bytes"] > 30e6
    assert 0.9 <= m["ratio"] <= 1.1, m  # the weights are really read, and nothing else of their size


def test_chat_template_comes_from_the_checkpoint(ckpt):
    from diffspec.api import chat_prompts, generate

    [prompt] = chat_prompts(str(ckpt), "llada2", ["2+2?"])
    assert prompt == "<role>USER</role>2+2?<role>ASSISTANT</role>"
    res = generate(prompt, model=str(ckpt), method="llada2", gen_length=8, block_length=8, steps=8)
    assert len(res.raw_ids[0]) == 8


def test_fast_dllm_factor_rule_in_the_block_sampler(loaded):
    """Issue #39 item 4: Fast-dLLM's factor rule replaces the threshold, with the schedule's top-k
    floor and the exact block cache underneath. A vanishing factor commits the floor only (the
    threshold rule at 1.0 does the same); a huge one commits every masked cell of a block at its
    first step (one forward a block); in between, ids stay equal with and without the cache."""
    from diffspec.api import build_config

    model, tok = loaded
    kw = dict(gen_length=32, block_length=8, steps=8, eos_early_stop=False)
    run = lambda **o: llada2_generate(model, tok, PROMPTS, LLaDA2DecodeConfig(**kw, **o))  # noqa: E731
    assert run(factor=1e-9).raw_ids == run(threshold=1.0).raw_ids
    every = run(factor=1e9)
    n_blocks = [-(-(len(tok.encode(p)) + 32) // 8) - len(tok.encode(p)) // 8 for p in PROMPTS]
    assert every.meter.models["model"].nfe == sum(n_blocks)
    mid = {c: run(factor=1.0, cache=c) for c in ("none", "block")}
    assert mid["none"].raw_ids == mid["block"].raw_ids
    assert sum(n_blocks) < mid["block"].meter.models["model"].nfe <= run(threshold=1.0).meter.models["model"].nfe
    with pytest.raises(ValueError, match="one of them"):
        build_config("llada2", factor=1.0, threshold=0.9)
    with pytest.raises(ValueError, match="factor must be"):
        LLaDA2DecodeConfig(factor=0.0)
