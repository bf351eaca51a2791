"""LLaDA: a Llama-like transformer with full (bidirectional) attention.

Module and parameter names mirror LLaDA's own checkpoints
(`model.transformer.blocks.{i}.q_proj` ...) so a real LLaDA-8B directory loads
with `load_state_dict` and no renaming. The forward takes an optional
`kv_cache` so caching strategies (Fast-dLLM, dKV-Cache) can feed only a slice
of positions while attending to keys stored from earlier forwards; the model
itself knows nothing about *when* to cache, only how to read and write.

The math (RMSNorm, RoPE, the attention core, SwiGLU) is `layers.py`'s, shared
with every other model; the block only keeps LLaDA's parameter names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

# ModelOutput, KVCacheHook, RMSNorm, rope_cos_sin and apply_rope are re-exported: they used to live here.
from .layers import (KVCacheHook, LMParts, MaskedKVCacheHook, ModelOutput, RMSNorm, TransformerLM, apply_rope,
                     attention, check_positive_ints, rope_cos_sin, swiglu)
from .matmul import Linear

__all__ = ["LLaDAConfig", "LLaDABlock", "LLaDAModel", "ModelOutput", "KVCacheHook", "MaskedKVCacheHook", "RMSNorm",
           "rope_cos_sin", "apply_rope"]


@dataclass
class LLaDAConfig:
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 4
    n_layers: int = 4
    mlp_hidden_size: int = 768
    vocab_size: int = 512
    embedding_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 256
    mask_token_id: int = 1
    eos_token_id: int = 0
    pad_token_id: int | None = None
    eot_token_id: int | None = None  # <|eot_id|> of instruct models; from config.json or the tokenizer
    weight_tying: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        check_positive_ints(self, ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size"))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        for name in ("mask_token_id", "eos_token_id", "eot_token_id"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < self.embedding_size:
                raise ValueError(f"config {name}={getattr(self, name)} is outside the vocabulary ({self.embedding_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LLaDAConfig":
        """Read LLaDA's own config.json keys; unknown keys are kept in `extra`."""
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("d_model", "n_heads", "n_layers", "vocab_size") if k not in d]
        if missing:
            raise ValueError(f"config.json lacks LLaDA keys {missing}; is this a LLaDA checkpoint?")
        kw = {k: d[k] for k in known if k in d and d[k] is not None}
        if "n_kv_heads" not in kw:
            kw["n_kv_heads"] = kw["n_heads"]
        if "mlp_hidden_size" not in kw:
            kw["mlp_hidden_size"] = int(d.get("mlp_ratio", 4) * d["d_model"])
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d.update(self.extra)
        d.update(
            model_type="llada",
            architectures=["LLaDAModelLM"],
            include_bias=False,
            activation_type="silu",
            rope=True,
            alibi=False,
            block_type="llama",
        )
        return d


class LLaDABlock(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = Linear(cfg.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = Linear(cfg.mlp_hidden_size, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool, layer: int,
                kv_cache: MaskedKVCacheHook | None) -> Tensor:
        # The shared attention core and SwiGLU, run with this checkpoint's own Linear layers.
        x = x + attention(self.attn_norm(x), self.q_proj, self.k_proj, self.v_proj, self.attn_out, self.cfg.head_dim,
                          cos, sin, mask, is_causal, layer, kv_cache)
        return x + swiglu(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out)


class LLaDAModel(TransformerLM):
    """Bidirectional masked-diffusion LM; logit i predicts token i (no shift). Init, cost model
    and the block loop are `layers.TransformerLM`'s; the module names are LLaDA's."""

    logits_shifted = False  # Dream-style models predict position i from output i-1

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        t = nn.Module()
        t.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        t.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        t.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.weight_tying:
            t.ff_out = Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.model.transformer = t
        self._init_unless_meta()

    @property
    def transformer(self) -> nn.Module:
        return self.model.transformer

    def parts(self) -> LMParts:
        t, cfg = self.transformer, self.config
        return LMParts(t.wte, t.blocks, t.ln_f, None if cfg.weight_tying else t.ff_out, cfg.n_heads * cfg.head_dim)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        kv_cache: MaskedKVCacheHook | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """input_ids (B, Q); positions (Q,) or (B, Q), default 0..Q-1; attention_mask
        (B, K) bool over *keys* (True = attend), K = Q without a cache, or (B, Q, Q)
        per query (no cache), which training uses to score several canvases in one row."""
        logits, hidden = self.bidirectional_forward(input_ids, positions, attention_mask, kv_cache,
                                                    output_hidden_states)
        return ModelOutput(logits=logits, hidden_states=hidden)
