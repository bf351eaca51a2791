"""The transformer pieces every model here is built from, written once.

- `RMSNorm` (fp32 statistics), `rope_cos_sin` / `apply_rope` (fp32 rotate-half RoPE).
- `swiglu` (the SwiGLU MLP as a function of three Linear layers) and `SwiGLU`
  (the module, with transformers' names `gate_proj` / `up_proj` / `down_proj`).
- The attention core: `project_q` / `project_kv` (projections, optional
  per-head q/k RMSNorm, RoPE), `attend` (the cache hook, grouped-query
  repeat, SDPA with a mask or `is_causal`, heads merged) and `attention`
  (all of them plus the output projection).
- `Attention` and `DecoderLayer`: the modules with transformers' parameter names
  (`self_attn.q_proj` ..., `mlp.gate_proj` ..., `input_layernorm`,
  `post_attention_layernorm`), built with the bias / q-k-norm switches a config
  asks for. Llama / Qwen2 / Qwen3 (`causal.py`) and Dream (`dream.py`) use
  `DecoderLayer` as is (Dream runs it with `is_causal=False`); the DFlash
  drafter (`dflash.py`) subclasses `Attention` to prepend its context keys.
  LLaDA (`llada.py`) keeps its checkpoint's own names (`attn_out`, `ff_proj`,
  `ff_out`) and calls `attention` and `swiglu` with its own Linear layers.
- `TransformerLM`: what every LM class (not the DFlash drafter) shares around
  its blocks: init, the cost model (`num_params`, `forward_flops`),
  `run_blocks` (embedding, blocks, hidden states, final norm and head) and
  `bidirectional_forward` (LLaDA's and Dream's forward). `DecoderLM`: the
  transformers layout (`model.embed_tokens`, `model.layers`, `model.norm`,
  `lm_head`) of the causal models and Dream.
- `KVCacheHook`: what attention and the cost meter need from a cache (one
  method, `layer`, and `last_n_keys`); `MaskedKVCacheHook` adds the
  `key_mask` the bidirectional models need, and `bidirectional_mask` builds
  their attention mask from a key mask, a per-query mask or a cache.

Parameter names are checkpoint names: nothing here renames a state-dict key.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Collection, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .draft_vocab import check_draft_vocab, draft_logits
from .matmul import Linear, linear

__all__ = ["ModelOutput", "KVCacheHook", "MaskedKVCacheHook", "RMSNorm", "rope_cos_sin", "apply_rope", "swiglu",
           "SwiGLU", "project_q", "project_kv", "attend", "attention", "bidirectional_mask", "Attention",
           "DecoderLayer", "LMParts", "TransformerLM", "DecoderLM", "check_positive_ints", "HFConfigNames",
           "check_attention_sizes", "require_hf_keys", "hf_kwargs"]



def check_positive_ints(cfg: Any, names: Collection[str]) -> None:
    """Shape fields of a config must be integers >= 1: a config.json saying 1.0 or "2" would
    otherwise fail deep inside torch, or format into a misleading message."""
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config {name} must be an integer >= 1, got {v!r}")


# SDPA's enable_gqa (torch >= 2.5) attends grouped key/value heads without copying them.
_NATIVE_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

_HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings")


def require_hf_keys(d: dict[str, Any], what: str) -> None:
    """A transformers-named config.json names the sizes every loader needs."""
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in d]
    if missing:
        raise ValueError(f"config lacks {what} keys {missing}")


def hf_kwargs(cls: Any, d: dict[str, Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword arguments of dataclass config `cls` read from a transformers-named config.json `d`:
    each field `d` gives (not None; `exclude` and `extra` aside), `num_key_value_heads` defaulting to
    the query heads, a list `eos_token_id` read as its first id, and every other key in `extra`."""
    known = {f.name for f in fields(cls)} - {"extra", *exclude}
    kw = {k: d[k] for k in known if d.get(k) is not None}
    if "num_key_value_heads" not in kw:  # None means as many as the query heads
        kw["num_key_value_heads"] = d["num_attention_heads"]
    eos = kw.get("eos_token_id")
    if isinstance(eos, list):  # some configs list several end ids; the first is the padding/EOS one
        if not eos:
            raise ValueError("eos_token_id is an empty list")
        kw["eos_token_id"] = eos[0]
    kw["extra"] = {k: v for k, v in d.items() if k not in known}
    return kw


def check_special_ids(cfg: Any, required: tuple[str, ...] = (), optional: tuple[str, ...] = (),
                      apart: tuple[str, ...] = ("eos_token_id",)) -> None:
    """A config's special ids are ids of its vocabulary (`optional` ones may be None), padding is EOS
    when not given, and the mask differs from each of `apart`: padding or EOS read as masks would be
    decoded over, and an id past the vocabulary fails deep inside the embedding."""
    if cfg.pad_token_id is None:
        cfg.pad_token_id = cfg.eos_token_id
    for name in (*required, *optional):
        v = getattr(cfg, name)
        if v is None and name in optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < cfg.vocab_size:
            raise ValueError(f"config {name}={v!r} is outside the vocabulary ({cfg.vocab_size})")
    for name in apart:
        if getattr(cfg, name) == cfg.mask_token_id:
            raise ValueError(f"mask_token_id and {name} are both {cfg.mask_token_id}; they must differ")


def check_attention_sizes(cfg: Any, more: tuple[str, ...] = (), rope_head_dim: bool = True) -> None:
    """A transformers-named config's sizes (and `more`) integers >= 1; `head_dim` None derived as
    hidden_size // num_attention_heads, then checked (even and >= 2 for rotate-half RoPE over the
    whole head when `rope_head_dim`, else >= 1); query heads a multiple of the key/value heads."""
    check_positive_ints(cfg, _HF_SIZES + more)
    if cfg.head_dim is None:
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size ({cfg.hidden_size}) must be divisible by num_attention_heads "
                             f"({cfg.num_attention_heads}) when head_dim is not given")
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    if not rope_head_dim:
        check_positive_ints(cfg, ("head_dim",))
    elif cfg.head_dim < 2 or cfg.head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number for rotate-half RoPE, got {cfg.head_dim}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"num_attention_heads ({cfg.num_attention_heads}) must be divisible by "
                         f"num_key_value_heads ({cfg.num_key_value_heads}) for grouped-query attention")


class HFConfigNames:
    """The names the shared decoding code reads (runner, meter, caches), for a dataclass config
    with transformers' field names (`num_hidden_layers`, `hidden_size`, ...)."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def embedding_size(self) -> int:
        return self.vocab_size

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

@dataclass
class ModelOutput:
    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class KVCacheHook(Protocol):
    """What a model's attention and `MeteredModel` need from a KV cache.

    `layer(index, k, v)` is called once per layer and forward with that layer's
    fresh keys/values (B, H_kv, Q, D), after RoPE: the cache merges them with
    the ones it stores (appends them, or scatters them into their columns) and
    returns the keys/values to attend to, (B', H_kv, K, D). `last_n_keys` is K,
    how many keys the latest forward attended to; the meter reads it once the
    forward has returned.
    """

    @property
    def last_n_keys(self) -> int: ...

    def layer(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class MaskedKVCacheHook(KVCacheHook, Protocol):
    """A cache for the bidirectional models (LLaDA, Dream), which may attend to a subset of
    the stored columns: `key_mask` turns the caller's (B, T) key mask into one over the
    K keys `layer` returns (or None: attend to all)."""

    def key_mask(self, attention_mask: Tensor | None, n_query: int) -> Tensor | None: ...


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


def swiglu(x: Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> Tensor:
    """down(silu(gate(x)) * up(x))."""
    return down(F.silu(gate(x)) * up(x))


class SwiGLU(nn.Module):
    """The SwiGLU MLP with transformers' weight names; biases only where asked (Llama's `mlp_bias`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


def _heads(x: Tensor, proj: nn.Module, head_dim: int, norm: nn.Module | None = None) -> Tensor:
    """proj(x) (B, Q, H·D) -> (B, H, Q, D); a per-head norm, if any, runs on (B, Q, H, D) first."""
    B, Q, _ = x.shape
    t = proj(x).view(B, Q, -1, head_dim)
    if norm is not None:
        t = norm(t)
    return t.transpose(1, 2)


def project_q(x: Tensor, q_proj: nn.Module, head_dim: int, cos: Tensor, sin: Tensor,
              q_norm: nn.Module | None = None) -> Tensor:
    """Rotated queries of x (B, Q, d) as (B, H, Q, D); a per-head q RMSNorm (Qwen3, DFlash) runs before RoPE."""
    return apply_rope(_heads(x, q_proj, head_dim, q_norm), cos, sin)


def project_kv(x: Tensor, k_proj: nn.Module, v_proj: nn.Module, head_dim: int, cos: Tensor, sin: Tensor,
               k_norm: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """Rotated keys and values of x (B, Q, d) as (B, H_kv, Q, D) each; a k RMSNorm runs before RoPE."""
    return apply_rope(_heads(x, k_proj, head_dim, k_norm), cos, sin), _heads(x, v_proj, head_dim)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False, layer: int = 0,
           kv_cache: KVCacheHook | None = None, per_row: bool = False) -> Tensor:
    """Scaled dot-product attention of q (B, H, Q, D) over k/v (B, H_kv, K, D) -> (B, Q, H·D).

    With a `kv_cache`, the fresh k/v first go through `kv_cache.layer(layer, k, v)`.
    Grouped-query attention: on the CPU with torch >= 2.5, SDPA's `enable_gqa`
    reads each key/value head in place; repeating them (repeat_interleave)
    copies the whole cache every layer and step, which cost 4x the attention
    itself at batch 32 (benchmarks/gqa-attention-cpu), for the same bits. On
    CUDA the repeat stays: with a mask, `enable_gqa` would leave the
    memory-efficient kernel for the math one. `mask` is a bool mask
    broadcastable to (B, H, Q, K), True = attend.

    `per_row` (set on an int8 model, `models.quantized`): at batch 1 with a cache and a mask, each
    query attends on its own, over just the keys its mask row allows, as a one-token forward
    would, so its output has a one-token forward's bits whatever else is verified beside it.
    """
    if kv_cache is not None:
        k, v = kv_cache.layer(layer, k, v)
    B, _, Q, _ = q.shape
    if per_row and Q > 1 and B == 1 and mask is not None and kv_cache is not None:
        rows = mask.reshape(-1, Q, mask.shape[-1])
        if rows.shape[0] == 1:
            att = torch.cat([_sdpa(q[:, :, i:i + 1], *_keys_of(k, v, rows[0, i]), None, False) for i in range(Q)],
                            dim=2)
            return att.transpose(1, 2).reshape(B, Q, -1)
    att = _sdpa(q, k, v, mask, is_causal)
    return att.transpose(1, 2).reshape(B, Q, -1)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    rep = q.shape[1] // k.shape[1]
    if rep != 1 and _NATIVE_GQA and q.device.type == "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    if rep != 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def _keys_of(k: Tensor, v: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """The keys / values one query may read: a prefix as the same view a one-token forward
    reads from the cache; a tree node's ancestors gathered in order."""
    n = int(allowed.sum())
    if bool(allowed[:n].all()):
        return k[:, :, :n], v[:, :, :n]
    idx = allowed.nonzero().squeeze(1)
    return k.index_select(2, idx), v.index_select(2, idx)


def attention(x: Tensor, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, o_proj: nn.Module, head_dim: int,
              cos: Tensor, sin: Tensor, mask: Tensor | None = None, is_causal: bool = False, layer: int = 0,
              kv_cache: KVCacheHook | None = None, q_norm: nn.Module | None = None,
              k_norm: nn.Module | None = None, per_row: bool = False) -> Tensor:
    """Self-attention of x (B, Q, d): `project_q`, `project_kv`, `attend`, the output projection."""
    q = project_q(x, q_proj, head_dim, cos, sin, q_norm)
    k, v = project_kv(x, k_proj, v_proj, head_dim, cos, sin, k_norm)
    return o_proj(attend(q, k, v, mask, is_causal, layer, kv_cache, per_row))


def bidirectional_mask(attention_mask: Tensor | None, kv_cache: MaskedKVCacheHook | None, B: int,
                       Q: int) -> Tensor | None:
    """The SDPA mask of a bidirectional model (LLaDA, Dream) for Q fed tokens, or None (attend to all).

    attention_mask is (B, K) bool over keys (True = attend; K = Q without a
    cache, the cache's `key_mask` maps it to the keys it serves otherwise), or
    (B, Q, Q) per query, which needs no cache.
    """
    if attention_mask is not None and attention_mask.dim() == 3:
        if kv_cache is not None or tuple(attention_mask.shape) != (B, Q, Q):
            raise ValueError(f"a per-query attention_mask must be (B, Q, Q) = {(B, Q, Q)} and used without "
                             f"a kv_cache; got {tuple(attention_mask.shape)}")
        return attention_mask[:, None].to(torch.bool)
    if kv_cache is not None:
        attention_mask = kv_cache.key_mask(attention_mask, Q)
    elif attention_mask is not None and tuple(attention_mask.shape) != (B, Q):
        raise ValueError(f"attention_mask must be (B, Q) = {(B, Q)} over keys, or (B, Q, Q) per query; "
                         f"got {tuple(attention_mask.shape)}")
    return attention_mask[:, None, None, :].to(torch.bool) if attention_mask is not None else None


class Attention(nn.Module):
    """q/k/v/o projections with transformers' names, plus per-head `q_norm` / `k_norm` when
    `qk_norm` (registered only then, so a checkpoint without them loads strictly)."""

    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int, eps: float, *,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False):
        super().__init__()
        self.head_dim, self.qk_norm = head_dim, qk_norm
        self.per_row = False  # `attend`'s per_row: set by `models.quantized` on an int8 model
        self.q_proj = Linear(hidden_size, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(n_heads * head_dim, hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)

    def norms(self) -> tuple[nn.Module | None, nn.Module | None]:
        """(q_norm, k_norm), or (None, None) without qk_norm."""
        return (self.q_norm, self.k_norm) if self.qk_norm else (None, None)

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's rotated keys and values of x, (B, H_kv, Q, D) each."""
        return project_kv(x, self.k_proj, self.v_proj, self.head_dim, cos, sin, self.norms()[1])

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                layer: int = 0, kv_cache: KVCacheHook | None = None) -> Tensor:
        return attention(x, self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.head_dim, cos, sin, mask,
                         is_causal, layer, kv_cache, *self.norms(), per_row=self.per_row)


class DecoderLayer(nn.Module):
    """Pre-norm block with transformers' names: x + self_attn(input_layernorm(x), ...), then
    x + mlp(post_attention_layernorm(x)). Every argument after x goes to `self_attn`."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    @classmethod
    def from_config(cls, cfg: Any) -> "DecoderLayer":
        """A layer for a transformers-layout config: `hidden_size`, `intermediate_size`,
        `num_attention_heads`, `num_key_value_heads`, `head_dim`, `rms_norm_eps` and the
        switches `qkv_bias`, `o_bias`, `qk_norm`, `mlp_bias` (Qwen3Config, DreamConfig)."""
        attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.rms_norm_eps, qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm)
        return cls(attn, SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias), cfg.hidden_size,
                   cfg.rms_norm_eps)

    def forward(self, x: Tensor, *attn_args: Any, **attn_kw: Any) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *attn_args, **attn_kw)
        return x + self.mlp(self.post_attention_layernorm(x))


class LMParts(NamedTuple):
    embed: nn.Embedding
    blocks: nn.ModuleList  # each called as block(x, cos, sin, mask, is_causal, layer, kv_cache)
    norm: nn.Module  # the final norm
    head: nn.Linear | None  # None: the head is the input embedding (tied)
    attn_dim: int  # query heads × head_dim, for the attention FLOPs


class TransformerLM(nn.Module):
    """What every LM here shares around its blocks; a subclass names its modules in `parts`
    (its own checkpoint names) and calls `_init_unless_meta` at the end of `__init__`."""

    config: Any

    def parts(self) -> LMParts:
        raise NotImplementedError

    def _init_unless_meta(self) -> None:
        # Skip init on the meta device (the loaders build there, then assign real weights):
        # meta normal_ goes through torch._refs and imports dynamo (~4 s).
        if not self.parts().embed.weight.is_meta:
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the input embedding is a lookup (no FLOPs) unless it doubles as the head."""
        p = self.parts()
        n = sum(t.numel() for t in self.parameters())
        if non_embedding and p.head is not None:
            n -= p.embed.weight.numel()
        return n

    # Target ids the head may propose when this model drafts for another (None: the whole
    # vocabulary); see `models.draft_vocab` and `set_draft_vocab`.
    draft_vocab: Tensor | None = None

    def set_draft_vocab(self, ids: Any | None) -> "TransformerLM":
        """Let the head propose only these ids, as an AR drafter (None: all). Never on a target: it
        must verify over its whole vocabulary (`speculative.ar.check_compatible` refuses one)."""
        w = self.parts().embed.weight
        self.draft_vocab = None if ids is None else check_draft_vocab(ids, w.shape[0], w.device)
        return self

    def forward_flops(self, n_query: int, n_keys: int) -> float:
        """FLOPs of one sequence's forward: 2·params·tokens plus attention scores and mixing (less the
        head rows a draft vocabulary leaves out)."""
        p = self.parts()
        flops = 2.0 * self.num_params() * n_query + 4.0 * len(p.blocks) * p.attn_dim * n_query * n_keys
        if self.draft_vocab is not None:
            w = p.embed.weight if p.head is None else p.head.weight
            flops -= 2.0 * (w.shape[0] - self.draft_vocab.numel()) * w.shape[1] * n_query
        return flops

    def run_blocks(self, input_ids: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool,
                   kv_cache: KVCacheHook | None, keep: Collection[int] = (),
                   logits_mask: Tensor | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """Embed, run every block, final norm and head: (logits, {i: hidden state i for i in keep}).

        Hidden states index like transformers': 0 is the embedding output, i the
        output of block i-1 (before the final norm). logits_mask (B, Q) bool: the
        head runs on those cells only and logits come back flat, (N, V) — with a
        49k vocabulary the head costs more than a small drafter's layers.
        """
        p = self.parts()
        x = p.embed(input_ids)
        states = {0: x} if 0 in keep else {}
        for i, block in enumerate(p.blocks):
            x = block(x, cos, sin, mask, is_causal, i, kv_cache)
            if i + 1 in keep:
                states[i + 1] = x
        head = p.embed.weight if p.head is None else p.head.weight
        if logits_mask is not None:
            x = x[logits_mask]
        if self.draft_vocab is not None:
            return draft_logits(self, p.norm(x), head, self.draft_vocab), states
        return linear(p.norm(x), head), states

    def rope_forward(self, input_ids: Tensor, positions: Tensor | None,
                     mask_for: Callable[[int, int], Tensor | None], kv_cache: KVCacheHook | None,
                     output_hidden_states: bool,
                     rotary_dim: int | None = None) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """The non-causal forward (LLaDA, Dream, LLaDA2, SDAR): (logits, hidden states or None).

        input_ids (B, Q); positions (Q,) or (B, Q), default 0..Q-1; RoPE over `rotary_dim`
        channels (default `config.head_dim`) with `config.rope_theta`; `mask_for(B, Q)` gives the
        attention mask the blocks take (checked after the positions)."""
        B, Q = input_ids.shape
        if positions is None:
            positions = torch.arange(Q, device=input_ids.device)
        elif tuple(positions.shape) not in ((Q,), (B, Q)):
            raise ValueError(f"positions must be (Q,) or (B, Q) for input (B, Q) = {(B, Q)}, "
                             f"got {tuple(positions.shape)}")
        cos, sin = rope_cos_sin(positions, self.config.head_dim if rotary_dim is None else rotary_dim,
                                self.config.rope_theta)
        mask = mask_for(B, Q)
        keep = range(len(self.parts().blocks) + 1) if output_hidden_states else ()
        logits, states = self.run_blocks(input_ids, cos, sin, mask, False, kv_cache, keep)
        return logits, tuple(states.values()) if output_hidden_states else None

    def bidirectional_forward(self, input_ids: Tensor, positions: Tensor | None, attention_mask: Tensor | None,
                              kv_cache: MaskedKVCacheHook | None,
                              output_hidden_states: bool) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """The masked-diffusion models' forward (LLaDA, Dream): (logits, hidden states or None).

        input_ids (B, Q); positions (Q,) or (B, Q), default 0..Q-1; attention_mask as
        `bidirectional_mask` takes it. Reads `config.head_dim` and `config.rope_theta`.
        """
        return self.rope_forward(input_ids, positions,
                                 lambda B, Q: bidirectional_mask(attention_mask, kv_cache, B, Q),
                                 kv_cache, output_hidden_states)


class DecoderLM(TransformerLM):
    """transformers' layout (`model.embed_tokens`, `model.layers` of `DecoderLayer`, `model.norm`,
    `lm_head` unless `tie_word_embeddings`), built from a config `DecoderLayer.from_config` reads
    plus `vocab_size`, `num_hidden_layers` and `tie_word_embeddings`. A subclass with other names
    sets `embed_name` and overrides `make_layer`."""

    embed_name = "embed_tokens"

    def __init__(self, cfg: Any):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        setattr(self.model, self.embed_name, nn.Embedding(cfg.vocab_size, cfg.hidden_size))
        self.model.layers = nn.ModuleList(self.make_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._init_unless_meta()

    @staticmethod
    def make_layer(cfg: Any, index: int) -> nn.Module:
        return DecoderLayer.from_config(cfg)

    def parts(self) -> LMParts:
        cfg = self.config
        return LMParts(getattr(self.model, self.embed_name), self.model.layers, self.model.norm,
                       None if cfg.tie_word_embeddings else self.lm_head, cfg.num_attention_heads * cfg.head_dim)
