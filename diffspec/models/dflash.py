"""DFlash: a small block-diffusion drafter conditioned on an AR target's hidden states.

The drafter sees a window [anchor, mask, mask, ...] (the anchor is the last
verified token) and fills every masked position in one forward: attention
inside the window is bidirectional, and it is conditioned on the target's
hidden states of the committed tokens. Those hidden states (several target
layers, concatenated) are projected by one linear layer + RMSNorm into
"context features", which every drafter layer turns into extra keys/values
with its *own* k_proj / v_proj (RoPE at their absolute positions) and
prepends to the window's keys/values. Window queries attend to all context
keys and to every window position.

The drafter shares the target's input embedding and LM head, frozen: it
keeps a plain reference to the target (not a registered submodule), so its
`state_dict` holds only its own weights and a checkpoint is small and cannot
go stale against the target's. Logits are *unshifted*: window position i
predicts the token at position i (position 0 is the anchor itself).

The same class serves as D²SD's variable-prefix (VP) drafter: the window
length W is free (γ for the block drafter, γ₂ for the VP drafter), and a VP
window simply has some drafted tokens after the anchor before the masks.

Decoding passes a `ContextKV` per row: the context features of committed
tokens never change (the target's hidden states of a committed token are
fixed, and the features are the same input to every layer), so each layer's
context keys/values are computed once, when a token is committed, instead of
on every call (without one, training and one-off calls recompute them).
Decoding also names the window cells it will `read`: only those go through the
LM head, the largest matrix of a drafter for a real vocabulary (about 83 % of
a SmolLM2 DFlash window's FLOPs). A `draft_vocab` (the target's most frequent
output tokens, EAGLE-3 / DFlash style) narrows that head further; tokens
outside it get logit −inf, so the drafter never proposes them, and the target
still verifies over its whole vocabulary: the output does not change.
`forward_flops` charges exactly what runs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from .causal import Qwen3Model
from .checkpoint import CheckpointError, _read_weights, check_state, read_config
from .draft_vocab import (DRAFT_VOCAB_FILE, ascending, check_draft_vocab, compact_logits, draft_logits,
                          read_draft_vocab, write_draft_vocab)
from .layers import Attention, DecoderLayer, RMSNorm, SwiGLU, attend, project_q, rope_cos_sin
from .matmul import Linear, few_rows_cheap, linear

__all__ = ["DFlashConfig", "DFlashDrafter", "ContextKV", "check_target", "save_dflash", "load_dflash",
           "DRAFT_VOCAB_FILE", "read_draft_vocab", "write_draft_vocab"]

# Through F.linear the CPU's LM-head matmul is slower for 3-15 rows than for 16 (MKL picks another
# kernel: on the project's machine 52 ms for 15 rows of SmolLM2's head, 27 ms for 16; see
# benchmarks/verify-cost-cpu). So where the packed kernel cannot run (`matmul.few_rows_cheap`), a CPU
# call that reads fewer cells runs the head on the whole window instead, and keeps the cells it reads.
CPU_HEAD_MIN_ROWS = 16


@dataclass
class DFlashConfig:
    """Shape of a DFlash drafter. `hidden_size` and `vocab_size` must be the target's
    (the drafter reuses its embedding and LM head); `target_layers` index the
    target's hidden states like transformers (0 = embeddings, i = output of layer i-1).
    `block_size` is γ, the window the drafter was built/trained for (anchor included);
    `mask_token_id` is the id fed at positions to fill (required)."""

    hidden_size: int = 48
    vocab_size: int = 512
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 96
    target_layers: tuple[int, ...] = (1, 2)
    block_size: int = 16
    mask_token_id: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DFlashConfig {name} must be an int >= 1, got {v!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if isinstance(self.target_layers, int) or not self.target_layers:
            raise ValueError(f"target_layers must be a non-empty sequence of hidden-state indices, "
                             f"got {self.target_layers!r}")
        self.target_layers = tuple(int(i) for i in self.target_layers)
        if any(i < 0 for i in self.target_layers) or len(set(self.target_layers)) != len(self.target_layers):
            raise ValueError(f"target_layers must be distinct non-negative indices, got {self.target_layers}")
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"block_size (γ) must be >= 2 (the anchor plus at least one draft), got {self.block_size}")
        if self.mask_token_id is None:
            raise ValueError("mask_token_id is required: the id of the tokenizer's mask token (<|mdm_mask|>)")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id} is outside the vocabulary ({self.vocab_size})")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be > 0")

    @classmethod
    def for_target(cls, target: Qwen3Model, mask_token_id: int, **kw: Any) -> "DFlashConfig":
        """A config whose shared shapes (hidden, vocab, RoPE, head_dim) are copied from `target`."""
        t = target.config
        base = dict(hidden_size=t.hidden_size, vocab_size=t.vocab_size, head_dim=t.head_dim,
                    rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps, mask_token_id=mask_token_id)
        return cls(**{**base, **kw})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_layers"] = list(self.target_layers)
        return {"model_type": "dflash", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DFlashConfig":
        if d.get("model_type", "dflash") != "dflash":
            raise ValueError(f"model_type is {d['model_type']!r}, not 'dflash'")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if unknown:
            raise ValueError(f"unknown DFlash config keys {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})


def check_target(cfg: DFlashConfig, target: nn.Module) -> None:
    """A drafter fits a target only if it can reuse its embedding/head and read its hidden states."""
    if not getattr(target, "logits_shifted", False) or not hasattr(target, "model"):
        raise ValueError(f"the DFlash target must be an autoregressive Qwen3Model, got {type(target).__name__}")
    t = target.config
    if cfg.hidden_size != t.hidden_size:
        raise ValueError(f"drafter hidden_size {cfg.hidden_size} != target hidden_size {t.hidden_size}; "
                         "the drafter shares the target's embedding and LM head")
    if cfg.vocab_size != t.vocab_size:
        raise ValueError(f"drafter vocab_size {cfg.vocab_size} != target vocab_size {t.vocab_size}; "
                         "the drafter must share the target's tokenizer")
    n_states = t.num_hidden_layers + 1
    bad = [i for i in cfg.target_layers if i >= n_states]
    if bad:
        raise ValueError(f"target_layers {bad} are out of range: the target has {n_states} hidden states "
                         f"(0 = embeddings .. {n_states - 1} = last layer)")


class DFlashAttention(Attention):
    """Qwen3-style attention (per-head q/k RMSNorm, no biases) whose keys/values are the
    context's, computed with this layer's own k_proj / v_proj, followed by the window's."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__(cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_norm_eps, qk_norm=True)

    def forward(self, x: Tensor, ctx: Tensor | tuple[Tensor, Tensor], rope_q: tuple[Tensor, Tensor],
                rope_c: tuple[Tensor, Tensor] | None, mask: Tensor | None, ctx_index: Tensor | None = None) -> Tensor:
        """x (B, W, d) normed window states; ctx (1 or B, C, d) context features — or (S, C, d)
        with `ctx_index` (B,) naming each window's context row — or this layer's cached
        context (keys, values) (1, H_kv, C, D). Keys = [ctx; window].

        A context of batch 1 (D²SD's windows of one row) gets its keys/values
        computed once and broadcast over the B windows; with `ctx_index` each
        context row's once for all its windows (training: several anchors per sequence).
        """
        B = x.shape[0]
        q = project_q(x, self.q_proj, self.head_dim, *rope_q, self.q_norm)
        kc, vc = ctx if isinstance(ctx, tuple) else self.kv(ctx, *rope_c)
        kw, vw = self.kv(x, *rope_q)  # window keys sit at the window's positions, like its queries
        if ctx_index is not None:
            kc, vc = kc[ctx_index], vc[ctx_index]
        k = torch.cat([kc.expand(B, -1, -1, -1), kw], dim=2)
        v = torch.cat([vc.expand(B, -1, -1, -1), vw], dim=2)
        return self.o_proj(attend(q, k, v, mask))  # not causal: bidirectional window


def _layer(cfg: DFlashConfig) -> DecoderLayer:
    return DecoderLayer(DFlashAttention(cfg), SwiGLU(cfg.hidden_size, cfg.intermediate_size), cfg.hidden_size,
                        cfg.rms_norm_eps)


def _rows(positions: Tensor, B: int, n: int, what: str) -> Tensor:
    if tuple(positions.shape) not in ((n,), (B, n)):
        raise ValueError(f"{what} must be ({n},) or ({B}, {n}), got {tuple(positions.shape)}")
    return positions.expand(B, n)


class ContextKV:
    """One row's context keys/values for every layer of one drafter, extended as tokens are committed.

    Exact: a committed token's context feature is fixed and feeds every layer's
    k/v projections directly, so its keys and values never change.
    """

    def __init__(self, drafter: "DFlashDrafter", capacity: int):
        cfg = drafter.config
        w = drafter.fc.weight
        shape = (1, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = [w.new_empty(shape) for _ in range(cfg.n_layers)]
        self.v = [w.new_empty(shape) for _ in range(cfg.n_layers)]
        self.capacity, self.length = capacity, 0

    def extend(self, drafter: "DFlashDrafter", ctx_hidden: Tensor) -> int:
        """Add the context cells of `ctx_hidden` (1, C, L·H) beyond those cached (positions are 0..C-1);
        returns how many were new."""
        C = ctx_hidden.shape[1]
        if ctx_hidden.shape[0] != 1 or C < self.length or C > self.capacity:
            raise ValueError(f"a ContextKV holds one row of at most {self.capacity} context cells ({self.length} "
                             f"cached); got ctx_hidden {tuple(ctx_hidden.shape)}")
        n = C - self.length
        if n:
            feats = drafter.context_features(ctx_hidden[:, self.length:])
            pos = torch.arange(self.length, C, device=feats.device)[None]
            rope = rope_cos_sin(pos, drafter.config.head_dim, drafter.config.rope_theta)
            for i, layer in enumerate(drafter.layers):
                k, v = layer.self_attn.kv(feats, *rope)
                self.k[i][:, :, self.length:C] = k
                self.v[i][:, :, self.length:C] = v
            self.length = C
        return n

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return self.k[i][:, :, :self.length], self.v[i][:, :, :self.length]


class DFlashDrafter(nn.Module):
    """The DFlash block drafter bound to one AR target (see the module docstring)."""

    logits_shifted = False  # window position i predicts token i

    def __init__(self, cfg: DFlashConfig, target: Qwen3Model):
        super().__init__()
        check_target(cfg, target)
        self.config = cfg
        H = cfg.hidden_size
        self.fc = Linear(len(cfg.target_layers) * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(_layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.__dict__["_target"] = target  # bypasses Module.__setattr__: not a submodule, not in state_dict
        self.draft_vocab: Tensor | None = None  # target ids the head may propose (None: all); set_draft_vocab
        if not self.fc.weight.is_meta:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)

    @property
    def target(self) -> Qwen3Model:
        return self.__dict__["_target"]

    def bind(self, target: Qwen3Model) -> "DFlashDrafter":
        """Share the embedding and LM head of another (compatible) target from now on."""
        check_target(self.config, target)
        self.__dict__["_target"] = target
        return self

    def _embed_and_head(self) -> tuple[Tensor, Tensor]:
        """The target's embedding and head weights, detached: the drafter never trains them."""
        t = self.target
        emb = t.model.embed_tokens.weight
        head = emb if t.config.tie_word_embeddings else t.lm_head.weight
        return emb.detach(), head.detach()

    def num_params(self) -> int:
        """The drafter's own parameters (the shared embedding/head are the target's)."""
        return sum(p.numel() for p in self.parameters())

    def set_draft_vocab(self, ids: Any | None) -> "DFlashDrafter":
        """Let the head propose only these target ids (None: the whole vocabulary)."""
        self.draft_vocab = None if ids is None else check_draft_vocab(ids, self.config.vocab_size,
                                                                      self.fc.weight.device)
        return self

    def head_rows(self, n_read: int, n_cells: int) -> int:
        """Rows the LM head computes for `n_read` read cells of `n_cells` (see CPU_HEAD_MIN_ROWS)."""
        if not few_rows_cheap(self.fc.weight.device) and n_read < min(CPU_HEAD_MIN_ROWS, n_cells):
            return n_cells
        return n_read

    def head_size(self) -> int:
        """Rows of the LM head a forward computes: the draft vocabulary's, else the target's vocabulary."""
        return self.config.vocab_size if self.draft_vocab is None else int(self.draft_vocab.numel())

    def forward_flops(self, n_query: int, n_keys: int, windows: int = 1, n_ctx: int | None = None,
                      n_logits: int | None = None) -> float:
        """FLOPs for `windows` windows of n_query positions sharing one context, n_keys = context + window keys.

        Context tokens go through fc and every layer's k/v projections once for
        all windows: all n_keys − n_query of them, or `n_ctx` (the cells new to a
        ContextKV). Window tokens go through every layer and attend to every key;
        `n_logits` of them (default all) through the LM head, of `head_size()` rows.
        """
        cfg = self.config
        H = cfg.hidden_size
        n_ctx = max(n_keys - n_query, 0) if n_ctx is None else n_ctx
        n_logits = windows * n_query if n_logits is None else n_logits
        ctx_params = self.fc.weight.numel() + sum(
            l.self_attn.k_proj.weight.numel() + l.self_attn.v_proj.weight.numel() for l in self.layers)
        window_params = self.num_params() - self.fc.weight.numel()
        attn = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * n_query * n_keys
        return (windows * (2.0 * window_params * n_query + attn) + 2.0 * ctx_params * n_ctx
                + 2.0 * H * self.head_size() * n_logits)

    def context_features(self, ctx_hidden: Tensor) -> Tensor:
        """(B, C, L·H) concatenated target hidden states -> (B, C, H) context features."""
        want = len(self.config.target_layers) * self.config.hidden_size
        if ctx_hidden.dim() != 3 or ctx_hidden.shape[-1] != want:
            raise ValueError(f"ctx_hidden must be (B, C, {want}) = len(target_layers) × hidden_size, "
                             f"got {tuple(ctx_hidden.shape)}")
        return self.hidden_norm(self.fc(ctx_hidden))

    def forward(
        self,
        block_ids: Tensor,
        block_positions: Tensor,
        ctx_hidden: Tensor,
        ctx_positions: Tensor,
        ctx_mask: Tensor | None = None,
        ctx_index: Tensor | None = None,
        *,
        ctx_cache: ContextKV | None = None,
        read: Tensor | None = None,
        draft_space: bool = False,
        compact: bool = False,
    ) -> Tensor:
        """Logits (B, W, V) for every window position (unshifted), or (N, V) for the N cells of `read`.

        block_ids (B, W): anchor then drafted tokens and/or mask ids.
        block_positions (W,) or (B, W): their absolute positions.
        ctx_hidden (B, C, L·H): target hidden states at `target_layers`, concatenated
        in that order, of the committed tokens before the anchor; ctx_positions
        (C,) or (B, C). ctx_mask (B, C) bool, True = attend (for ragged contexts).
        ctx_index (B,): window b reads context row ctx_index[b] of an (S, C, L·H)
        ctx_hidden (positions (C,)), whose features and K/V are computed once per row.
        ctx_cache: this row's ContextKV (ctx_hidden (1, C, L·H) at positions 0..C-1,
        no mask or index): only cells it lacks are projected. read (B, W) bool: the
        cells whose logits the caller reads, in row-major order; the head runs on them only.
        Outside a `draft_vocab` the logits are −inf; with `draft_space` they are
        returned over the draft vocabulary's columns only (..., Vd), in its order:
        training's cross-entropy then never touches the other 49 k SmolLM2 columns.
        `compact` (decoding, with `ctx_cache`): over the draft vocabulary's columns (`compact_ids`).
        """
        if block_ids.dim() != 2:
            raise ValueError(f"block_ids must be (B, W), got {tuple(block_ids.shape)}")
        B, W = block_ids.shape
        if read is not None and (read.dtype != torch.bool or tuple(read.shape) != (B, W)):
            raise ValueError(f"read must be a ({B}, {W}) bool mask of window cells, got {read.dtype} "
                             f"{tuple(read.shape)}")
        if draft_space and self.draft_vocab is None:
            raise ValueError("draft_space needs a draft vocabulary (set_draft_vocab)")
        if compact and ctx_cache is None:
            raise ValueError("compact logits are for decoding with a ctx_cache; training uses draft_space")
        if ctx_cache is not None:
            if draft_space:
                raise ValueError("draft_space is for training windows, not a ctx_cache forward")
            return self._cached_forward(block_ids, block_positions, ctx_hidden, ctx_positions, ctx_mask, ctx_index,
                                        ctx_cache, read, compact)
        ctx = self.context_features(ctx_hidden)
        C = ctx.shape[1]
        bpos = _rows(block_positions, B, W, "block_positions")
        if ctx_index is not None:
            if tuple(ctx_index.shape) != (B,) or ctx_positions.dim() != 1:
                raise ValueError(f"ctx_index must be ({B},) with ctx_positions (C,); got {tuple(ctx_index.shape)} "
                                 f"and {tuple(ctx_positions.shape)}")
            if len(ctx_index) and not 0 <= int(ctx_index.min()) <= int(ctx_index.max()) < ctx.shape[0]:
                raise ValueError(f"ctx_index must name rows of ctx_hidden (0..{ctx.shape[0] - 1})")
            cpos = _rows(ctx_positions, 1, C, "ctx_positions")
        elif ctx.shape[0] not in (1, B):
            raise ValueError(f"ctx_hidden has batch {ctx.shape[0]} but block_ids has {B}")
        else:
            cpos = _rows(ctx_positions, B, C, "ctx_positions")
            if ctx.shape[0] == 1 and ctx_positions.dim() == 1:
                cpos = cpos[:1]  # one context shared by all B windows: its K/V are computed once
            else:
                ctx = ctx.expand(B, -1, -1)
        cfg = self.config
        rope_q = rope_cos_sin(bpos, cfg.head_dim, cfg.rope_theta)
        rope_c = rope_cos_sin(cpos, cfg.head_dim, cfg.rope_theta)
        mask = None
        if ctx_mask is not None:
            if tuple(ctx_mask.shape) != (B, C):
                raise ValueError(f"ctx_mask must be (B, C) = {(B, C)}, got {tuple(ctx_mask.shape)}")
            keys = torch.cat([ctx_mask.to(torch.bool), ctx_mask.new_ones(B, W, dtype=torch.bool)], dim=1)
            mask = keys[:, None, None, :]
        emb, head = self._embed_and_head()
        x = F.embedding(block_ids, emb)
        for layer in self.layers:
            x = layer(x, ctx, rope_q, rope_c, mask, ctx_index)
        if draft_space:
            return draft_logits(self, self.norm(x if read is None else x[read]), head, self.draft_vocab, full=False)
        return self._logits(x, head, read)

    def _cached_forward(self, block_ids: Tensor, block_positions: Tensor, ctx_hidden: Tensor, ctx_positions: Tensor,
                        ctx_mask: Tensor | None, ctx_index: Tensor | None, cache: ContextKV,
                        read: Tensor | None, compact: bool = False) -> Tensor:
        B, W = block_ids.shape
        C = ctx_hidden.shape[1] if ctx_hidden.dim() == 3 else -1
        if ctx_mask is not None or ctx_index is not None or ctx_hidden.dim() != 3 or ctx_hidden.shape[0] != 1 \
                or tuple(ctx_positions.shape) != (C,):
            raise ValueError("ctx_cache serves one row's whole context (ctx_hidden (1, C, L·H), ctx_positions "
                             "0..C-1) without ctx_mask or ctx_index")
        cache.extend(self, ctx_hidden)
        bpos = _rows(block_positions, B, W, "block_positions")
        rope_q = rope_cos_sin(bpos, self.config.head_dim, self.config.rope_theta)
        emb, head = self._embed_and_head()
        x = F.embedding(block_ids, emb)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache.layer(i), rope_q, None, None)
        return self._logits(x, head, read, compact)

    def compact_ids(self) -> Tensor | None:
        """The target id of each column of `compact` logits (None: the whole vocabulary, in order)."""
        return None if self.draft_vocab is None else ascending(self, self.draft_vocab)

    def _logits(self, x: Tensor, head: Tensor, read: Tensor | None, compact: bool = False) -> Tensor:
        if read is not None and self.head_rows(int(read.sum()), read.numel()) == read.numel():
            return self._logits(x, head, None, compact)[read]  # the whole window is cheaper than a few rows here
        h = self.norm(x if read is None else x[read])
        if self.draft_vocab is None:
            return linear(h, head)
        if compact:
            return compact_logits(self, h, head, self.draft_vocab)
        return draft_logits(self, h, head, self.draft_vocab)


def save_dflash(drafter: DFlashDrafter, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write config.json and model.safetensors (the drafter's own weights only; in `dtype` when
    given: bf16 halves a SmolLM2-width drafter, and loading casts to the target's dtype)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
             for k, v in drafter.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(drafter.config.to_dict(), indent=2) + "\n")
    return path


def load_dflash(path: str | Path, target: Qwen3Model) -> DFlashDrafter:
    """Load a drafter saved by `save_dflash` and bind it to `target`, on its device and in its dtype.

    Missing or corrupt files raise CheckpointError; a drafter built for a target
    of another hidden size or vocabulary raises ValueError.
    """
    path = Path(path)
    raw = read_config(path)
    if raw.get("model_type") != "dflash":
        raise CheckpointError(f"{path}/config.json is not a DFlash drafter config (model_type="
                              f"{raw.get('model_type')!r}, expected 'dflash')")
    try:
        cfg = DFlashConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    check_target(cfg, target)
    state = _read_weights(path)
    with torch.device("meta"):
        drafter = DFlashDrafter(cfg, target)
    check_state(drafter.state_dict(), state, path)
    w = target.model.embed_tokens.weight
    drafter.load_state_dict({k: v.to(device=w.device, dtype=w.dtype) for k, v in state.items()}, assign=True)
    if (path / DRAFT_VOCAB_FILE).is_file():
        drafter.set_draft_vocab(read_draft_vocab(path / DRAFT_VOCAB_FILE, cfg.vocab_size))
    return drafter.eval()
