"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base / -Instruct): LLaDA's masked diffusion on an OLMoE-style
mixture-of-experts transformer, with full bidirectional attention and unshifted logits.

What the network is (read from the published `modeling_lladamoe.py` / `configuration_lladamoe.py`
as the Hub ships them, via the copies in inclusionAI/dInfer `tools/` and the `dllm` library's
`pipelines/llada/models/`, and llama.cpp's `LLADA_MOE` graph; written here from scratch):

- **Attention**: q/k/v/o projections `self_attn.{q,k,v,o}_proj` (biases on all four iff
  `attention_bias`), grouped-query heads, `head_dim = hidden_size // num_attention_heads` (the
  config has no head_dim key); with `qk_layernorm` a per-head RMSNorm (`self_attn.q_norm` /
  `k_norm`, over head_dim) on queries and keys; then, with `clip_qkv`, q, k and v clamped to
  ±clip_qkv; rotate-half RoPE (θ = `rope_theta`) on the first `head_dim · partial_rotary_factor`
  channels of each head; scale `head_dim ** -0.5`; no causal mask (`is_causal = False`).
- **MLP**: layer i is a mixture of experts unless `moe_layer_freq[i] == 0` (then a dense SwiGLU
  `mlp.{gate,up,down}_proj` of `dense_intermediate_size`). A MoE layer has a router `mlp.gate`
  (Linear, no bias), `num_experts` SwiGLU experts `mlp.experts.{j}.*` of
  `expert_intermediate_size` and, with `moe_router_enable_expert_bias`, a buffer
  `mlp.expert_bias`; with `shared_expert_intermediate_size` a shared SwiGLU
  `shared_expert.*` that sits on the *layer* (not under `mlp`) and is added for every token.
- **Router**: logits = gate(x) in the model's dtype; probabilities = softmax over all experts in
  fp32; `expert_bias`, if any, is added to the probabilities; the `num_experts_per_tok` largest
  values are both the choice and the mixing weights (the bias is *not* removed for mixing, unlike
  LLaDA2); no renormalisation; the weights are cast to the model's dtype and the chosen experts'
  outputs, each times its weight, summed in that dtype.
- Pre-norm residual blocks (`input_layernorm`, `post_attention_layernorm`), final `model.norm`,
  embedding `model.embed_tokens`, untied `lm_head` (unless `tie_word_embeddings`). The logit at
  position i predicts token i (no shift), as LLaDA-8B's: every LLaDA method decodes it.

Config fields the reference reads but that do not change its math are read and kept in `extra`:
`norm_topk_prob` and `routed_scaling_factor` (the published MoE block hard-codes no
renormalisation and no scaling), `router_num_group` / `router_topk_group` (no group-limited
routing), `router_aux_loss_coef` / `output_router_logits` (training only). What the reference
cannot run and a config.json could ask for (a non-SiLU activation, scaled RoPE, a router score
other than softmax, a `head_dim` other than hidden_size // heads) is refused with the field's name.

`model_type` is "llada" (the published configuration class's), shared with LLaDA-8B, whose
config.json names `d_model`; `is_llada_moe_config` tells them apart by that key and the MoE
architecture / keys. Special ids: `eos_token_id` / `pad_token_id` (156892) come from config.json;
the mask id (156895 in the published `generate` and in dInfer) is not in it, so it is read from
config.json if a port writes one, else from the tokenizer files (`mask_token` / `<|mask|>`).

Loading (`load_llada_moe`) is LLaDA2's: the module is built on the meta device, every tensor
name and shape is checked against the safetensors headers (sharded with an index, or single
files) before any data is read, then one tensor at a time is read into the target dtype
(`models.dream.load_checked`): peak host memory is the weights plus one tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .layers import (DecoderLM, HFConfigNames, MaskedKVCacheHook, ModelOutput, RMSNorm, SwiGLU, apply_rope, attend,
                     bidirectional_mask, check_positive_ints, check_special_ids, hf_kwargs)
from .matmul import Linear
from .llada2 import RoutedExpertCost
from .tokenizer import Tokenizer

__all__ = ["LLADA_MOE_ARCHITECTURES", "LLaDAMoEConfig", "LLaDAMoEModel", "is_llada_moe_config", "load_llada_moe",
           "route"]

# The published config.json's model_type is LLaDA-8B's; ports of the modeling code (the `dllm`
# library) save their own names, which mean the same network.
LLADA_MOE_MODEL_TYPES = ("llada", "llada_moe", "lladamoe")
LLADA_MOE_ARCHITECTURES = ("LLaDAMoEModelLM", "LLaDAMoEModel")
# Keys whose absence the two reference copies fill differently (or not at all): a config must name them.
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
             "num_experts_per_tok", "expert_intermediate_size", "rope_theta", "qk_layernorm")


def is_llada_moe_config(raw: dict[str, Any]) -> bool:
    """A LLaDA-MoE config.json: model_type "llada" (or a port's name for it) without LLaDA-8B's
    `d_model`, and the MoE architecture or its expert keys."""
    if str(raw.get("model_type")).lower() not in LLADA_MOE_MODEL_TYPES or "d_model" in raw:
        return False
    archs = raw.get("architectures") or []
    return any(a in LLADA_MOE_ARCHITECTURES for a in archs) or "expert_intermediate_size" in raw


@dataclass
class LLaDAMoEConfig(HFConfigNames):
    """The published config.json fields that change the math. Defaults of the size fields are a
    tiny model for tests; the others are the reference's where both copies agree."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None  # no published key: hidden_size // num_attention_heads, checked if given
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 50000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    hidden_act: str = "silu"
    attention_bias: bool = False
    qk_layernorm: bool = True
    clip_qkv: float | None = None
    dense_intermediate_size: int | None = None
    expert_intermediate_size: int = 32
    shared_expert_intermediate_size: int | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layer_freq: list[int] | None = None  # None: every layer is a MoE layer
    moe_router_score_function: str | None = "softmax"
    moe_router_enable_expert_bias: bool = False
    tie_word_embeddings: bool = False
    mask_token_id: int = 1
    eos_token_id: int = 0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_attention()
        self._check_moe()
        self._check_ids()

    def _check_attention(self) -> None:
        check_positive_ints(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "max_position_embeddings"))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        derived = self.hidden_size // self.num_attention_heads
        if self.head_dim is not None and self.head_dim != derived:
            raise ValueError(f"head_dim {self.head_dim} is not hidden_size // num_attention_heads = {derived}; "
                             "LLaDA-MoE derives it and has no other")
        self.head_dim = derived
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        rope = self.rope_scaling or {}
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {self.rope_scaling!r} is not supported; only plain (default) RoPE")
        if not _is_number(self.partial_rotary_factor) or not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"the rotary dimension head_dim * partial_rotary_factor = {self.rotary_dim} must be "
                             "even and >= 2")
        for name in ("rope_theta", "rms_norm_eps"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        if self.clip_qkv is not None and (not _is_number(self.clip_qkv) or not self.clip_qkv > 0):
            raise ValueError(f"clip_qkv must be a number > 0 or null, got {self.clip_qkv!r}")
        for name in ("attention_bias", "qk_layernorm", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _check_moe(self) -> None:
        L = self.num_hidden_layers
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [1] * L
        freq = self.moe_layer_freq
        if not isinstance(freq, list) or len(freq) != L or any(type(f) is not int or f not in (0, 1) for f in freq):
            raise ValueError(f"moe_layer_freq must list 0 (dense) or 1 (MoE) for each of the {L} layers, "
                             f"got {freq!r}")
        if any(f == 0 for f in freq):
            check_positive_ints(self, ("dense_intermediate_size",))
        if any(freq):
            check_positive_ints(self, ("num_experts", "num_experts_per_tok", "expert_intermediate_size"))
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                                 f"({self.num_experts})")
        if self.shared_expert_intermediate_size is not None:
            check_positive_ints(self, ("shared_expert_intermediate_size",))
        if self.moe_router_score_function not in (None, "softmax"):
            raise ValueError(f"moe_router_score_function {self.moe_router_score_function!r} is not supported: the "
                             "LLaDA-MoE router scores experts with a softmax (use null or 'softmax')")
        if self.moe_router_enable_expert_bias is None:  # the published class's default: no bias
            self.moe_router_enable_expert_bias = False
        if not isinstance(self.moe_router_enable_expert_bias, bool):
            raise ValueError("moe_router_enable_expert_bias must be true, false or null, got "
                             f"{self.moe_router_enable_expert_bias!r}")

    def _check_ids(self) -> None:
        check_special_ids(self, required=("mask_token_id", "eos_token_id", "pad_token_id"),
                          optional=("bos_token_id",), apart=("eos_token_id", "pad_token_id"))

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def weight_tying(self) -> bool:
        return self.tie_word_embeddings

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_layer_freq[i] != 0

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LLaDAMoEConfig":
        """Read a published LLaDA-MoE config.json; unknown keys are kept in `extra`."""
        if not is_llada_moe_config(d):
            raise ValueError(f"not a LLaDA-MoE config (model_type {d.get('model_type')!r}"
                             + (", and it names LLaDA-8B's d_model" if "d_model" in d else "")
                             + f"; want model_type 'llada' with architectures {list(LLADA_MOE_ARCHITECTURES)})")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ValueError(f"config lacks LLaDA-MoE keys {missing}")
        return cls(**hf_kwargs(cls, d))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------- the network

def route(logits: Tensor, expert_bias: Tensor | None, top_k: int) -> tuple[Tensor, Tensor]:
    """(expert ids (N, k), mixing weights (N, k) fp32) from router logits (N, E): softmax in fp32,
    the bias (if any) added, the k largest values both chosen and used as weights, unnormalised."""
    probs = torch.softmax(logits.float(), dim=-1)
    if expert_bias is not None:
        probs = probs + expert_bias.float()
    w, ids = probs.topk(top_k, dim=-1)
    return ids, w


class LLaDAMoESparseMoe(nn.Module):
    """The routed experts of a MoE layer: `gate`, `experts.{j}`, optional buffer `expert_bias`."""

    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.expert_intermediate_size)
                                     for _ in range(cfg.num_experts))
        if cfg.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        else:
            self.expert_bias = None

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ids, w = route(self.gate(flat), self.expert_bias, self.top_k)
        w = w.to(x.dtype)  # the reference mixes in the model's dtype
        out = torch.zeros_like(flat)
        for e in ids.unique().tolist():  # only the experts some token chose run
            rows, slot = (ids == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[e](flat[rows]) * w[rows, slot, None])
        return out.view(x.shape)


class LLaDAMoEAttention(nn.Module):
    """q/k/v/o with the published names; per-head q/k RMSNorm, clamping and partial RoPE."""

    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        self.cfg = cfg
        d, H, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(d, H * D, bias=cfg.attention_bias)
        self.k_proj = Linear(d, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = Linear(d, Hkv * D, bias=cfg.attention_bias)
        self.o_proj = Linear(H * D, d, bias=cfg.attention_bias)
        if cfg.qk_layernorm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def _heads(self, x: Tensor, proj: nn.Module, norm: nn.Module | None) -> Tensor:
        """proj(x) as (B, H, Q, D): the per-head norm, then the clamp, as the reference orders them."""
        B, Q, _ = x.shape
        t = proj(x).view(B, Q, -1, self.cfg.head_dim)
        if norm is not None:
            t = norm(t)
        if self.cfg.clip_qkv is not None:
            t = t.clamp(-self.cfg.clip_qkv, self.cfg.clip_qkv)
        return t.transpose(1, 2)

    def _rope(self, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rd = self.cfg.rotary_dim
        if rd == t.shape[-1]:
            return apply_rope(t, cos, sin)
        return torch.cat([apply_rope(t[..., :rd], cos, sin), t[..., rd:]], dim=-1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, layer: int,
                kv_cache: MaskedKVCacheHook | None) -> Tensor:
        qn, kn = (self.q_norm, self.k_norm) if self.cfg.qk_layernorm else (None, None)
        q = self._rope(self._heads(x, self.q_proj, qn), cos, sin)
        k = self._rope(self._heads(x, self.k_proj, kn), cos, sin)
        v = self._heads(x, self.v_proj, None)
        return self.o_proj(attend(q, k, v, mask, False, layer, kv_cache))


class LLaDAMoEDecoderLayer(nn.Module):
    """Pre-norm block; the shared expert (if any) is the layer's own module, added to the MLP's output."""

    def __init__(self, cfg: LLaDAMoEConfig, index: int):
        super().__init__()
        moe = cfg.is_moe_layer(index)
        self.self_attn = LLaDAMoEAttention(cfg)
        self.mlp = LLaDAMoESparseMoe(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.has_shared = moe and cfg.shared_expert_intermediate_size is not None
        if self.has_shared:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool, layer: int,
                kv_cache: MaskedKVCacheHook | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, kv_cache)
        h = self.post_attention_layernorm(x)
        y = self.mlp(h)
        if self.has_shared:
            y = y + self.shared_expert(h)
        return x + y


class LLaDAMoEModel(RoutedExpertCost, DecoderLM):
    """LLaDA-MoE with the published module names (`model.embed_tokens`, `model.layers.{i}.self_attn.*`,
    `model.layers.{i}.mlp.*`, `model.layers.{i}.shared_expert.*`, `model.norm`, `lm_head`).
    Bidirectional; `logits[:, i]` predicts token i, as `LLaDAModel`'s."""

    logits_shifted = False

    config: LLaDAMoEConfig

    @staticmethod
    def make_layer(cfg: LLaDAMoEConfig, index: int) -> nn.Module:
        return LLaDAMoEDecoderLayer(cfg, index)

    def expert_width(self) -> int:
        return self.config.expert_intermediate_size

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, attention_mask: Tensor | None = None,
                kv_cache: MaskedKVCacheHook | None = None, output_hidden_states: bool = False) -> ModelOutput:
        """input_ids (B, Q); positions (Q,) or (B, Q), default 0..Q-1; attention_mask (B, K) bool over
        *keys* (True = attend), or (B, Q, Q) per query without a cache, as `LLaDAModel` takes it."""
        logits, hidden = self.rope_forward(input_ids, positions,
                                           lambda B, Q: bidirectional_mask(attention_mask, kv_cache, B, Q),
                                           kv_cache, output_hidden_states, self.config.rotary_dim)
        return ModelOutput(logits=logits, hidden_states=hidden)


# ---------------------------------------------------------------- loading

def load_llada_moe(path: str | Path, device: str | torch.device | None = "cpu",
                   dtype: str | torch.dtype | None = None) -> tuple[LLaDAMoEModel, Tokenizer]:
    """Load a LLaDA-MoE directory (config.json, sharded or single safetensors, tokenizer.json).

    dtype None / "auto": bfloat16 on CUDA, float32 on CPU. The mask id comes from config.json, else
    the tokenizer files (`mask_token` / `<|mask|>`); EOS from config.json, else tokenizer_config.json's
    `eos_token`, else `pad_token_id`. Every tensor's name and shape is checked against the headers
    before any weight is read; peak memory is the weights plus one tensor."""
    from .dream import config_from_files, load_checked, on_meta, open_checkpoint

    path, dev, dt, raw, tok = open_checkpoint(path, device, dtype, lambda p, raw: None if is_llada_moe_config(raw)
                                              else f"{p}/config.json is not a LLaDA-MoE config (model_type "
                                                   f"{raw.get('model_type')!r})")
    cfg = config_from_files(path, raw, tok, LLaDAMoEConfig.from_hf_dict, only=("mask_token_id", "eos_token_id"),
                            fallback={"eos_token_id": "pad_token_id"})
    model = load_checked(path, on_meta(LLaDAMoEModel, cfg), dt, dev, tied_head=cfg.tie_word_embeddings)
    return model, tok
