"""LLaDA: a Llama-like transformer with full (bidirectional) attention.

Module and parameter names mirror LLaDA's own checkpoints
(`model.transformer.blocks.{i}.q_proj` ...) so a real LLaDA-8B directory loads
with `load_state_dict` and no renaming. The forward takes an optional
`kv_cache` so caching strategies (Fast-dLLM, dKV-Cache) can feed only a slice
of positions while attending to keys stored from earlier forwards; the model
itself knows nothing about *when* to cache, only how to read and write.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        for name in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config {name} must be >= 1, got {getattr(self, name)}")
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


class KVCacheHook(Protocol):
    """What the model needs from a cache: keys/values to attend to, layer by layer."""

    def key_mask(self, attention_mask: Tensor | None, n_query: int) -> Tensor | None: ...

    def layer(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class ModelOutput:
    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics even under bf16, as LLaDA does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables in fp32 for arbitrary (possibly non-contiguous) positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on (B, H, Q, D) computed in fp32; cos/sin are (Q, D) or (B, Q, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, layer: int, kv_cache: KVCacheHook | None) -> Tensor:
        B, Q, _ = x.shape
        cfg = self.cfg
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, Q, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, Q, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, Q, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.layer(layer, k, v)
        if cfg.n_kv_heads != cfg.n_heads:
            rep = cfg.n_heads // cfg.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, Q, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """Bidirectional masked-diffusion LM; logit i predicts token i (no shift)."""

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
            t.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.model.transformer = t
        # Skip init on the meta device (load_model builds there, then assigns real
        # weights): meta normal_ goes through torch._refs and imports dynamo (~4 s).
        if not t.wte.weight.is_meta:
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def transformer(self) -> nn.Module:
        return self.model.transformer

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.weight_tying:
            n -= self.transformer.wte.weight.numel()
        return n

    def forward_flops(self, n_query: int, n_keys: int) -> float:
        """FLOPs of one sequence's forward: 2·params·tokens plus attention scores and mixing."""
        cfg = self.config
        return 2.0 * self.num_params() * n_query + 4.0 * cfg.n_layers * cfg.d_model * n_query * n_keys

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        kv_cache: KVCacheHook | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """input_ids (B, Q); positions (Q,) or (B, Q), default 0..Q-1; attention_mask
        (B, K) bool over *keys* (True = attend), K = Q without a cache, or (B, Q, K)
        per query (no cache), which training uses to score several canvases in one row."""
        cfg = self.config
        B, Q = input_ids.shape
        if positions is None:
            positions = torch.arange(Q, device=input_ids.device)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        if attention_mask is not None and attention_mask.dim() == 3:
            if kv_cache is not None or tuple(attention_mask.shape) != (B, Q, Q):
                raise ValueError(f"a per-query attention_mask must be (B, Q, Q) = {(B, Q, Q)} and used without "
                                 f"a kv_cache; got {tuple(attention_mask.shape)}")
            mask = attention_mask[:, None].to(torch.bool)
        elif kv_cache is not None:
            key_mask = kv_cache.key_mask(attention_mask, Q)
            mask = key_mask[:, None, None, :].to(torch.bool) if key_mask is not None else None
        else:
            mask = attention_mask[:, None, None, :].to(torch.bool) if attention_mask is not None else None
        t = self.transformer
        x = t.wte(input_ids)
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(t.blocks):
            x = block(x, cos, sin, mask, i, kv_cache)
            if hidden is not None:
                hidden.append(x)
        x = t.ln_f(x)
        head = t.wte.weight if cfg.weight_tying else t.ff_out.weight
        logits = F.linear(x, head)
        return ModelOutput(logits=logits, hidden_states=tuple(hidden) if hidden is not None else None)
