"""Cache strategies for bidirectional MDMs: which positions each forward feeds.

A strategy answers `block_logits(step)` with the logits of the current block
and hears `after_commit(chosen, step)` about what the policy committed. The
`none` strategy is vanilla LLaDA: every step runs the full canvas.

Every other strategy is the same mechanism with a different policy. A
`KVStore` keeps each layer's keys/values for every canvas cell (row × column)
and remembers which cells are valid and which token they were computed from.
Before each forward, `CachedDecoding` decides which cells *need* fresh
computation:

    need = not cached  |  cached but its token changed since  |  queried this step

where the queried cells are, by default, the masked cells of the current block
(the unmasking policy must score every candidate with a fresh query), or every
cell of a row when the policy calls for a full refresh. The forward feeds only
the columns some row needs and attends to those plus the stored ones; fresh
K/V of the *cacheable* cells among them are kept for later forwards. The
policies then only say three things:

| cache       | full refresh at block step j  | cacheable cells (K/V kept)      | queried between refreshes          |
|-------------|-------------------------------|---------------------------------|------------------------------------|
| prefix      | j = 0                         | columns before the block        | the block's masked cells           |
| dual        | j = 0                         | every column outside the block  | the block's masked cells           |
| dkv-decode  | j = 0, 1 and every j % N == 0 | decoded cells (prompt included) | the block's masked cells           |
| dkv-greedy  | every j % N == 0              | every cell, masked ones too     | cells decoded at this step + their |
|             |                               |                                 | window (random remasking); else    |
|             |                               |                                 | the block's masked cells           |
| dkv-prefill | first step of the first block | prompt columns                  | the block's masked cells           |

N is `refresh_interval`. Block step j counts, per row, the forwards since the
current block began in which the row still had masked cells in the block, so
the clock restarts at every block as in each method's reference code.

From that rule the papers' behaviour follows: prefix feeds [s, T) inside a
block, dual feeds [s, e); dKV-Decode caches a token one step *after* it is
decoded (its cell is not cacheable while masked, so the forward after the
commit computes it with the real token and stores it) and recomputes every
masked cell of the canvas each step; dKV-Greedy keeps stale K/V of every cell
it does not feed and recomputes only the cells about to be decoded, the
tokens committed at the previous step and a window of masked neighbours;
dKV-Prefill recomputes the whole generation region every step.

The dKV schedules follow horseee/dKV-Cache (`generation_utils/
llada_dkv_cache_decode.py` and `llada_dkv_cache_greedy.py`, function
`generate`): both reset their cache and their step counter at every block;
Decode runs full forwards at the block's steps 0 and 1 (step 0 stores nothing
there, so step 1 builds the cache) and at every `cache_reloading_step`-th
step; Greedy at every `cache_reloading_step`-th step from step 0. Greedy needs
the cells of step j before its forward: the reference draws a random decoding
order per block up front (it refuses low-confidence remasking); here the
policy's random draw for the step is replayed from the decoding loop's
generator instead (see `DKVGreedy`).
"""
from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch
from torch import Tensor

from .capabilities import capabilities
from .config import DecodeConfig
from .meter import MeteredModel
from .policies import num_transfer_tokens
from .propose import propose, select
from .state import Block, Canvas


class CacheStrategy(Protocol):
    """What `decode_canvas` needs from a cache strategy."""

    def begin_block(self, block: Block) -> None: ...

    def block_logits(self, step: int) -> Tensor: ...

    def after_commit(self, chosen: Tensor, step: int) -> None: ...

    def invalidate_from(self, start: Tensor) -> None: ...

    def add_rows(self, n: int) -> None: ...


class NoCache:
    """Vanilla: one full bidirectional forward per step."""

    def __init__(self, model: MeteredModel, canvas: Canvas, cfg: DecodeConfig):
        self.model, self.canvas, self.cfg = model, canvas, cfg
        self.block = Block(torch.zeros(canvas.batch_size, dtype=torch.long, device=canvas.x.device), 0, 0)

    def begin_block(self, block: Block) -> None:
        self.block = block

    def block_logits(self, step: int) -> Tensor:
        c = self.canvas
        # Rows whose block is already decoded ride along in the batch: their compute
        # is charged, but they are not counted as advanced (TPF must not depend on batching).
        working = int((self.block.take(c.x) == c.mask_id).any(1).sum())
        return self.block.take(self.model(c.x, attention_mask=c.attention_mask, sequences=working).logits)

    def after_commit(self, chosen: Tensor, step: int) -> None:
        pass

    def invalidate_from(self, start: Tensor) -> None:
        pass  # nothing is kept between forwards

    def add_rows(self, n: int) -> None:
        pass  # the canvas is the whole state


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
                sequences: int | None = None, **kw: Any) -> tuple[Tensor, Tensor]:
        """Run the model on every column some row `need`s and keep the `write` cells' K/V.

        need, write: bool (B, T), write ⊆ need. Returns (idx, logits): the fed
        columns (sorted) and their logits (B, len(idx), V); `kw` goes to the model
        (a shifted model gets shift=False: see `CachedDecoding.block_logits`).
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
                    sequences=sequences, **kw)
        self.valid = (self.valid & ~need) | write  # recomputed but not kept: no longer valid
        self.token = torch.where(write, canvas.x, self.token)
        return idx, out.logits

    def add_rows(self, n: int) -> None:
        """`n` more rows (joining a running batch) with nothing cached yet."""
        self.k = [None if t is None else torch.cat([t, t.new_zeros(n, *t.shape[1:])]) for t in self.k]
        self.v = [None if t is None else torch.cat([t, t.new_zeros(n, *t.shape[1:])]) for t in self.v]
        self.valid = torch.cat([self.valid, self.valid.new_zeros(n, self.length)])
        self.token = torch.cat([self.token, self.token.new_full((n, self.length), -1)])

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

    Subclasses implement `refresh_due` and `cacheable` (and may narrow
    `queried`); everything else (what to feed, what to attend, what to store)
    follows from the rule in the module docstring, so the variants cannot
    drift apart.

    Refresh clocks are per row and per block: `block_steps[r]` counts the
    forwards since the current block began in which row r still had masked
    cells in the block (`row_steps[r]` the same across blocks). With a
    variable-step policy (threshold, factor) a row that finished its block
    early sits through its companions' extra forwards, and those must not
    shift its refresh schedule. Such an idle forward changes nothing for the
    row (its canvas is fixed, so recomputed cells come out as they would at
    its next real step).
    """

    def __init__(self, model: MeteredModel, canvas: Canvas, cfg: DecodeConfig):
        self.model, self.canvas, self.cfg = model, canvas, cfg
        device = canvas.x.device
        self.store = KVStore(canvas.batch_size, canvas.length, model.config.n_layers, device)
        self.block = Block(torch.zeros(canvas.batch_size, dtype=torch.long, device=device), 0, 0)
        self.block_start = False
        self.row_steps = torch.zeros(canvas.batch_size, dtype=torch.long, device=device)  # across blocks
        self.block_steps = torch.zeros_like(self.row_steps)  # since the current block began
        self.last_need = torch.zeros_like(canvas.x, dtype=torch.bool)  # cells the last forward recomputed
        # Dream-style networks predict cell i from their output at i - 1 (`logits_shifted`); their
        # forward undoes the shift inside the fed columns, which is only right for a contiguous
        # slice, so here they return raw outputs and the shift is taken over canvas columns.
        self.shifted = capabilities(model).logits_shifted
        if self.shifted and canvas.prompt_len < 1:
            raise ValueError("a shifted-logit model needs at least one prompt token before the generation region")

    def begin_block(self, block: Block) -> None:
        self.block = block
        self.block_start = True
        self.block_steps.zero_()

    def add_rows(self, n: int) -> None:
        """`n` more rows join at a block start, with nothing cached and their clocks at zero (as alone)."""
        self.store.add_rows(n)
        self.row_steps = torch.cat([self.row_steps, self.row_steps.new_zeros(n)])
        self.block_steps = torch.cat([self.block_steps, self.block_steps.new_zeros(n)])
        self.last_need = torch.cat([self.last_need, self.last_need.new_zeros(n, self.last_need.shape[1])])

    def refresh_due(self) -> Tensor:
        """Bool (B,): rows whose next forward must recompute (and re-store) every cell."""
        raise NotImplementedError

    def cacheable(self) -> Tensor:
        """Bool (B, T): cells whose fresh K/V may be stored for later forwards."""
        raise NotImplementedError

    def queried(self, step: int, candidates: Tensor, refresh: Tensor) -> Tensor:
        """Bool (B, T): cells recomputed this step even when cached and unchanged.

        candidates: the block's masked cells (B, e - s); refresh: rows getting a
        full forward anyway. Default: every candidate, so the policy can score
        all of them.
        """
        need = torch.zeros_like(self.canvas.x, dtype=torch.bool)
        self.block.put(need, candidates)
        return need

    def columns(self, lo: int, hi: int) -> Tensor:
        """Bool (B, T), True on columns [lo, hi) of every row."""
        c = self.canvas
        cols = torch.arange(c.length, device=c.x.device)
        return ((cols >= lo) & (cols < hi)).expand(c.batch_size, -1)

    def every_row(self, flag: bool) -> Tensor:
        return torch.full((self.canvas.batch_size,), flag, dtype=torch.bool, device=self.canvas.x.device)

    def block_logits(self, step: int) -> Tensor:
        c, blk = self.canvas, self.block
        candidates = blk.take(c.x) == c.mask_id
        working = candidates.any(1)
        refresh = working & self.refresh_due()
        need = ~self.store.valid | self.store.stale(c.x) | self.queried(step, candidates, refresh)
        need[refresh] = True
        shifted = self.shifted
        if shifted:  # a shifted network scores cell i from its output at i - 1: feed that column too
            blk.put(need, blk.take(need, 1) | blk.take(need).clone(), 1)
        kw = {"shift": False} if shifted else {}
        idx, logits = self.store.forward(self.model, c, need, need & self.cacheable(), sequences=int(working.sum()),
                                         **kw)
        self.last_need = need
        self.row_steps += working
        self.block_steps += working
        self.block_start = False
        return _block_outputs(logits, idx, blk, c.length, int(shifted))

    def after_commit(self, chosen: Tensor, step: int) -> None:
        pass  # commits show up as stale or uncached cells at the next forward

    def invalidate_from(self, start: Tensor) -> None:
        """Forget the K/V of row r's cells at columns >= start[r] (speculative roll-back).

        They become uncached, so the next forward recomputes them under the
        strategy's usual rule; nothing else about the strategy changes (the
        refresh clocks go on).
        """
        cols = torch.arange(self.canvas.length, device=self.store.valid.device)
        self.store.valid = self.store.valid & (cols[None, :] < start.to(cols.device)[:, None])


def _block_outputs(logits: Tensor, idx: Tensor, blk: Block, n_cols: int, shift: int) -> Tensor:
    """(B, block length, V): each row's block logits, read from the forward's outputs at the fed
    columns `idx` (`shift` columns to the left for a shifted network); zeros where not fed.

    Block columns that were not fed are decoded and cached (or, for dkv-greedy, masked cells
    the policy will not pick this step); the policy never commits them, so zeros do."""
    B, V = logits.shape[0], logits.shape[-1]
    if blk.uniform is not None:
        s, e = blk.uniform - shift, blk.uniform - shift + blk.length
        out = logits.new_zeros(B, blk.length, V)
        inside = (idx >= s) & (idx < e)
        out[:, idx[inside] - s] = logits[:, inside]
        return out
    at = torch.full((n_cols,), -1, dtype=torch.long, device=idx.device)
    at[idx] = torch.arange(len(idx), device=idx.device)
    src = at[blk.cols - shift]  # (B, L): where each block cell's output sits among the fed columns
    got = logits.gather(1, src.clamp(min=0)[..., None].expand(-1, -1, V))
    return torch.where((src >= 0)[..., None], got, logits.new_zeros(()))


class PrefixCache(CachedDecoding):
    """Fast-dLLM prefix cache: a full forward at each block start keeps K/V of
    everything before the block; later steps feed the block and the suffix."""

    def refresh_due(self) -> Tensor:
        return self.every_row(self.block_start)

    def cacheable(self) -> Tensor:
        return self.block.before(self.canvas.length)


class DualCache(PrefixCache):
    """Fast-dLLM dual cache: the block-start full forward also keeps the
    (masked) suffix, so later steps feed only the current block."""

    def cacheable(self) -> Tensor:
        return ~self.block.inside(self.canvas.length)


class DKVDecode(CachedDecoding):
    """dKV-Cache-Decode: decoded tokens (and the prompt) are cached one step
    after they are decoded, masked ones are recomputed everywhere every step.

    Full forwards at block steps 0 and 1 and at every `refresh_interval`-th
    block step, the clock restarting at each block (reference: the `i > 1`
    and `i % cache_reloading_step` tests of `generate` in
    `generation_utils/llada_dkv_cache_decode.py`). The reference's step-0
    forward stores nothing, so its step 1 must be full to build the cache;
    ours stores at step 0 already, but step 1 stays full to keep the
    reference's schedule (and its cost)."""

    def refresh_due(self) -> Tensor:
        j = self.block_steps
        return (j < 2) | (j % self.cfg.refresh_interval == 0)

    def cacheable(self) -> Tensor:
        return self.canvas.x != self.canvas.mask_id


class DKVGreedy(CachedDecoding):
    """dKV-Cache-Greedy: cache every cell, masked ones included; full forwards
    at every `refresh_interval`-th block step (from step 0, clock restarting at
    each block); in between, recompute only

    * the cells the policy commits at this step,
    * the tokens committed at the previous step (now stale), and
    * a window: for each cell committed at this step, in decreasing order of
      its (random) confidence, the `window_size` nearest cells that are still
      masked and not yet recomputed, looking left then right at distance
      1, 2, ... (anywhere on the canvas, later blocks included),

    as `generate` and `find_window_tokens` in the reference's
    `generation_utils/llada_dkv_cache_greedy.py` do (the reference's default
    window is 0, its README example uses 4).

    The cells of step j must be known before its forward. The reference
    supports random remasking only (it raises NotImplementedError for
    low-confidence) and draws a decoding order per block up front. Here,
    with `remasking="random"` and the decoding loop's `generator`, the
    strategy replays the loop's own `propose` and `select` on a copy of the
    generator state, so it knows exactly which cells the policy will pick
    (with any policy: under random remasking the pick never depends on the
    logits); it checks after the commit that every committed cell was
    recomputed. A per-step random draw and the reference's per-block order
    give the same distribution over decoding orders.

    Adaptation (not in the paper): with low-confidence remasking, or with
    no generator (`make_cache` called without the loop's), the next cells are
    unknown until their confidences are computed, so every masked cell of the
    block is recomputed (the block is the window); `window_size` must then
    be 0.
    """

    def __init__(self, model: MeteredModel, canvas: Canvas, cfg: DecodeConfig,
                 generator: torch.Generator | None = None, window_size: int = 0):
        super().__init__(model, canvas, cfg)
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {window_size}")
        self.generator, self.window_size = generator, window_size
        self.order_known = cfg.remasking == "random" and generator is not None
        if window_size and not self.order_known:
            raise ValueError(
                "dkv-greedy's window surrounds the cells about to be decoded, which are known before the "
                "forward only with remasking='random' and the decoding loop's generator"
            )
        per_block = cfg.steps // cfg.num_blocks  # the decoding loop's plan, for the schedule policy
        self.plan = num_transfer_tokens(cfg.block_length, per_block) if per_block else []
        config = model.config
        self.vocab = getattr(config, "embedding_size", None) or config.vocab_size

    def refresh_due(self) -> Tensor:
        return self.block_steps % self.cfg.refresh_interval == 0

    def cacheable(self) -> Tensor:
        return torch.ones_like(self.canvas.x, dtype=torch.bool)

    def queried(self, step: int, candidates: Tensor, refresh: Tensor) -> Tensor:
        if not self.order_known:
            return super().queried(step, candidates, refresh)
        need = torch.zeros_like(self.canvas.x, dtype=torch.bool)
        if bool(refresh[candidates.any(1)].all()):
            return need  # every working row recomputes everything anyway
        chosen, conf = self.predict(step, candidates)
        self.block.put(need, chosen)
        if self.window_size:
            self.add_window(need, chosen, conf)
        return need

    def predict(self, step: int, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """The cells (B, e - s) the decoding loop will commit at `step`, and their confidences.

        Runs the loop's `propose` and `select` on the current generator state
        and puts the state back, so the loop then draws the same numbers.
        """
        c, B, n = self.canvas, self.canvas.batch_size, self.block.length
        state = self.generator.get_state()
        try:
            # the logits' values never matter under random remasking, and their width only
            # when Gumbel noise is drawn for them (temperature > 0)
            width = self.vocab if self.cfg.temperature > 0 else 1
            _, conf = propose(torch.zeros(B, n, width, device=c.x.device), self.cfg, self.generator)
        finally:
            self.generator.set_state(state)
        conf = torch.where(candidates, conf, torch.tensor(-torch.inf, dtype=conf.dtype, device=conf.device))
        k = self.plan[step] if step < len(self.plan) else 1
        return select(conf, self.cfg, k), conf

    def add_window(self, need: Tensor, chosen: Tensor, conf: Tensor) -> None:
        """Mark each chosen cell's `window_size` nearest still-masked, not yet marked cells."""
        masked = self.canvas.x == self.canvas.mask_id
        cols = torch.arange(self.canvas.length, device=need.device)
        for r in range(need.shape[0]):
            picked = chosen[r].nonzero()[:, 0]
            picked = picked[conf[r, picked].argsort(descending=True, stable=True)]
            for p in (picked + self.block.starts[r]).tolist():
                # left neighbour first at each distance: order L1, R1, L2, R2, ...
                order = 2 * (cols - p).abs() - (cols < p).long()
                order = torch.where(masked[r] & ~need[r], order, torch.iinfo(order.dtype).max)
                near = order.argsort(stable=True)[: self.window_size]
                need[r, near[masked[r, near] & ~need[r, near]]] = True

    def after_commit(self, chosen: Tensor, step: int) -> None:
        if self.order_known and bool((chosen & ~self.block.take(self.last_need)).any()):
            raise RuntimeError(
                "dkv-greedy: the policy committed a cell whose logits were not recomputed; the replay of "
                "the decoding loop's random draw (propose.propose/select) no longer matches the loop"
            )


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
    if capabilities(inner).logits_shifted and "shift" not in params:
        raise ValueError(
            f"cache {cfg.cache!r} feeds a subset of columns; {type(inner).__name__} shifts its logits and its "
            "forward has no `shift` switch to return raw outputs — use cache='none'"
        )


def make_cache(cfg: DecodeConfig, model: MeteredModel, canvas: Canvas,
               generator: torch.Generator | None = None) -> CacheStrategy:
    """The cache strategy named by `cfg.cache`, checked against the model.

    `generator` is the decoding loop's; only dkv-greedy uses it (to know the
    cells random remasking will pick before the forward, see `DKVGreedy`).
    """
    if cfg.cache not in CACHE_STRATEGIES:
        raise ValueError(f"unknown cache {cfg.cache!r}; choose one of {', '.join(CACHE_STRATEGIES)}")
    if cfg.cache != "none":
        _check_supports_cache(cfg, model)
    if cfg.cache == "dkv-greedy":
        return DKVGreedy(model, canvas, cfg, generator)
    return CACHE_STRATEGIES[cfg.cache](model, canvas, cfg)
