"""Cache strategies for bidirectional MDMs: which positions each forward feeds.

A strategy answers `block_logits(step)` with the logits of the current block
and hears `after_commit(chosen, step)` about what the policy committed. The
`none` strategy is vanilla LLaDA: every step runs the full canvas.

Every other strategy is the same mechanism with a different policy. A
`KVStore` keeps each layer's keys/values for every canvas cell (row × column)
and remembers which cells are valid and which token they were computed from.
Before each forward, `CachedDecoding` decides which cells *need* fresh
computation:

    need = not cached  |  cached but its token changed since  |  masked in the current block

(the last term because the unmasking policy must score every candidate with a
fresh query), or every cell of a row when the policy calls for a full
refresh. The forward feeds only the columns some row needs and attends to
those plus the stored ones; fresh K/V of the *cacheable* cells among them are
kept for later forwards. The policies then only say two things:

| cache        | full refresh when                   | cacheable cells (K/V kept)                 |
|--------------|-------------------------------------|--------------------------------------------|
| prefix       | first forward of each block         | columns before the block (Fast-dLLM)       |
| dual         | first forward of each block         | every column outside the block (Fast-dLLM) |
| dkv-decode   | every `refresh_interval` steps      | decoded cells (prompt included)            |
| dkv-greedy   | every `refresh_interval` steps      | every cell, masked ones too                |
| dkv-prefill  | the first step only                 | prompt columns                             |

From that rule the papers' behaviour follows: prefix feeds [s, T) inside a
block, dual feeds [s, e); dKV-Decode caches a token one step *after* it is
decoded (its cell is not cacheable while masked, so the forward after the
commit computes it with the real token and stores it); dKV-Greedy keeps stale
K/V of masked cells outside the block and recomputes only the block's masked
cells plus the tokens committed at the previous step; dKV-Prefill recomputes
the whole generation region every step.
"""
from __future__ import annotations

import inspect
from typing import Protocol

import torch
from torch import Tensor

from .config import DecodeConfig
from .meter import MeteredModel
from .state import Canvas


class CacheStrategy(Protocol):
    """What `decode_canvas` needs from a cache strategy."""

    def begin_block(self, s: int, e: int) -> None: ...

    def block_logits(self, step: int) -> Tensor: ...

    def after_commit(self, chosen: Tensor, step: int) -> None: ...

    def invalidate_from(self, start: Tensor) -> None: ...


class NoCache:
    """Vanilla: one full bidirectional forward per step."""

    def __init__(self, model: MeteredModel, canvas: Canvas, cfg: DecodeConfig):
        self.model, self.canvas, self.cfg = model, canvas, cfg
        self.s = self.e = 0

    def begin_block(self, s: int, e: int) -> None:
        self.s, self.e = s, e

    def block_logits(self, step: int) -> Tensor:
        c = self.canvas
        # Rows whose block is already decoded ride along in the batch: their compute
        # is charged, but they are not counted as advanced (TPF must not depend on batching).
        working = int((c.x[:, self.s : self.e] == c.mask_id).any(1).sum())
        return self.model(c.x, attention_mask=c.attention_mask, sequences=working).logits[:, self.s : self.e]

    def after_commit(self, chosen: Tensor, step: int) -> None:
        pass

    def invalidate_from(self, start: Tensor) -> None:
        pass  # nothing is kept between forwards


class KVStore:
    """Per-layer keys/values for every canvas cell; implements the model's `KVCacheHook`.

    Each layer's buffer (B, H_kv, T, D) is also the attention's key/value
    tensor: a forward scatters the fresh K/V of the cells it recomputes into
    the buffer and attends over it, so nothing is concatenated or copied when
    every column is attended (always, for the strategies below).
    `valid` says which cells hold K/V a later forward may reuse: after a
    forward, exactly the cells it was told to `write`, plus those it left alone.

    Columns are shared across the batch (one forward feeds the same columns for
    every row), so a column is skipped only when no row needs it. Validity is
    kept per *cell* (row, column) all the same, and a cell fed only because
    another row needs its column keeps its stored K/V: a row then sees exactly
    the K/V it would see if decoded alone, whatever its batch companions need.

    K/V are stored after RoPE, which is correct because every forward passes
    the true column positions to the model.
    """

    def __init__(self, batch: int, length: int, n_layers: int, device: torch.device):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        # the token each valid cell's K/V were computed from, to spot cells decoded since
        self.token = torch.full((batch, length), -1, dtype=torch.long, device=device)
        self.last_n_keys = 0
        # Plan of the forward in flight, set by `forward`.
        self._idx = self._keys = self._fresh = torch.empty(0, dtype=torch.long)
        self._all_fresh = self._all_keys = self._full = False

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def stale(self, x: Tensor) -> Tensor:
        """Valid cells whose token changed since their K/V were stored (e.g. a mask since decoded)."""
        return self.valid & (self.token != x)

    def forward(self, model: MeteredModel, canvas: Canvas, need: Tensor, write: Tensor,
                sequences: int | None = None) -> tuple[Tensor, Tensor]:
        """Run the model on every column some row `need`s and keep the `write` cells' K/V.

        need, write: bool (B, T), write ⊆ need. Returns (idx, logits): the fed
        columns (sorted) and their logits (B, len(idx), V).
        """
        fed = need.any(0)
        idx = fed.nonzero(as_tuple=True)[0]
        # Attend to the fed columns plus those cached for every row; a column
        # with neither has no K/V to offer (never happens when need ⊇ ~valid).
        keys = (fed | self.valid.all(0)).nonzero(as_tuple=True)[0]
        self._idx, self._keys = idx, keys
        self._fresh = need[:, idx] | ~self.valid[:, idx]  # cells that take this forward's K/V
        self._all_fresh = bool(self._fresh.all())
        self._all_keys = len(keys) == self.length
        self._full = self._all_fresh and len(idx) == self.length
        self.last_n_keys = len(keys)
        out = model(canvas.x[:, idx], positions=idx, attention_mask=canvas.attention_mask, kv_cache=self,
                    sequences=sequences)
        self.valid = (self.valid & ~need) | write  # recomputed but not kept: no longer valid
        self.token = torch.where(write, canvas.x, self.token)
        return idx, out.logits

    def key_mask(self, attention_mask: Tensor | None, n_query: int) -> Tensor | None:
        if attention_mask is None or self._all_keys:
            return attention_mask
        return attention_mask[:, self._keys]

    def layer(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self._merge(self.k, index, k), self._merge(self.v, index, v)

    def _merge(self, store: list[Tensor | None], index: int, fresh: Tensor) -> Tensor:
        """Scatter the fresh K (or V) into the layer's buffer; return the attended keys."""
        B, H, _, D = fresh.shape
        if store[index] is None:
            store[index] = fresh.new_zeros(B, H, self.length, D)
        buf = store[index]
        if self._full:  # a full forward: attend to `fresh` itself, exactly as without a cache
            buf.copy_(fresh)
            return fresh
        if self._all_fresh:
            buf.index_copy_(2, self._idx, fresh)
        else:
            buf[:, :, self._idx] = torch.where(self._fresh[:, None, :, None], fresh, buf[:, :, self._idx])
        return buf if self._all_keys else buf.index_select(2, self._keys)


class CachedDecoding:
    """One KV store plus a policy: which rows get a full forward, which cells to keep.

    Subclasses implement `refresh_due` and `cacheable`; everything else (what
    to feed, what to attend, what to store) follows from the rule in the
    module docstring, so the variants cannot drift apart.

    Refresh clocks are per row and count only the forwards in which the row
    still had masked cells in the block: with a variable-step policy
    (threshold, factor) a row that finished its block early sits through its
    companions' extra forwards, and those must not shift its refresh schedule.
    Such an idle forward changes nothing for the row (its canvas is fixed, so
    recomputed cells come out as they would at its next real step).
    """

    def __init__(self, model: MeteredModel, canvas: Canvas, cfg: DecodeConfig):
        self.model, self.canvas, self.cfg = model, canvas, cfg
        device = canvas.x.device
        self.store = KVStore(canvas.batch_size, canvas.length, model.config.n_layers, device)
        self.s = self.e = 0
        self.block_start = False
        self.row_steps = torch.zeros(canvas.batch_size, dtype=torch.long, device=device)  # across blocks

    def begin_block(self, s: int, e: int) -> None:
        self.s, self.e = s, e
        self.block_start = True

    def refresh_due(self) -> Tensor:
        """Bool (B,): rows whose next forward must recompute (and re-store) every cell."""
        raise NotImplementedError

    def cacheable(self) -> Tensor:
        """Bool (B, T): cells whose fresh K/V may be stored for later forwards."""
        raise NotImplementedError

    def columns(self, lo: int, hi: int) -> Tensor:
        """Bool (B, T), True on columns [lo, hi) of every row."""
        c = self.canvas
        cols = torch.arange(c.length, device=c.x.device)
        return ((cols >= lo) & (cols < hi)).expand(c.batch_size, -1)

    def every_row(self, flag: bool) -> Tensor:
        return torch.full((self.canvas.batch_size,), flag, dtype=torch.bool, device=self.canvas.x.device)

    def block_logits(self, step: int) -> Tensor:
        c, s, e = self.canvas, self.s, self.e
        candidates = c.x[:, s:e] == c.mask_id
        working = candidates.any(1)
        need = ~self.store.valid | self.store.stale(c.x)
        need[:, s:e] |= candidates
        need[working & self.refresh_due()] = True
        idx, logits = self.store.forward(self.model, c, need, need & self.cacheable(), sequences=int(working.sum()))
        self.row_steps += working
        self.block_start = False
        # Block columns that were not fed are decoded and cached; the policy
        # never reads their logits (their confidence is -inf), so zeros do.
        out = logits.new_zeros(c.batch_size, e - s, logits.shape[-1])
        inside = (idx >= s) & (idx < e)
        out[:, idx[inside] - s] = logits[:, inside]
        return out

    def after_commit(self, chosen: Tensor, step: int) -> None:
        pass  # commits show up as stale or uncached cells at the next forward

    def invalidate_from(self, start: Tensor) -> None:
        """Forget the K/V of row r's cells at columns >= start[r] (speculative roll-back).

        They become uncached, so the next forward recomputes them under the
        strategy's usual rule; nothing else about the strategy changes.
        """
        cols = torch.arange(self.canvas.length, device=self.store.valid.device)
        self.store.valid = self.store.valid & (cols[None, :] < start.to(cols.device)[:, None])


class PrefixCache(CachedDecoding):
    """Fast-dLLM prefix cache: a full forward at each block start keeps K/V of
    everything before the block; later steps feed the block and the suffix."""

    def refresh_due(self) -> Tensor:
        return self.every_row(self.block_start)

    def cacheable(self) -> Tensor:
        return self.columns(0, self.s)


class DualCache(PrefixCache):
    """Fast-dLLM dual cache: the block-start full forward also keeps the
    (masked) suffix, so later steps feed only the current block."""

    def cacheable(self) -> Tensor:
        return ~self.columns(self.s, self.e)


class DKVDecode(CachedDecoding):
    """dKV-Cache-Decode: decoded tokens (and the prompt) are cached one step
    after they are decoded, masked ones are recomputed everywhere every step;
    a full refresh every `refresh_interval` steps, counted across blocks."""

    def refresh_due(self) -> Tensor:
        return self.row_steps % self.cfg.refresh_interval == 0

    def cacheable(self) -> Tensor:
        return self.canvas.x != self.canvas.mask_id


class DKVGreedy(DKVDecode):
    """dKV-Cache-Greedy: cache every cell, masked ones included; between
    refreshes recompute only the block's masked cells (the candidates) and the
    tokens committed at the previous step. The reference code recomputes the
    tokens about to be decoded plus a small window, which needs the decoding
    order in advance (random remasking only); the block is our window, so any
    unmasking policy works."""

    def cacheable(self) -> Tensor:
        return torch.ones_like(self.canvas.x, dtype=torch.bool)


class DKVPrefill(CachedDecoding):
    """dKV-Cache-Prefill: the prompt's K/V from the first forward are reused to
    the end (never refreshed, as in the reference code, so `refresh_interval`
    does not apply); the generation region is recomputed every step."""

    def refresh_due(self) -> Tensor:
        return self.row_steps == 0

    def cacheable(self) -> Tensor:
        return self.columns(0, self.canvas.prompt_len)


CACHE_STRATEGIES: dict[str, type] = {
    "none": NoCache,
    "prefix": PrefixCache,
    "dual": DualCache,
    "dkv-decode": DKVDecode,
    "dkv-greedy": DKVGreedy,
    "dkv-prefill": DKVPrefill,
}


def _check_supports_cache(cfg: DecodeConfig, model: MeteredModel) -> None:
    inner = getattr(model, "model", model)
    params = inspect.signature(inner.forward).parameters
    if "kv_cache" not in params or "positions" not in params:
        raise ValueError(
            f"cache {cfg.cache!r} needs a model whose forward takes `kv_cache` and `positions` "
            f"(the KVCacheHook of diffspec.models.llada); {type(inner).__name__} does not — use cache='none'"
        )
    if getattr(inner, "logits_shifted", False):
        raise ValueError(
            f"cache {cfg.cache!r} feeds a subset of columns, which needs logit i to predict token i; "
            f"{type(inner).__name__} shifts its logits — use cache='none'"
        )
    if cfg.cfg_scale > 0:
        raise ValueError("classifier-free guidance (cfg_scale > 0) is only supported with cache 'none'")


def make_cache(cfg: DecodeConfig, model: MeteredModel, canvas: Canvas) -> CacheStrategy:
    """The cache strategy named by `cfg.cache`, checked against the model."""
    if cfg.cache not in CACHE_STRATEGIES:
        raise ValueError(f"unknown cache {cfg.cache!r}; choose one of {', '.join(CACHE_STRATEGIES)}")
    if cfg.cache != "none":
        _check_supports_cache(cfg, model)
    return CACHE_STRATEGIES[cfg.cache](model, canvas, cfg)
