"""LLaDA2.x MoE (`model_type` "llada2_moe": inclusionAI/LLaDA2.0-mini, LLaDA2.0-flash), a block-diffusion LM.

What the network is (read from the published `modeling_llada2_moe.py`, the copy in the
`dllm` library's `pipelines/llada2/models/` and the Hub one; written here from scratch):

- **Attention**: one fused `attention.query_key_value` projection whose output rows are
  the query heads, then the key heads, then the value heads (grouped-query attention);
  optional biases (`use_qkv_bias` on it, `use_bias` on the output projection
  `attention.dense`); per-head RMSNorm on queries and keys (`use_qk_norm`:
  `attention.query_layernorm` / `attention.key_layernorm`, over `head_dim`) before RoPE;
  **partial RoPE**: rotate-half RoPE on the first `head_dim · partial_rotary_factor`
  channels of each head, the rest pass through; scale `head_dim ** -0.5`.
- **MLP**: the first `first_k_dense_replace` layers are a dense SwiGLU
  (`mlp.gate_proj/up_proj/down_proj`, `intermediate_size`); every later layer is a
  mixture of experts: `num_experts` SwiGLU experts of `moe_intermediate_size`
  (`mlp.experts.{j}.*`), a shared SwiGLU of `moe_intermediate_size · num_shared_experts`
  (`mlp.shared_experts.*`) added to every token, and a router `mlp.gate.weight`
  (num_experts × hidden) with a per-expert `mlp.gate.expert_bias`.
- **Router**: logits in fp32, scores = sigmoid(logits); the bias is added for *choosing*
  experts only; group-limited choice: the experts form `n_group` groups, a group scores
  the sum of its two best biased scores, the best `topk_group` groups stay eligible and
  the `num_experts_per_tok` best biased scores among them are chosen; the weights are
  the chosen *unbiased* sigmoid scores, divided by their sum (+1e-20) when more than one
  expert is chosen, times `routed_scaling_factor`. Expert outputs are mixed in fp32.
- Pre-norm residual blocks (`input_layernorm`, `post_attention_layernorm`), final
  `model.norm`, embedding `model.word_embeddings`, untied `lm_head` (unless
  `tie_word_embeddings`). The logit at position i predicts token i (no shift).
- **Block-causal attention**: the published sampler attends with a mask over blocks of
  `block_length` columns counted from column 0 (prompt included): a query in block b sees
  every key in blocks <= b. The model itself takes any bool mask; `block_causal_mask`
  builds that one. Keys of a finished block never change, so they can be cached exactly
  (`decoding/llada2.py`).

Config fields the reference code reads are mapped one to one; fields it does not
implement but a config.json could ask for (a non-SiLU activation, scaled RoPE, sliding
windows, a router score other than sigmoid) are refused rather than ignored.
`norm_topk_prob` and `router_dtype` are read but, as in the reference, do not change the
math (it always normalises over the chosen experts and routes in fp32).

Loading (`load_llada2`): the module is built on the meta device, every tensor name and
shape is checked against the safetensors *headers* (sharded with
`model.safetensors.index.json`, or single files) before any data is read, then tensors
are read one at a time into their own buffers, cast to the target dtype and assigned
(`models.dream.iter_safetensors`): peak host memory is the weights plus one tensor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import DecoderLM, HFConfigNames, ModelOutput, RMSNorm, TransformerLM, apply_rope, attend, \
    check_attention_sizes, check_positive_ints, check_special_ids, hf_kwargs, require_hf_keys, swiglu
from .matmul import Linear
from .tokenizer import Tokenizer

__all__ = ["MODEL_TYPE", "LLaDA2MoeConfig", "LLaDA2MoeModel", "block_causal_mask", "load_llada2",
           "is_llada2_config", "is_block_causal_config", "BLOCK_CAUSAL_METHODS", "BLOCK_CAUSAL_MODEL_TYPES",
           "BLOCK_CAUSAL_FAMILIES", "block_causal_family", "model_block_family", "check_block_causal_method",
           "masked_forward", "save_llada2"]

MODEL_TYPE = "llada2_moe"
# Each block-causal model_type's family, and the methods that decode each family: its block-diffusion
# samplers, and PSD / DualDiffusion run within a block. The bidirectional samplers (vanilla, fast-dllm,
# dkv-cache, dream) would let the prompt and early blocks attend to later, still-masked blocks, which
# these models never saw.
# LLaDA2's and SDAR's samplers read the logit of cell i at i, so either decodes either model; Fast-dLLM
# v2's network predicts cell i at i - 1 and opens every block with an AR token: only its own sampler.
_FAMILY_OF_TYPE = {MODEL_TYPE: "LLaDA2 / SDAR", "sdar": "LLaDA2 / SDAR", "Fast_dLLM_Qwen": "Fast-dLLM v2"}
BLOCK_CAUSAL_MODEL_TYPES = tuple(_FAMILY_OF_TYPE)
BLOCK_CAUSAL_FAMILIES = {"LLaDA2 / SDAR": ("llada2", "sdar", "psd", "dualdiffusion"),
                         "Fast-dLLM v2": ("fast-dllm-v2",)}
BLOCK_CAUSAL_METHODS = ("llada2", "sdar", "fast-dllm-v2")  # the families' own samplers


def is_llada2_config(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") == MODEL_TYPE


def is_block_causal_config(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") in BLOCK_CAUSAL_MODEL_TYPES


def block_causal_family(raw: dict[str, Any]) -> str | None:
    """The block-causal family (a key of BLOCK_CAUSAL_FAMILIES) of a config.json, None if bidirectional."""
    return _FAMILY_OF_TYPE.get(raw.get("model_type"))


def model_block_family(model: Any) -> str | None:
    """The block-causal family of a loaded model (its class's `block_family`), None if bidirectional."""
    if not getattr(model, "block_causal", False):
        return None
    return getattr(model, "block_family", "LLaDA2 / SDAR")


def check_block_causal_method(method: str | None, what: str, family: str = "LLaDA2 / SDAR") -> None:
    """One clear line when `method` cannot decode `what`, a block-causal model of `family`: a method
    that decodes bidirectionally, or another family's block sampler."""
    allowed = BLOCK_CAUSAL_FAMILIES[family]
    if method is not None and method not in allowed:
        why = ("is another block-diffusion family's sampler" if method in BLOCK_CAUSAL_METHODS
               else "decodes with full bidirectional attention")
        raise ValueError(f"method {method!r} {why}, but {what} is a block-causal {family} model; "
                         f"use method {' / '.join(allowed)}")


@dataclass
class LLaDA2MoeConfig(HFConfigNames):
    """The published config.json fields that change the math, with the reference's defaults
    where a config may leave one out (head_dim, partial_rotary_factor, rope_theta...).
    Defaults of the size fields are a tiny model for tests."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_qk_norm: bool = False
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    rotary_dim: int | None = None  # some ports write it; must equal head_dim * partial_rotary_factor
    num_experts: int | None = 8
    num_shared_experts: int | None = None
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    use_sliding_window: bool = False
    mask_token_id: int = 1
    eos_token_id: int = 0
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_attention_sizes(self, rope_head_dim=False)  # partial RoPE: the rotary dimension is checked below
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope scaling (rope_type {rope_type!r}) is not supported; only plain (default) RoPE")
        if self.use_sliding_window:
            raise ValueError("use_sliding_window=true is not supported; LLaDA2 attends over the whole window")
        if self.score_function != "sigmoid":
            raise ValueError(f"score_function {self.score_function!r} is not supported; the LLaDA2 router "
                             "scores experts with a sigmoid")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        rd = int(self.head_dim * self.partial_rotary_factor)
        if rd < 2 or rd % 2:
            raise ValueError(f"the rotary dimension head_dim * partial_rotary_factor = {rd} must be even and >= 2")
        if self.rotary_dim is not None and self.rotary_dim != rd:
            raise ValueError(f"rotary_dim {self.rotary_dim} disagrees with head_dim * partial_rotary_factor = {rd}")
        self.rotary_dim = rd
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        if not isinstance(self.first_k_dense_replace, int) or self.first_k_dense_replace < 0:
            raise ValueError(f"first_k_dense_replace must be an integer >= 0, got {self.first_k_dense_replace!r}")
        if self.num_shared_experts == 0:
            self.num_shared_experts = None
        if self.has_moe:
            check_positive_ints(self, ("num_experts", "num_experts_per_tok", "n_group", "topk_group",
                                       "moe_intermediate_size"))
            if self.num_shared_experts is not None:
                check_positive_ints(self, ("num_shared_experts",))
            if self.num_experts % self.n_group:
                raise ValueError(f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
            if self.num_experts // self.n_group < 2:
                raise ValueError(f"each of the n_group={self.n_group} expert groups needs >= 2 experts (a group "
                                 "scores the sum of its two best experts)")
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
            if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts of the "
                                 f"topk_group={self.topk_group} eligible groups")
            if not self.routed_scaling_factor > 0:
                raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        check_special_ids(self, required=("mask_token_id", "eos_token_id", "pad_token_id"))

    @property
    def has_moe(self) -> bool:
        return self.num_experts is not None and self.first_k_dense_replace < self.num_hidden_layers

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts is not None and i >= self.first_k_dense_replace

    @property
    def weight_tying(self) -> bool:
        return self.tie_word_embeddings

    def to_hf_dict(self) -> dict[str, Any]:
        """The published config.json names and values (what `from_hf_dict` reads back to this config).
        A dense model (num_experts None) writes `num_experts: null` and none of the router fields, so
        neither this loader nor the published modeling code builds an expert; `rotary_dim` is derived
        from `partial_rotary_factor` and not written, as in the published files."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "rotary_dim")}
        if self.num_experts is None:
            for key in _ROUTER_FIELDS:
                d.pop(key)
            # every layer dense also by the published rule (experts from layer first_k_dense_replace on)
            d["first_k_dense_replace"] = max(self.first_k_dense_replace, self.num_hidden_layers)
        d.update(self.extra)
        d.update(model_type=MODEL_TYPE, architectures=["LLaDA2MoeModelLM"])
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LLaDA2MoeConfig":
        """Read a published LLaDA2 config.json; unknown keys are kept in `extra`."""
        if d.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type is {d.get('model_type')!r}, not {MODEL_TYPE!r}")
        require_hf_keys(d, "LLaDA2")
        if d.get("num_experts") is not None and d.get("moe_intermediate_size") is None:
            raise ValueError("config has num_experts but no moe_intermediate_size")
        kw = hf_kwargs(cls, d)
        if "num_experts" in d and d["num_experts"] is None:
            kw["num_experts"] = None  # a dense model: no MoE layer at all
        return cls(**kw)


# The config fields that only an expert layer reads (left out of a dense model's config.json).
_ROUTER_FIELDS = ("moe_intermediate_size", "num_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
                  "routed_scaling_factor", "norm_topk_prob", "score_function", "moe_router_enable_expert_bias")


def block_causal_mask(q_positions: Tensor, k_positions: Tensor, block_length: int) -> Tensor:
    """(Q, K) bool: query column i may attend to key column j iff j's block <= i's block, blocks of
    `block_length` columns counted from column 0 (the published sampler's mask)."""
    return (k_positions[None, :] // block_length) <= (q_positions[:, None] // block_length)


class LLaDA2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inner, bias=False)
        self.up_proj = Linear(hidden, inner, bias=False)
        self.down_proj = Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class LLaDA2Gate(nn.Module):
    """The router's parameters: `weight` (E, hidden) and the persistent buffer `expert_bias` (E)."""

    def __init__(self, cfg: LLaDA2MoeConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))


def route(x: Tensor, weight: Tensor, expert_bias: Tensor, cfg: LLaDA2MoeConfig) -> tuple[Tensor, Tensor]:
    """(expert ids (N, k), mixing weights (N, k) fp32) for tokens x (N, hidden): sigmoid scores,
    biased group-limited top-k choice, unbiased normalised weights times the scaling factor."""
    scores = torch.sigmoid(F.linear(x.float(), weight.float()))
    biased = scores + expert_bias.float()
    N = x.shape[0]
    group_best2 = biased.view(N, cfg.n_group, -1).topk(2, dim=-1).values.sum(-1)  # (N, n_group)
    keep_groups = group_best2.topk(cfg.topk_group, dim=-1).indices
    eligible = torch.zeros_like(group_best2, dtype=torch.bool).scatter_(1, keep_groups, True)
    eligible = eligible.repeat_interleave(cfg.num_experts // cfg.n_group, dim=1)
    ids = biased.masked_fill(~eligible, -torch.inf).topk(cfg.num_experts_per_tok, dim=-1).indices
    w = scores.gather(1, ids)
    if cfg.num_experts_per_tok > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * cfg.routed_scaling_factor


class LLaDA2SparseMoe(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList(LLaDA2MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))
        self.gate = LLaDA2Gate(cfg)
        if cfg.num_shared_experts is not None:
            self.shared_experts = LLaDA2MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, w = route(flat, self.gate.weight, self.gate.expert_bias, self.cfg)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():  # only the experts some token chose run
            rows, slot = (ids == e).nonzero(as_tuple=True)
            y = self.experts[e](flat[rows])
            out.index_add_(0, rows, y.float() * w[rows, slot, None])
        y = out.to(x.dtype).view(shape)
        if self.cfg.num_shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class LLaDA2Attention(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.query_key_value = Linear(cfg.hidden_size, (H + 2 * Hkv) * D, bias=cfg.use_qkv_bias)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(D, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.dense = Linear(H * D, cfg.hidden_size, bias=cfg.use_bias)

    def _rope(self, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rd = self.cfg.rotary_dim
        if rd == t.shape[-1]:
            return apply_rope(t, cos, sin)
        return torch.cat([apply_rope(t[..., :rd], cos, sin), t[..., rd:]], dim=-1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, layer: int,
                kv_cache: Any) -> Tensor:
        cfg = self.cfg
        B, Q, _ = x.shape
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = self.query_key_value(x).view(B, Q, H + 2 * Hkv, cfg.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([H, Hkv, Hkv], dim=2))
        if cfg.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        return self.dense(attend(q, k, v, mask, False, layer, kv_cache))


class LLaDA2DecoderLayer(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig, index: int):
        super().__init__()
        self.attention = LLaDA2Attention(cfg)
        self.mlp = LLaDA2SparseMoe(cfg) if cfg.is_moe_layer(index) else LLaDA2MLP(cfg.hidden_size,
                                                                                   cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool, layer: int,
                kv_cache: Any) -> Tensor:
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask, layer, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class RoutedExpertCost:
    """The cost of a decoder with routed experts (LLaDA2, LLaDA-MoE): a token runs only the experts it
    chooses, so FLOPs count those, not every expert's weights. The model names its expert width."""

    config: Any

    def expert_width(self) -> int:
        raise NotImplementedError

    def active_params(self) -> int:
        """Parameters one token goes through: every routed expert a token does not use is left out."""
        cfg = self.config
        n = self.num_params()  # type: ignore[attr-defined]
        if cfg.num_experts is not None:
            per_expert = 3 * cfg.hidden_size * self.expert_width()
            n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
            n -= n_moe * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
        return n

    def forward_flops(self, n_query: int, n_keys: int) -> float:
        """2·active params·tokens (a token runs only its chosen experts) plus the attention term."""
        p = self.parts()  # type: ignore[attr-defined]
        return 2.0 * self.active_params() * n_query + 4.0 * len(p.blocks) * p.attn_dim * n_query * n_keys


class LLaDA2MoeModel(RoutedExpertCost, DecoderLM):
    """LLaDA2 MoE with the published module names (`model.word_embeddings`, `model.layers.{i}.attention.*`,
    `model.layers.{i}.mlp.*`, `model.norm`, `lm_head`). `logits[:, i]` predicts token i."""

    logits_shifted = False
    block_causal = True  # decoded only by the block-causal sampler (`decoding/llada2.py`)
    embed_name = "word_embeddings"  # `layers.DecoderLM`'s modules under LLaDA2's names

    config: LLaDA2MoeConfig

    @staticmethod
    def make_layer(cfg: LLaDA2MoeConfig, index: int) -> nn.Module:
        return LLaDA2DecoderLayer(cfg, index)

    def expert_width(self) -> int:
        return self.config.moe_intermediate_size

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, attention_mask: Tensor | None = None,
                kv_cache: Any = None, output_hidden_states: bool = False) -> ModelOutput:
        """input_ids (B, Q); positions (Q,) or (B, Q), default 0..Q-1; attention_mask a bool mask over
        the keys attended (cached keys first, then the fed ones), (Q, K) or (B, Q, K), True = attend, or
        None for all of them (`block_causal_mask` builds the published one); kv_cache a
        `layers.KVCacheHook` (`decoding.llada2.BlockKVCache`)."""
        return masked_forward(self, input_ids, positions, attention_mask, kv_cache, output_hidden_states,
                              self.config.rotary_dim)


def masked_forward(model: TransformerLM, input_ids: Tensor, positions: Tensor | None, attention_mask: Tensor | None,
                   kv_cache: Any, output_hidden_states: bool, rotary_dim: int) -> ModelOutput:
    """The forward of the block-causal models (LLaDA2, SDAR): RoPE over `rotary_dim` channels, any bool
    attention mask over the keys (or none), an optional KV-cache hook; logits not shifted."""
    def mask_for(B: int, Q: int) -> Tensor | None:
        if attention_mask is None:
            return None
        if attention_mask.dim() not in (2, 3) or attention_mask.shape[-2] != Q:
            raise ValueError(f"attention_mask must be (Q, K) or (B, Q, K) with Q = {Q}, "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(torch.bool)
        return mask[None, None] if mask.dim() == 2 else mask[:, None]

    logits, hidden = model.rope_forward(input_ids, positions, mask_for, kv_cache, output_hidden_states, rotary_dim)
    return ModelOutput(logits=logits, hidden_states=hidden)


# ---------------------------------------------------------------- loading

def parse_config(path: Path, raw: dict[str, Any], tok: Tokenizer) -> LLaDA2MoeConfig:
    """The config of a checkpoint directory, special ids completed from the tokenizer files: the
    published config.json names `pad_token_id` (156892) but no mask id and, in the copies we could
    read, no `eos_token_id`; the mask comes from the tokenizer (`mask_token` / `<|mask|>`), EOS from
    tokenizer_config.json's `eos_token`, else `pad_token_id` (the reference `generate`'s EOS
    default 156892 is the pad id). The tokenizer must fit the embedding."""
    from .dream import config_from_files

    return config_from_files(path, raw, tok, LLaDA2MoeConfig.from_hf_dict, only=("mask_token_id", "eos_token_id"),
                             fallback={"eos_token_id": "pad_token_id"})


def load_llada2(path: str | Path, device: str | torch.device | None = "cpu",
                dtype: str | torch.dtype | None = None) -> tuple[LLaDA2MoeModel, Tokenizer]:
    """Load a LLaDA2 MoE directory (config.json, sharded or single safetensors, tokenizer.json).

    dtype None / "auto": bfloat16 on CUDA, float32 on CPU. Every tensor's name and shape is checked
    against the headers before any weight is read; peak memory is the weights plus one tensor."""
    from .dream import load_checked, on_meta, open_checkpoint

    path, dev, dt, raw, tok = open_checkpoint(path, device, dtype, lambda path, raw: None if is_llada2_config(raw) else
                                              f"{path}/config.json has model_type {raw.get('model_type')!r}, "
                                              f"not {MODEL_TYPE!r}")
    cfg = parse_config(path, raw, tok)
    model = load_checked(path, on_meta(LLaDA2MoeModel, cfg), dt, dev, tied_head=cfg.tie_word_embeddings,
                         optional=() if cfg.moe_router_enable_expert_bias else ("mlp.gate.expert_bias",))
    return model, tok


def save_llada2(model: LLaDA2MoeModel, tokenizer: Tokenizer, path: str | Path,
                dtype: torch.dtype | None = None) -> Path:
    """Write `model` in the published LLaDA2 layout: config.json (`LLaDA2MoeConfig.to_hf_dict`, with
    the mask and EOS ids, which the published files leave to the tokenizer), model.safetensors
    under the published tensor names (the module's own: nothing is renamed), tokenizer.json and a
    tokenizer_config.json naming the EOS / mask / pad token texts, so `load_llada2` (and `--model`)
    reads it back. `dtype` casts the floating-point tensors (bf16 halves a bundled checkpoint)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw = cfg.to_hf_dict()
    if dtype is not None:
        raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tokenizer.save(path / "tokenizer.json")
    names = {"eos_token": cfg.eos_token_id, "pad_token": cfg.pad_token_id, "mask_token": cfg.mask_token_id}
    texts = {k: tokenizer.hf.id_to_token(v) for k, v in names.items() if v is not None}
    (path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in texts.items() if v is not None},
                                                           indent=2) + "\n")
    return path
