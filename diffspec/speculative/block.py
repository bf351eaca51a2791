"""PSD and DualDiffusion within a block of a block-causal model (LLaDA2, SDAR), on the exact block cache.

A block-causal model decodes block by block, and a finished block's keys and values never change,
so the exact cache of `decoding.llada2` sits under every forward here, and a batched forward that
scores several versions of the current block shares that one cached prefix (`BlockForward`). Both
methods run inside the block samplers' loop (`decode_block_causal_row`: block grid from column 0,
EOS stop), replacing only the rule that commits cells within a block:

- **PSD** (`psd_block_steps`): one forward's ranking gives the commit (the threshold or factor rule,
  with the schedule's floor) and, with no model call, nested drafts of the next most confident
  masked cells (`--draft-order position`: the leftmost); one batched forward scores the committed
  block and every draft; the deepest draft whose added cells all equal what the shallower view
  predicts there is kept, and its logits seed the next iteration. As `speculative.psd`, block for
  block, with the block cache in place of Fast-dLLM's approximate ones.
- **DualDiffusion** with the model as its own drafter (`dual_block_steps`): the drafter runs
  `num_drafter_steps` steps of its commit rule (a lower threshold than the verifier would accept
  alone); the verifier then scores, in one batched forward, each drafted cell with the drafts to
  its left filled (`verifier_view` leftward; `masked`: every draft hidden), keeps the drafts up to
  the first one whose token is not its argmax (exact match), re-masks the rest, and decodes one
  cell itself: the correction at the first rejection or, when every draft stood, its most confident
  masked cell (`verifier_unmask` 1, the reference's default; 0 turns it off, and the progress guard
  then fills a stalled block's first rejected cell).

Options of the full-canvas methods that have no meaning here are refused with one line (PSD's
lossless variant and local policy; DualDiffusion's other rules, views, drafters and rollbacks).
The caches map as the model's attention dictates: `none` recomputes the window every step (the
reference's loop); `prefix` and `dual` are exact on a block-causal model (nothing attends to a later
block) and mean the block cache.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..decoding.llada2 import (BlockForward, BlockSteps, decode_block_causal_row, even_schedule, factor_or_topk,
                               run_block_sampler, threshold_or_topk)
from ..decoding.meter import CostMeter, MeteredModel
from ..decoding.runner import GenerationResult, eos_ids
from ..decoding.streamer import RowReporter, Streamer
from ..models.tokenizer import Tokenizer
from .dualdiffusion import SpecStats
from .psd import PSDStats, _no_mask, hierarchical_accept, leftmost_first, nested_drafts

__all__ = ["is_block_causal", "psd_block_generate", "dual_block_generate", "psd_block_steps", "dual_block_steps"]

Choose = Callable[[Tensor, Tensor, int], Tensor]


def is_block_causal(model: torch.nn.Module) -> bool:
    """A model whose blocks attend only to themselves and earlier blocks (LLaDA2, SDAR)."""
    from ..decoding.capabilities import unwrapped

    return bool(getattr(unwrapped(model), "block_causal", False))


@dataclass(frozen=True)
class _BlockRun:
    """What `run_block_sampler` reads of a config: the canvas, the block cache, seed and batch."""

    gen_length: int
    block_length: int
    steps_per_block: int
    cache: str
    seed: int
    batch_size: int

    def replace(self, **kw: Any) -> "_BlockRun":
        return replace(self, **kw)


def _block_run(decode: Any, method: str) -> _BlockRun:
    """The block loop's settings from a full-canvas method's DecodeConfig, checked: the cache maps to
    the exact one (see the module docstring); every iteration commits at least one cell, as the
    full-canvas methods' threshold and factor policies do, so a block takes at most block_length
    iterations and `steps` is not used (as on the full canvas under those policies)."""
    L, G = decode.block_length, decode.gen_length
    cache = {"none": "none", "prefix": "block", "dual": "block"}.get(decode.cache)
    if cache is None:
        raise ValueError(f"method {method!r} on a block-causal model takes cache none (recompute the window) or "
                         f"prefix / dual (both are the exact block cache there); got {decode.cache!r}")
    bad = []
    if decode.policy not in ("threshold", "factor"):
        bad.append(f"policy {decode.policy!r} (threshold or factor)")
    if decode.remasking != "low_confidence" or decode.temperature != 0:
        bad.append("random remasking or a temperature (cells are ranked by the argmax's confidence)")
    if decode.cfg_scale != 0 or decode.logits_eos_inf or decode.confidence_eos_eot_inf:
        bad.append("cfg_scale / logits_eos_inf / confidence_eos_eot_inf (vanilla LLaDA's sampler options)")
    if bad:
        raise ValueError(f"{method} on a block-causal model does not take " + "; ".join(bad))
    return _BlockRun(G, L, L, cache, decode.seed, decode.batch_size)


def _commit_rule(decode: Any) -> Choose:
    """The threshold or factor rule of `decode` (floored at the schedule's k), as the block samplers."""
    if decode.policy == "factor":
        return lambda conf, active, k: factor_or_topk(conf, active, k, decode.factor)
    return lambda conf, active, k: threshold_or_topk(conf, active, k, decode.threshold)


def _greedy(logits: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Argmax token and its probability per cell; the mask token never proposed."""
    probs = F.softmax(_no_mask(logits.float(), mask_id), dim=-1)
    conf, tok = probs.max(dim=-1)
    return tok, conf


def _masked_conf(conf: Tensor, active: Tensor) -> Tensor:
    return torch.where(active, conf, torch.tensor(-torch.inf, device=conf.device))


# ---------------------------------------------------------------- PSD within a block

def psd_block_steps(depths: Sequence[int], draft_order: str, accept_threshold: float, schedule: Sequence[int],
                    choose: Choose, stats: PSDStats) -> BlockSteps:
    """PSD's iterations on one block (see the module docstring); at most len(schedule) iterations,
    each committing at least the schedule's k cells, so a block ends within its steps."""

    def run(forward: BlockForward, x: Tensor, s: int, e: int, mask_id: int) -> Iterator[Tensor]:
        seed = None
        for k in schedule:
            active = x[s:e] == mask_id
            if not active.any():
                return
            if seed is None:
                seed = forward()[0]
                stats.seed_forwards += 1
            tok, conf = _greedy(seed, mask_id)
            chosen = choose(_masked_conf(conf, active), active, k)
            x[s:e] = torch.where(chosen, tok, x[s:e])
            stats.committed += int(chosen.sum())
            yield tok[chosen]
            rest = _masked_conf(conf, x[s:e] == mask_id)
            if not torch.isfinite(rest).any():
                return
            key = leftmost_first(rest[None]) if draft_order == "position" else rest[None]
            drafts = nested_drafts(key, depths)  # (J, 1, L)
            views = torch.cat([x[None, s:e], torch.where(drafts[:, 0], tok, x[s:e])])
            logits = _no_mask(forward(views), mask_id)
            sure = None
            if accept_threshold > 0:
                probs = F.softmax(logits.float(), dim=-1).max(dim=-1).values
                sure = (probs >= accept_threshold)[:, None]
            j = int(hierarchical_accept(drafts, tok[None], logits.argmax(-1)[:, None], sure)[0])
            stats.iterations += 1
            stats.drafted += int(drafts[-1].sum())
            seed = logits[j]
            if j:
                added = drafts[j - 1, 0]
                x[s:e] = views[j]
                stats.accepted += int(added.sum())
                yield tok[added]

    return run


def psd_block_generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: Any,
                       progress: bool = False, meter: CostMeter | None = None,
                       streamer: Streamer | None = None) -> GenerationResult:
    """PSD (`cfg`: a `PSDConfig`) on a block-causal model, block by block on the exact cache."""
    if cfg.lossless:
        raise ValueError("lossless PSD reproduces vanilla LLaDA's one-token greedy decoding over the whole canvas; "
                         "on a block-causal model use method psd without lossless (or llada2 / sdar)")
    run_cfg = _block_run(cfg.decode, "psd")
    choose = _commit_rule(cfg.decode)
    stats = PSDStats()
    stops = eos_ids(model)
    steps = psd_block_steps(cfg.depths, cfg.draft_order, cfg.accept_threshold,
                            even_schedule(run_cfg.block_length, run_cfg.steps_per_block), choose, stats)
    result = _run(model, tokenizer, prompts, run_cfg, steps, stops, "psd", progress, meter, streamer)
    return GenerationResult(result.token_ids, result.texts, result.meter, cfg, result.raw_ids, stats=stats.summary())


# ---------------------------------------------------------------- DualDiffusion within a block

def _draft(forward: BlockForward, drafter: MeteredModel, x: Tensor, s: int, e: int, mask_id: int, n_steps: int,
           choose: Choose) -> Tensor:
    """The drafter's steps on the block (floor one cell a step); returns the block before them."""
    start = x[s:e].clone()
    for _ in range(n_steps):
        active = x[s:e] == mask_id
        if not active.any():
            break
        tok, conf = _greedy(forward(model=drafter)[0], mask_id)
        chosen = choose(_masked_conf(conf, active), active, 1)
        x[s:e] = torch.where(chosen, tok, x[s:e])
    return start


def _verify_leftward(forward: BlockForward, verifier: MeteredModel, x: Tensor, s: int, e: int, start: Tensor,
                     cols: Tensor, view: str, mask_id: int) -> tuple[int, Tensor]:
    """How many drafts (at block columns `cols`, left to right) stand, and the verifier's logits of
    the view that judged the first rejected one (or of the whole accepted block)."""
    drafted = x[s:e].clone()
    views = [start.clone() for _ in range(len(cols) + 1)]
    if view == "leftward":
        for i in range(1, len(cols) + 1):
            views[i][cols[:i]] = drafted[cols[:i]]
    else:  # masked: every draft hidden, except in the last view (the accepted block, for the bonus cell)
        views = [start.clone(), start.clone()]
    views[-1][cols] = drafted[cols]
    logits = _no_mask(forward(torch.stack(views), model=verifier), mask_id)
    judge = logits[torch.arange(len(cols)) if view == "leftward" else torch.zeros(len(cols), dtype=torch.long)]
    ok = judge[torch.arange(len(cols)), cols].argmax(-1) == drafted[cols]
    n_ok = int(ok.long().cumprod(0).sum())
    if n_ok == len(cols):
        return n_ok, logits[-1]
    return n_ok, judge[n_ok]


def dual_block_steps(n_drafter_steps: int, verifier_unmask: int, progress_guard: bool, view: str, choose: Choose,
                     drafter: MeteredModel, verifier: MeteredModel, max_iterations: int,
                     stats: SpecStats) -> BlockSteps:
    """DualDiffusion's iterations on one block with the model as its own drafter (module docstring)."""

    def run(forward: BlockForward, x: Tensor, s: int, e: int, mask_id: int) -> Iterator[Tensor]:
        for _ in range(max_iterations):
            if not (x[s:e] == mask_id).any():
                return
            start = _draft(forward, drafter, x, s, e, mask_id, n_drafter_steps, choose)
            cols = (x[s:e] != start).nonzero().flatten()
            stats.iterations += 1
            stats.drafter_steps += n_drafter_steps
            stats.drafted += len(cols)
            n_ok, logits = _verify_leftward(forward, verifier, x, s, e, start, cols, view, mask_id)
            block = x[s:e]
            block[cols[n_ok:]] = mask_id
            if n_ok < len(cols):
                stats.remasked += 1
                stats.discarded += len(cols) - n_ok - 1
            tok, conf = _greedy(logits, mask_id)
            active = block == mask_id
            fill = None
            if n_ok < len(cols) and (verifier_unmask or (progress_guard and n_ok == 0)):
                fill = int(cols[n_ok])  # the correction: the verifier's token where the first draft failed
                stats.verifier_unmasked += bool(verifier_unmask)
                stats.guard_fills += not verifier_unmask
            elif n_ok == len(cols) and verifier_unmask and active.any():
                fill = int(_masked_conf(conf, active).argmax())
                stats.verifier_unmasked += 1
            if fill is not None:
                block[fill] = tok[fill]
            new = block != start
            if new.any():
                yield block[new]

    return run


def _check_dual(cfg: Any) -> None:
    """One line for each DualDiffusion option the block variant cannot honour."""
    bad = []
    if cfg.drafter != "self":
        bad.append(f"drafter {cfg.drafter!r} (the block variant drafts with the model itself: drafter self)")
    if cfg.rule != "exact_match":
        bad.append(f"rule {cfg.rule!r} (exact_match only)")
    if cfg.verifier_view not in ("leftward", "masked"):
        bad.append(f"verifier_view {cfg.verifier_view!r} (leftward or masked)")
    if cfg.rollback != "discard":
        bad.append("rollback keep (discard only)")
    if cfg.num_verifier_steps != 1 or cfg.adaptive_drafter_steps:
        bad.append("num_verifier_steps > 1 / adaptive_drafter_steps (one verification per iteration)")
    if cfg.decode.temperature != 0:
        bad.append(f"temperature {cfg.decode.temperature} (drafts and verdicts are argmax: temperature 0)")
    if cfg.max_iterations is not None:
        bad.append("max_iterations (a block runs until it has no masked cell, at most block-length iterations)")
    if cfg.verifier_unmask == 0 and not cfg.progress_guard:
        bad.append("verifier_unmask 0 without the progress guard (a rejected first draft would be drafted and "
                   "rejected again forever, leaving masks in the answer)")
    if cfg.verifier_unmask not in (0, 1):
        bad.append(f"verifier_unmask {cfg.verifier_unmask} (0 or 1)")
    if bad:
        raise ValueError("dualdiffusion on a block-causal model does not take " + "; ".join(bad))


def dual_block_generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: Any,
                        progress: bool = False, meter: CostMeter | None = None,
                        streamer: Streamer | None = None) -> GenerationResult:
    """DualDiffusion (`cfg`: a `DualConfig`, drafter self) on a block-causal model, on the exact cache.
    The drafter's commit rule is `cfg.decode`'s (its --drafter-threshold); cost goes to the meter's
    "drafter" and "verifier" entries, the verifier primary, as in the full-canvas method."""
    _check_dual(cfg)
    run_cfg = _block_run(cfg.decode, "dualdiffusion")
    meter = meter or CostMeter(primary="verifier")
    meter.primary = "verifier"
    stats = SpecStats()  # the full-canvas method's counters (replaced and finish_filled stay 0 here)
    steps = dual_block_steps(cfg.num_drafter_steps, cfg.verifier_unmask, cfg.progress_guard, cfg.verifier_view,
                             _commit_rule(cfg.decode), MeteredModel(model, meter, "drafter"),
                             MeteredModel(model, meter, "verifier"), run_cfg.block_length, stats)
    result = _run(model, tokenizer, prompts, run_cfg, steps, eos_ids(model), "dualdiffusion", progress, meter,
                  streamer)
    return GenerationResult(result.token_ids, result.texts, result.meter, cfg, result.raw_ids, stats=stats.summary())


def _run(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], run_cfg: _BlockRun,
         steps: BlockSteps, stops: Sequence[int], method: str, progress: bool, meter: CostMeter | None,
         streamer: Streamer | None) -> GenerationResult:
    """The block samplers' row loop with `steps` as the rule within a block (EOS early stop on)."""
    mask_id = model.config.mask_token_id

    def row(metered: MeteredModel, p: Sequence[int], cfg: _BlockRun, generator: torch.Generator,
            device: torch.device, bidirectional: bool, report: RowReporter | None) -> list[int]:
        return decode_block_causal_row(
            metered, p, block_length=cfg.block_length, gen_length=cfg.gen_length, schedule=(), choose=None,
            sample=None, stop_ids=stops, early_stop=True, cache=cfg.cache == "block", mask_id=mask_id,
            device=device, bidirectional=bidirectional, report=report, steps=steps)

    return run_block_sampler(model, tokenizer, prompts, run_cfg, row, method=method, needs="LLaDA2 / SDAR",
                             eos=stops, progress=progress, meter=meter, streamer=streamer)
