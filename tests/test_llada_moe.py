"""LLaDA-MoE (config.json model_type "llada", architectures LLaDAMoEModelLM): a tiny checkpoint in the
published layout loads, its forward matches the reference math, and the LLaDA methods decode it.

The reference here is written inside this file from the published `modeling_lladamoe.py` (read in
the copies of inclusionAI/dInfer `tools/modeling_fused_lladamoe.py` and the `dllm` library's
`pipelines/llada/models/modeling_lladamoe.py`): `LLaDAMoESparseMoeBlock.forward` (softmax router,
expert bias added to the probabilities, top-k values as weights, no renormalisation),
`LLaDAMoEAttention` (q/k RMSNorm over `reshape(-1, head_dim)`, clamping, partial rotate-half RoPE,
eager softmax with the additive padding mask), `LLaDAMoEDecoderLayer` (the shared expert on the
layer) — in plain torch over the state dict read back from the safetensors shards, sharing no code
with `diffspec.models.llada_moe`. The sampler reference is LLaDA's `generate` (`test_sampler.py`).

config.json: the keys of the published `configuration_lladamoe.py` with LLaDA-MoE-7B-A1B's values
where a source states them (hidden 2048, 16 layers of 64 experts, top-8, expert 1024 / dense 8192,
16 heads, rope θ 50000, q/k norm, 8192 positions, vocabulary 157184, EOS / pad 156892; no mask
id: 156895 is the published `generate`'s, found here through the tokenizer's `<|mask|>`) and the
sizes shrunk. The token texts and the chat template are our stand-ins.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffspec.models.checkpoint import CheckpointError, load_model, load_tokenizer
from diffspec.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel, is_llada_moe_config, load_llada_moe
from block_diffusion_common import ref_state, loader_peak, cli_generate, random_state, ref_rms
from test_real_configs import decoder_entries, write_sharded, write_tokenizer_json
from test_sampler import llada_generate_greedy

LLADA_MOE_7B = {
    "architectures": ["LLaDAMoEModelLM"],
    "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                 "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                 "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
    "model_type": "llada", "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "clip_qkv": None, "dense_intermediate_size": 8192, "eos_token_id": 156892, "expert_intermediate_size": 1024,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "max_position_embeddings": 8192,
    "moe_layer_freq": [1] * 16, "moe_router_enable_expert_bias": False, "moe_router_score_function": "softmax",
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
    "num_hidden_layers": 16, "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 156892,
    "partial_rotary_factor": 1.0, "qk_layernorm": True, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 50000.0, "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01, "router_num_group": None,
    "router_topk_group": None, "shared_expert_intermediate_size": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False, "vocab_size": 157184,
}
TINY = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
        "dense_intermediate_size": 48, "expert_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 3,
        "moe_layer_freq": [1, 1]}
# Every switch the published checkpoint leaves off, on: biases, GQA, partial RoPE, clamping, a dense
# first layer, a shared expert, the expert bias (which also weights the mix), a tied head.
VARIANT = {**TINY, "attention_bias": True, "num_key_value_heads": 2, "partial_rotary_factor": 0.5, "clip_qkv": 1.5,
           "num_hidden_layers": 3, "moe_layer_freq": [0, 1, 1], "shared_expert_intermediate_size": 24,
           "moe_router_enable_expert_bias": True, "tie_word_embeddings": True}
EOS, MASK = 156892, 156895
SPECIALS = {"<|endoftext|>": EOS, "<|mask|>": MASK}
TEMPLATE = ("{% for m in messages %}<role>{{ m['role'] | upper }}</role>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}")


def write_checkpoint(path: Path, config: dict, seed: int = 0) -> Path:
    """Random weights (large enough to route and attend unevenly; expert biases that change the choice)
    as bf16 shards with an index, as on the Hub, plus tokenizer files naming no mask token."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    cfg = LLaDAMoEConfig.from_hf_dict({**config, "mask_token_id": MASK})
    torch.manual_seed(seed)
    write_sharded(path, random_state(LLaDAMoEModel(cfg), {"expert_bias": 0.05, "embed_tokens.weight": 1.0}))
    write_tokenizer_json(path, SPECIALS)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder_entries(SPECIALS), "chat_template": TEMPLATE, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llada_moe")
    return {"published": write_checkpoint(root / "base", {**LLADA_MOE_7B, **TINY}),
            "variant": write_checkpoint(root / "variant", {**LLADA_MOE_7B, **VARIANT}, seed=1)}


@pytest.fixture(scope="module")
def loaded(dirs):
    return {name: load_llada_moe(d, dtype="float32") for name, d in dirs.items()}


# ---------------------------------------------------------------- the reference, in plain torch



def lin(x, W, name):
    return F.linear(x, W[name + ".weight"], W.get(name + ".bias"))


def ref_mlp(x, W, p):
    return lin(F.silu(lin(x, W, p + "gate_proj")) * lin(x, W, p + "up_proj"), W, p + "down_proj")


def ref_moe(x, W, p, c):
    """LLaDAMoESparseMoeBlock.forward, token by token."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        probs = torch.softmax(lin(flat[n], W, p + "gate").float(), dim=-1)
        if p + "expert_bias" in W:
            probs = probs + W[p + "expert_bias"]
        for e in probs.sort(descending=True).indices[: c["num_experts_per_tok"]].tolist():
            out[n] += probs[e] * ref_mlp(flat[n], W, p + f"experts.{e}.")
    return out.view(x.shape)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def ref_attention(x, W, p, c, cos, sin, add):
    B, T, _ = x.shape
    H, Hkv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    D, rd, clip = c["hidden_size"] // H, cos.shape[-1], c.get("clip_qkv")
    q, k, v = (lin(x, W, p + f"self_attn.{n}_proj") for n in "qkv")
    if c["qk_layernorm"]:
        q = ref_rms(q.reshape(-1, D), W[p + "self_attn.q_norm.weight"], eps).reshape(B, T, -1)
        k = ref_rms(k.reshape(-1, D), W[p + "self_attn.k_norm.weight"], eps).reshape(B, T, -1)
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    q = torch.cat([q[..., :rd] * cos + rotate_half(q[..., :rd]) * sin, q[..., rd:]], -1)
    k = torch.cat([k[..., :rd] * cos + rotate_half(k[..., :rd]) * sin, k[..., rd:]], -1)
    k = k[:, :, None].expand(B, Hkv, H // Hkv, T, D).reshape(B, H, T, D)
    v = v[:, :, None].expand(B, Hkv, H // Hkv, T, D).reshape(B, H, T, D)
    att = torch.softmax(q @ k.transpose(2, 3) / D ** 0.5 + add, dim=-1) @ v
    return lin(att.transpose(1, 2).reshape(B, T, H * D), W, p + "self_attn.o_proj")


def ref_forward(W, c, ids, key_mask=None):
    """LLaDAMoEModelLM.forward, positions 0..T-1, the 2D padding mask made additive; fp32 logits."""
    B, T = ids.shape
    D = c["hidden_size"] // c["num_attention_heads"]
    rd = int(D * c.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
    emb = torch.arange(T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((emb, emb), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    add = torch.zeros(B, 1, T, T)
    if key_mask is not None:
        add = torch.where(key_mask[:, None, None, :], 0.0, torch.finfo(torch.float32).min).expand(B, 1, T, T)
    h = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p, eps = f"model.layers.{i}.", c["rms_norm_eps"]
        h = h + ref_attention(ref_rms(h, W[p + "input_layernorm.weight"], eps), W, p, c, cos, sin, add)
        x = ref_rms(h, W[p + "post_attention_layernorm.weight"], eps)
        if c["moe_layer_freq"][i] == 0:
            h = h + ref_mlp(x, W, p + "mlp.")
            continue
        y = ref_moe(x, W, p + "mlp.", c)
        if c.get("shared_expert_intermediate_size") is not None:
            y = y + ref_mlp(x, W, p + "shared_expert.")
        h = h + y
    h = ref_rms(h, W["model.norm.weight"], c["rms_norm_eps"])
    return F.linear(h, W.get("lm_head.weight", W["model.embed_tokens.weight"])).float()


def ref_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# ---------------------------------------------------------------- forward parity

@pytest.mark.parametrize("name", ["published", "variant"])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_matches_reference(dirs, loaded, name, padded):
    model, _ = loaded[name]
    W, c = ref_state(dirs[name]), ref_config(dirs[name])
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 19))
    ids[:, 12:] = MASK
    key_mask = None
    if padded:  # row 1 attends to its first 15 keys only
        key_mask = torch.ones(2, 19, dtype=torch.bool)
        key_mask[1, 15:] = False
    with torch.no_grad():
        ours = model(ids, attention_mask=key_mask).logits
        ref = ref_forward(W, c, ids, key_mask)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 1.0  # not a trivially small output


def test_variant_switches_change_the_output(dirs, loaded):
    """The switches the parity test covers really act: clamping and the expert bias each move the logits."""
    import copy

    model, _ = loaded["variant"]
    ids = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        base = model(ids).logits
        for change in ({"clip_qkv": None}, {"expert_bias": 0.0}):
            m2 = copy.deepcopy(model)
            if "clip_qkv" in change:
                m2.config.clip_qkv = None
            else:
                for layer in m2.model.layers[1:]:
                    layer.mlp.expert_bias.zero_()
            assert (m2(ids).logits - base).abs().max().item() > 1e-3, change


def test_loader_reads_published_layout(dirs, loaded):
    model, tok = loaded["published"]
    cfg = model.config
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (MASK, EOS, EOS)  # mask from the tokenizer
    assert cfg.head_dim == 8 and cfg.rotary_dim == 8 and cfg.extra["norm_topk_prob"] is False
    names = set(model.state_dict())
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight",
            "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.experts.7.down_proj.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert not any("expert_bias" in n or "shared_expert" in n or ".bias" in n for n in names)
    variant = set(loaded["variant"][0].state_dict())
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.expert_bias",
            "model.layers.2.shared_expert.up_proj.weight", "model.layers.0.self_attn.o_proj.bias"} <= variant
    assert "lm_head.weight" not in variant  # tied
    for m in (model, loaded["variant"][0]):  # a token runs k of the routed experts: the rest are not counted
        cfg, experts = m.config, {}
        for n, w in m.named_parameters():
            if ".mlp.experts." in n:
                layer = n.split(".mlp.experts.")[0]
                experts.setdefault(layer, []).append(w.numel())
        unused = sum(sum(ws) // cfg.num_experts * (cfg.num_experts - cfg.num_experts_per_tok) for ws in experts.values())
        assert experts and m.active_params() == m.num_params() - unused
    assert is_llada_moe_config(ref_config(dirs["published"]))


# ---------------------------------------------------------------- the LLaDA samplers on it

PROMPTS = ["Hi", "The quick brown fox jumps over"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_vanilla_matches_llada_generate_on_the_reference_forward(dirs, prompt):
    """`diffspec generate --method vanilla` through the API on the directory gives LLaDA's `generate`
    (temperature 0, low-confidence remasking) run on the reference forward, token for token."""
    from diffspec.api import generate

    W, c = ref_state(dirs["published"]), ref_config(dirs["published"])

    class Ref:
        def __call__(self, x):
            return type("Out", (), {"logits": ref_forward(W, c, x)})

    res = generate(prompt, model=str(dirs["published"]), method="vanilla", gen_length=16, block_length=8, steps=8)
    ids = torch.tensor([load_tokenizer(dirs["published"]).encode(prompt)])
    with torch.no_grad():
        want = llada_generate_greedy(Ref(), ids, 8, 16, 8, MASK)
    assert res.raw_ids[0] == want


def test_every_llada_method_runs(loaded):
    from diffspec.api import generate

    model, tok = loaded["variant"]
    common = dict(gen_length=16, block_length=8, steps=16)
    for method, opts in [("vanilla", {}), ("fast-dllm", {"cache": "dual", "policy": "threshold"}),
                         ("dkv-cache", {"cache": "dkv-decode"}), ("psd", {}), ("dualdiffusion", {}),
                         ("dream", {"gen_length": 16, "steps": 16})]:
        kw = opts if method == "dream" else {**common, **opts}
        res = generate(PROMPTS, model=model, tokenizer=tok, method=method, **kw)
        assert len(res.raw_ids) == 2 and all(len(r) == 16 for r in res.raw_ids), method
        assert MASK not in sum(res.raw_ids, []), method
        assert res.meter.flops > 0, method


def test_exact_caches_on_a_one_layer_model(tokenizer):
    """One layer makes every cache exact (a cell's K/V depend on its own token only; routing is per
    token): fast-dLLM's caches and dKV-Cache decode what the uncached loop decodes, for less."""
    from diffspec.decoding.config import DecodeConfig
    from diffspec.decoding.diffusion import diffusion_generate
    from diffspec.models.tokenizer import EOS_TOKEN, MASK_TOKEN

    cfg = LLaDAMoEConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, expert_intermediate_size=16,
                         shared_expert_intermediate_size=16, moe_router_enable_expert_bias=True, clip_qkv=1.5,
                         partial_rotary_factor=0.5, mask_token_id=tokenizer.token_to_id(MASK_TOKEN),
                         eos_token_id=tokenizer.token_to_id(EOS_TOKEN), max_position_embeddings=128)
    torch.manual_seed(3)
    model = LLaDAMoEModel(cfg).eval()
    model.load_state_dict(random_state(model, {"expert_bias": 0.05}))
    prompts = ["Question: 12+7=", "Question: what is 3 * 45?\nAnswer:"]
    base = dict(gen_length=16, block_length=8, steps=16, batch_size=2)
    ref = diffusion_generate(model, tokenizer, prompts, DecodeConfig(**base))
    for cache in ("prefix", "dual", "dkv-decode"):
        out = diffusion_generate(model, tokenizer, prompts, DecodeConfig(cache=cache, **base))
        assert out.raw_ids == ref.raw_ids, cache
        assert out.meter.tokens_processed < ref.meter.tokens_processed, cache


# ---------------------------------------------------------------- the CLI, the API, dispatch

@pytest.mark.parametrize("method, flags", [("vanilla", ()), ("fast-dllm", ("--cache", "dual"))])
def test_cli_generate(dirs, method, flags):
    cli_generate(dirs["published"], method, "--gen-length", "8", "--block-length", "8", *flags)


def test_dispatch_and_chat_template(dirs):
    from diffspec.api import chat_prompts, load_any

    model, _ = load_any(dirs["published"], dtype="float32")
    assert isinstance(model, LLaDAMoEModel)
    [prompt] = chat_prompts(str(dirs["published"]), "vanilla", ["2+2?"])
    assert prompt == "<role>USER</role>2+2?<role>ASSISTANT</role>"
    with pytest.raises(CheckpointError, match="is a LLaDA-MoE checkpoint.*load_llada_moe"):  # LLaDA-8B's loader
        load_model(dirs["published"])
    with pytest.raises(ValueError, match="method 'ar' needs an"):
        from diffspec.api import generate

        generate("Hi", model=str(dirs["published"]), method="ar")


# ---------------------------------------------------------------- special ids, bad checkpoints

def _copy(src: Path, dst: Path, config: dict | None = None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if config is not None:
        raw = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**raw, **config}))
    return dst


def test_special_ids_come_from_the_files(dirs, tmp_path):
    d = _copy(dirs["published"], tmp_path / "ids", {"mask_token_id": 156894, "eos_token_id": 156893})
    cfg = load_llada_moe(d)[0].config
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (156894, 156893, EOS)
    d2 = _copy(dirs["published"], tmp_path / "no-eos", {"eos_token_id": None})
    tc = json.loads((d2 / "tokenizer_config.json").read_text())
    tc.pop("eos_token")
    (d2 / "tokenizer_config.json").write_text(json.dumps(tc))
    assert load_llada_moe(d2)[0].config.eos_token_id == EOS  # config.json's pad_token_id


def test_no_mask_id_anywhere(dirs, tmp_path):
    d = _copy(dirs["published"], tmp_path / "m")
    write_tokenizer_json(d, {"<|endoftext|>": EOS})
    with pytest.raises(CheckpointError, match="no mask_token_id"):
        load_llada_moe(d)


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"moe_router_score_function": "sigmoid"}, "moe_router_score_function 'sigmoid' is not supported"),
    ({"moe_layer_freq": [1]}, "moe_layer_freq must list"),
    ({"moe_layer_freq": [1, 2]}, "moe_layer_freq must list"),
    ({"moe_layer_freq": [0, 1], "dense_intermediate_size": None}, "dense_intermediate_size"),
    ({"num_experts_per_tok": 9}, "exceeds num_experts"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
    ({"partial_rotary_factor": 0.1}, "rotary dimension"),
    ({"head_dim": 16}, "head_dim 16"),
    ({"num_key_value_heads": 3}, "divisible by num_key_value_heads"),
    ({"clip_qkv": -1}, "clip_qkv"),
    ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
    ({"qk_layernorm": None}, "lacks LLaDA-MoE keys \\['qk_layernorm'\\]"),
    ({"eos_token_id": 10 ** 6}, "outside the vocabulary"),
    ({"mask_token_id": EOS}, "must differ"),
])
def test_bad_config(dirs, tmp_path, change, message):
    d = _copy(dirs["published"], tmp_path / "m", change)
    with pytest.raises(CheckpointError, match=message):
        load_llada_moe(d)


def test_weights_that_do_not_fit_the_config(dirs, tmp_path):
    d = _copy(dirs["published"], tmp_path / "m", {"moe_router_enable_expert_bias": True})
    with pytest.raises(CheckpointError, match="do not match config.json.*expert_bias"):
        load_llada_moe(d)
    d2 = _copy(dirs["published"], tmp_path / "m2")
    (d2 / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors named in the index is missing"):
        load_llada_moe(d2)


LOADER_RAW = {"model_type": "llada", "architectures": ["LLaDAMoEModelLM"], "vocab_size": 8192, "hidden_size": 512,
       "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "qk_layernorm": True,
       "rope_theta": 50000.0, "num_experts": 16, "num_experts_per_tok": 4, "expert_intermediate_size": 256,
       "moe_layer_freq": [1, 1, 1, 1], "eos_token_id": 0, "pad_token_id": 0, "mask_token_id": 1}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_loader_peak_memory(tmp_path):
    """Sharded bf16 weights load in bf16 at about their own bytes (one tensor in flight)."""
    m = loader_peak(tmp_path, LOADER_RAW, "diffspec.models.llada_moe", "LLaDAMoEConfig", "LLaDAMoEModel", "load_llada_moe")
    assert m["weights_bytes"] > 30e6
    assert 0.9 <= m["ratio"] <= 1.1, m  # the weights are really read, and nothing else of their size
