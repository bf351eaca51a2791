"""PSD: parallel speculative decoding for MDMs, training-free, one model call per iteration.

Per iteration, on the current block of the shared canvas:

1. the logits of the previous call (the *seed*; the first of a block comes
   from one plain forward) give every masked cell an argmax token and its
   confidence;
2. an adaptive unmasking policy (`threshold`, `factor` or the LocalLeap-style
   `local`, from `decoding.policies`) commits cells right away;
3. from the *same* confidence ranking, nested drafts: draft d additionally
   fills the next d most confident masked cells with their argmax (depths
   `depths`, default 1, 3, 5, 7), with no model call;
4. one batched forward scores view 0 (the canvas after step 2) and every
   draft together (batch = 1 + number of drafts per sequence, one NFE);
5. hierarchical acceptance: draft j is consistent when draft j-1 is and the
   cells draft j adds are exactly what the verification of draft j-1 now
   predicts there (they are still masked in that view, so this is the MDM's
   proper masked prediction, not a re-reading of a visible token). The
   deepest consistent draft is kept and its logits seed the next iteration,
   so verification and the next draft share one call.

View 0 is what makes step 5 possible for the shallowest draft and gives a
seed when every draft fails; it costs one row of the batch.

Lossless (`lossless=True`, in the spirit of FreeDave / self-speculative
decoding): the policy is one-token confidence-greedy, depths are every
1..D, and draft j is accepted only if greedy decoding on the canvas of draft
j-1 would pick exactly the cell *and* token that draft j adds. The accepted
canvas is therefore always one greedy decoding reached, and the output equals
vanilla `low_confidence` greedy with steps = gen_length token for token,
with 1 + (accepted depth) tokens per call.

Caches: `none` verifies full canvases and reuses the accepted view's logits
across block boundaries; `prefix` / `dual` run one plain forward at each block
start (Fast-dLLM's refresh), keep the K/V of the columns before the block
(prefix) or outside it (dual), and feed only [block start, end of canvas) or
the block itself for every view, sharing the stored K/V across views.

Cost: one meter entry "model"; a batched verification is one forward whose
batch size is recorded (`max_batch`) and whose FLOPs count every view.
Tokens per forward therefore rises with depth while each forward gets more
expensive: compare TPF *and* wall clock.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..decoding.config import DecodeConfig, WrapsDecodeConfig, check_field_types, full_steps
from ..decoding.capabilities import capabilities
from ..decoding.diffusion import run_batches
from ..decoding.runner import GenerationResult
from ..decoding.meter import CostMeter, MeteredModel, meter_primary
from ..decoding.policies import select_topk
from ..decoding.propose import propose, select
from ..decoding.state import Canvas
from ..decoding.streamer import CanvasReporter, Streamer
from ..models.tokenizer import Tokenizer
from ..options import parse_depths

PSD_CACHES = ("none", "prefix", "dual")
PSD_POLICIES = ("threshold", "factor", "local")
DEFAULT_DEPTHS = (1, 3, 5, 7)
LOSSLESS_DEPTH = 7  # default D of the lossless variant: drafts of every depth 1..7
_GREEDY = DecodeConfig()  # temperature 0, low_confidence: the decoder lossless PSD must reproduce


DRAFT_ORDERS = ("confidence", "position")


@dataclass(frozen=True)
class PSDConfig(WrapsDecodeConfig):
    """Options of a PSD run. `decode` fixes the canvas, batch, seed, cache and commit policy."""

    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(policy="threshold", threshold=0.9))
    depths: tuple[int, ...] = DEFAULT_DEPTHS
    lossless: bool = False
    # Beyond the paper (issue #23): a drafted cell is also required to have the verifier's
    # probability >= accept_threshold for its token in the view that checks it; 0 = PSD's rule
    # (argmax agreement only).
    accept_threshold: float = 0.0
    # Beyond the paper (issue #23): "position" nests the drafts left to right (draft j = the
    # depths[j] leftmost masked cells), so each drafted cell is checked by a view in which every
    # cell to its left is filled, as AR speculative decoding checks a draft; "confidence" is PSD's.
    draft_order: str = "confidence"

    def __post_init__(self) -> None:
        d = self.decode
        if not isinstance(d, DecodeConfig):
            raise ValueError(f"decode must be a DecodeConfig, got {type(d).__name__}")
        object.__setattr__(self, "depths", parse_depths(self.depths))
        if isinstance(self.accept_threshold, int) and not isinstance(self.accept_threshold, bool):
            object.__setattr__(self, "accept_threshold", float(self.accept_threshold))
        check_field_types(self)
        if not 0.0 <= self.accept_threshold <= 1.0:  # also rejects NaN
            raise ValueError(f"accept_threshold must be in [0, 1] (0 = argmax agreement only), "
                             f"got {self.accept_threshold}")
        if self.draft_order not in DRAFT_ORDERS:
            raise ValueError(f"draft_order must be one of {', '.join(DRAFT_ORDERS)}, got {self.draft_order!r}")
        if self.lossless and self.draft_order != "confidence":
            raise ValueError("lossless PSD drafts the greedy order (draft_order 'confidence')")
        if self.lossless and self.accept_threshold:
            raise ValueError("lossless PSD accepts exactly the greedy steps; it does not take accept_threshold")
        if not self.depths:
            raise ValueError("depths is empty; give at least one draft depth, e.g. 1,3,5,7")
        if any(b <= a for a, b in zip(self.depths, self.depths[1:])):
            raise ValueError(f"depths must be strictly increasing, got {list(self.depths)}")
        if self.depths[0] < 1:
            raise ValueError(f"draft depths must be >= 1, got {list(self.depths)}")
        if self.depths[-1] >= d.block_length:
            raise ValueError(f"draft depth {self.depths[-1]} does not fit a block of {d.block_length} "
                             f"(at least one cell is committed first); use depths < block_length")
        if d.temperature != 0:
            raise ValueError("PSD drafts the argmax of each cell; use temperature 0")
        if d.remasking != "low_confidence":
            raise ValueError("PSD ranks cells by confidence; use remasking 'low_confidence'")
        if d.cfg_scale != 0:
            raise ValueError("PSD does not support classifier-free guidance (cfg_scale must be 0)")
        if d.logits_eos_inf or d.confidence_eos_eot_inf:
            raise ValueError("PSD does not support logits_eos_inf / confidence_eos_eot_inf (LLaDA sampler options "
                             "of vanilla, fast-dllm, dkv-cache and the dualdiffusion drafter); leave them off")
        if d.cache not in PSD_CACHES:
            raise ValueError(f"PSD supports caches {', '.join(PSD_CACHES)}, not {d.cache!r}")
        if self.lossless:
            if d.cache != "none":
                raise ValueError("lossless PSD must match greedy decoding exactly, which needs cache 'none'")
            if self.depths != tuple(range(1, len(self.depths) + 1)):
                raise ValueError(f"lossless PSD checks every greedy step, so depths must be 1..D, got {list(self.depths)}")
        elif d.policy not in PSD_POLICIES:
            raise ValueError(f"PSD commits with an adaptive policy ({', '.join(PSD_POLICIES)}), not {d.policy!r}")

    def replace(self, **kw: Any) -> "PSDConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decode"] = self.decode.to_dict()
        d["depths"] = list(self.depths)
        return d


@dataclass
class PSDStats:
    iterations: int = 0  # verification forwards (summed over rows that were still decoding)
    committed: int = 0  # cells the policy committed before drafting
    drafted: int = 0  # cells offered by the deepest draft of each iteration
    accepted: int = 0  # drafted cells kept by hierarchical acceptance
    seed_forwards: int = 0  # plain forwards that (re)seeded a block

    def add(self, other: "PSDStats") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["accepted_per_iteration"] = self.accepted / self.iterations if self.iterations else 0.0
        d["tokens_per_iteration"] = (self.accepted + self.committed) / self.iterations if self.iterations else 0.0
        d["acceptance_rate"] = self.accepted / self.drafted if self.drafted else 0.0
        return d


# ---------------------------------------------------------------- pure pieces (unit-tested)

def nested_drafts(conf: Tensor, depths: Sequence[int]) -> Tensor:
    """Cells each nested draft adds, from one confidence ranking.

    conf: (B, L) with -inf on cells that may not be drafted. Returns bool
    (J, B, L): draft j covers the depths[j] most confident candidates of each
    row (fewer when the row has fewer), ties to the lower column, so draft j
    contains draft j-1.
    """
    order = conf.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    finite = torch.isfinite(conf)
    d = torch.tensor(list(depths), device=conf.device)
    return (ranks[None] < d[:, None, None]) & finite[None]


def leftmost_first(conf: Tensor) -> Tensor:
    """A ranking key under which `nested_drafts` takes the draftable cells left to right."""
    cols = torch.arange(conf.shape[-1], device=conf.device, dtype=torch.float64)
    return torch.where(torch.isfinite(conf), -cols, torch.tensor(-torch.inf, dtype=torch.float64,
                                                                  device=conf.device))


def hierarchical_accept(drafts: Tensor, tokens: Tensor, predicted: Tensor, sure: Tensor | None = None) -> Tensor:
    """Index of the deepest consistent view per row (0 = no draft kept).

    drafts: bool (J, B, L) cells of each nested draft; tokens: (B, L) drafted
    tokens; predicted: (J + 1, B, L) the verifier's argmax on view 0 (no
    draft) and on each draft. Draft j is consistent when draft j-1 is, it adds
    at least one cell, and every added cell equals what view j-1 predicts there
    (and, with `sure` (J + 1, B, L), is a cell view j-1 is confident about).
    """
    def consistent(j: int, new: Tensor, prev: Tensor) -> Tensor:
        ok = predicted[j] == tokens
        if sure is not None:
            ok = ok & sure[j]
        return (ok | ~new).all(-1)

    return _deepest_chain(drafts, consistent)


def greedy_chain_accept(drafts: Tensor, tokens: Tensor, logits: Tensor, candidates: Tensor) -> Tensor:
    """Lossless acceptance: the deepest view reached by a chain of exact greedy steps.

    drafts (J, B, L) nested with one new cell per depth; logits (J + 1, B, L, V)
    of view 0..J; candidates (B, L) cells masked in view 0 (inside the block).
    Draft j is accepted when draft j-1 is and greedy decoding on view j-1
    (argmax token of the most confident masked cell, ties to the lower column)
    picks exactly the cell and token draft j adds.
    """
    def greedy_step_matches(j: int, new: Tensor, prev: Tensor) -> Tensor:
        x0, conf = propose(logits[j], _GREEDY, None)  # exactly the vanilla greedy decoder's scores
        pick = select_topk(conf.masked_fill(~(candidates & ~prev), -torch.inf), 1)
        return (pick == new).all(-1) & ((x0 == tokens) | ~new).all(-1)

    return _deepest_chain(drafts, greedy_step_matches)


def _deepest_chain(drafts: Tensor, consistent: Callable[[int, Tensor, Tensor], Tensor]) -> Tensor:
    """Walk the nested drafts in depth order; draft j survives while every draft up to
    it adds at least one cell and `consistent(j, added cells, cells of draft j-1)` holds
    per row. Returns the deepest surviving draft's index + 1 per row (0: none)."""
    prev = torch.zeros_like(drafts[0])
    ok = torch.ones(drafts.shape[1], dtype=torch.bool, device=drafts.device)
    best = torch.zeros(drafts.shape[1], dtype=torch.long, device=drafts.device)
    for j in range(drafts.shape[0]):
        new = drafts[j] & ~prev
        ok = ok & new.any(-1) & consistent(j, new, prev)
        best = torch.where(ok, torch.full_like(best, j + 1), best)
        prev = drafts[j]
    return best


# ---------------------------------------------------------------- views and caches

class SharedKV:
    """K/V of some columns from one forward of the B-row canvas, shared by K views.

    Implements the model's KVCacheHook. `record` mode stores the chosen
    columns' K/V during a plain forward; `use` mode makes a forward over
    K·B view rows attend to the stored K/V (repeated per view, never copied
    back) plus the fresh K/V of the columns it feeds.
    """

    def __init__(self, n_layers: int):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.cols = torch.empty(0, dtype=torch.long)
        self.mode, self.views, self.last_n_keys = "record", 1, 0
        self.key_cols = torch.empty(0, dtype=torch.long)  # the keys a `use` forward attends to, in order

    def key_mask(self, attention_mask: Tensor | None, n_query: int) -> Tensor | None:
        if self.mode == "record" or attention_mask is None:
            return attention_mask
        return attention_mask[:, self.key_cols]

    def layer(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.mode == "record":
            self.k[index], self.v[index] = k[:, :, self.cols], v[:, :, self.cols]
            return k, v
        ks, vs = self.k[index].repeat(self.views, 1, 1, 1), self.v[index].repeat(self.views, 1, 1, 1)
        return torch.cat([ks, k], dim=2), torch.cat([vs, v], dim=2)


class ViewScorer:
    """Runs the model on the canvas (seeding) and on K stacked views (verifying), per cache."""

    def __init__(self, model: MeteredModel, canvas: Canvas, cache: str):
        self.model, self.canvas, self.cache = model, canvas, cache
        self.kv = SharedKV(model.config.n_layers) if cache != "none" else None
        self.s = self.e = 0
        # A shifted network (Dream) scores cell i from its output at i - 1, so a cached
        # verification also feeds the column before the block; its forward shifts inside the
        # fed slice, which is exact for every column but the slice's first, never read.
        self.lead = int(capabilities(model).logits_shifted)

    def seed(self, s: int, e: int, working: int) -> Tensor:
        """Plain forward of the canvas at a block start; returns generation-region logits (B, L, V)."""
        c = self.canvas
        self.s, self.e = s, e
        if self.kv is None:
            logits = self.model(c.x, attention_mask=c.attention_mask, sequences=working).logits
        else:
            cols = torch.arange(c.length, device=c.x.device)
            lo = s - self.lead
            keep = cols < lo if self.cache == "prefix" else (cols < lo) | (cols >= e)
            self.kv.cols, self.kv.mode = cols[keep], "record"
            self.kv.last_n_keys = c.length
            logits = self.model(c.x, attention_mask=c.attention_mask, kv_cache=self.kv, sequences=working).logits
        return _no_mask(logits[:, c.prompt_len :], c.mask_id)

    def verify(self, views: Tensor, working: int) -> tuple[Tensor, int]:
        """views (K, B, T) -> (logits (K, B, n, V) of the fed columns from the block start, n)."""
        c = self.canvas
        K, B, T = views.shape
        att = c.attention_mask.repeat(K, 1)
        if self.kv is None:
            out = self.model(views.reshape(K * B, T), attention_mask=att, sequences=working).logits[:, self.s :]
        else:
            hi = T if self.cache == "prefix" else self.e
            lo = self.s - self.lead
            fed = torch.arange(lo, hi, device=c.x.device)
            self.kv.mode, self.kv.views = "use", K
            self.kv.key_cols = torch.cat([self.kv.cols.to(fed.device), fed])
            self.kv.last_n_keys = len(self.kv.key_cols)
            out = self.model(views[:, :, lo:hi].reshape(K * B, -1), positions=fed, attention_mask=att,
                             kv_cache=self.kv, sequences=working).logits[:, self.lead :]
        out = _no_mask(out, c.mask_id)
        return out.reshape(K, B, out.shape[1], -1), out.shape[1]


def _no_mask(logits: Tensor, mask_id: int) -> Tensor:
    """Never propose the mask token (committing it would leave the cell masked forever)."""
    return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)


# ---------------------------------------------------------------- the loop

def psd_decode_canvas(model: MeteredModel, canvas: Canvas, cfg: PSDConfig,
                      streamer: Streamer | None = None) -> PSDStats:
    """Fill every masked cell of `canvas` in place, block by block, one batched call per iteration.
    A committed cell is never taken back, so `streamer` hears every commit before the next forward."""
    dc, stats = cfg.decode, PSDStats()
    report = CanvasReporter(streamer, canvas) if streamer is not None else None
    P, bl = canvas.prompt_len, dc.block_length
    scorer = ViewScorer(model, canvas, dc.cache)
    seed_gen: Tensor | None = None  # logits (B, L, V) of the current canvas's generation region, if fresh
    for b in range(dc.num_blocks):
        s, e = canvas.block_bounds(b, bl)
        if not canvas.masked()[:, s:e].any():
            continue
        if seed_gen is None or dc.cache != "none":
            working = int(canvas.masked()[:, s:e].any(1).sum())
            seed_gen = scorer.seed(s, e, working)
            stats.seed_forwards += 1
        else:
            scorer.s, scorer.e = s, e
        seed = seed_gen[:, s - P : e - P]
        for _ in range(bl + 1):
            if report is not None and report.tick():
                return stats
            masked = canvas.x[:, s:e] == canvas.mask_id
            working_rows = masked.any(1)
            if not working_rows.any():
                break
            x0, conf = propose(seed, dc, None)
            conf = conf.masked_fill(~masked, -torch.inf)
            chosen = select_topk(conf, 1) if cfg.lossless else select(conf, dc, 1)
            canvas.x[:, s:e] = torch.where(chosen, x0, canvas.x[:, s:e])
            stats.committed += int(chosen.sum())
            rest = conf.masked_fill(chosen, -torch.inf)
            if not torch.isfinite(rest).any():  # the policy finished the block in every row
                seed_gen = None
                break
            drafts = nested_drafts(rest if cfg.draft_order == "confidence" else leftmost_first(rest),
                                   cfg.depths)  # (J, B, bl)
            views = canvas.x[None].repeat(len(cfg.depths) + 1, 1, 1)
            views[1:, :, s:e] = torch.where(drafts, x0[None], views[1:, :, s:e])
            logits, n = scorer.verify(views, int(working_rows.sum()))  # (J+1, B, n, V), columns from s
            block_logits = logits[:, :, : e - s]
            if cfg.lossless:
                best = greedy_chain_accept(drafts, x0, block_logits, rest > -torch.inf)
            else:
                sure = None
                if cfg.accept_threshold > 0:
                    p_max = block_logits.float().softmax(-1).amax(-1)
                    sure = p_max >= cfg.accept_threshold
                best = hierarchical_accept(drafts, x0, block_logits.argmax(-1), sure)
            rows = torch.arange(canvas.batch_size, device=canvas.x.device)
            canvas.x[:, s:e] = views[best, rows, s:e]
            stats.iterations += int(working_rows.sum())
            stats.drafted += int(drafts[-1].sum())
            stats.accepted += int(drafts[best.clamp(min=1) - 1, rows].sum(-1)[best > 0].sum())
            chosen_logits = logits[best, rows]  # (B, n, V)
            seed = chosen_logits[:, : e - s]
            if dc.cache == "none":  # the accepted view's logits also seed the next block
                seed_gen = _pad_front(chosen_logits, s - P)
        else:
            raise RuntimeError(f"PSD block {b} still has masks after {bl + 1} iterations; the logits may contain NaN")
    if report is not None:
        report()
    return stats


def _pad_front(logits: Tensor, n: int) -> Tensor:
    """Generation-region logits whose first n columns (already decoded blocks) are never read."""
    return torch.cat([logits.new_zeros(logits.shape[0], n, logits.shape[2]), logits], dim=1) if n else logits


@torch.inference_mode()
def psd_generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: PSDConfig,
    progress: bool = False,
    meter: CostMeter | None = None,
    streamer: Streamer | None = None,
) -> GenerationResult:
    """Decode `prompts` with PSD (or its lossless variant) on one masked diffusion model; on a
    block-causal one (LLaDA2, SDAR), within each block on the exact block cache (`speculative.block`)."""
    from .block import is_block_causal, psd_block_generate

    if is_block_causal(model):
        return psd_block_generate(model, tokenizer, prompts, cfg, progress=progress, meter=meter, streamer=streamer)
    meter, metered = meter_primary(model, meter)
    stats = PSDStats()

    def decode_batch(canvas: Canvas, stream: Streamer | None) -> None:
        stats.add(psd_decode_canvas(metered, canvas, cfg, stream))

    name = "psd-lossless" if cfg.lossless else f"psd[{cfg.decode.policy},{cfg.decode.cache}]"
    token_ids, texts, raw = run_batches(model, tokenizer, prompts, cfg.decode, meter, decode_batch,
                                        desc=name, progress=progress, streamer=streamer)
    return GenerationResult(token_ids, texts, meter, cfg, raw, stats=stats.summary())


def build_psd_config(base: PSDConfig | DecodeConfig | None = None, **options: Any) -> PSDConfig:
    """PSD options -> PSDConfig (None means 'not given').

    DecodeConfig fields shape the canvas, batch, cache (none/prefix/dual) and
    the commit policy (threshold 0.9 by default); `depths` and `lossless` are
    PSD's own. The lossless variant fixes its policy (one-token greedy), so a
    policy or threshold given with it is an error rather than silently ignored.
    """
    given = {k: v for k, v in options.items() if v is not None}
    decode_fields = set(DecodeConfig.__dataclass_fields__)
    own = set(PSDConfig.__dataclass_fields__) - {"decode"}
    unknown = set(given) - decode_fields - own
    if unknown:
        raise ValueError(f"unknown psd option(s) {sorted(unknown)}; valid: {sorted(decode_fields | own)}")
    if isinstance(base, PSDConfig):
        decode, loop = base.decode.to_dict(), {"depths": base.depths, "lossless": base.lossless,
                                               "accept_threshold": base.accept_threshold,
                                               "draft_order": base.draft_order}
    else:
        decode, loop = {**(base.to_dict() if base else {}), "policy": "threshold", "threshold": 0.9}, {}
        decode["steps"] = decode.get("steps", decode.get("gen_length", 48))
    loop.update({k: v for k, v in given.items() if k in own})
    decode.update({k: v for k, v in given.items() if k in decode_fields})
    full_steps(decode, given, base)
    if loop.get("lossless"):
        fixed = sorted({"policy", "threshold", "factor", "local_threshold", "local_radius"} & set(given))
        if fixed:
            raise ValueError(f"lossless PSD commits one greedy token per step; it does not take {', '.join(fixed)}")
        decode["policy"] = "schedule"
        if "depths" not in given:
            loop["depths"] = tuple(range(1, LOSSLESS_DEPTH + 1))
    return PSDConfig(decode=DecodeConfig(**decode), **loop)
