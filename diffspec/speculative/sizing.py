"""Speculation sized for the device it runs on (`k="auto"`, `drafts="auto"`, `gamma="auto"`, issue #34).

Three sizes trade a longer accepted path against a costlier verification, and
what a wider verification costs depends on the device and the kernels: on a GPU a
verification of 100 tree nodes costs about what one token costs; on the project's
2-core CPU (benchmarks/verify-cost-cpu, 2026-12-07) 2 tokens cost 1.1× one token, 5
cost 1.7× and 16 cost 2.7× with the weight-left matmul, where through F.linear 3
tokens had cost 2.0× and 5 only 1.3×.
- D²SD's K, how many rejection boundaries the VP drafter re-anchors (its tree,
  and the VP drafter's batch of K + 1 windows, grow with K), timed beside a few
  small trees (`SMALL_TREES`: K, drafts and branch set together) when the
  caller left drafts and branch to their defaults;
- DFlash's `drafts`, how many of the block's γ − 1 drafts the target verifies
  (a draft the drafter rarely gets right costs a verified token and returns
  little: on SmolLM2 with τ ≈ 2, verifying 3 instead of 15 ran 1.3× faster);
- ar-spec's γ, the chain the AR drafter proposes (each draft is one drafter
  forward, and the verification's width has a cost of its own).
The gain depends on the drafters and the text. Neither is known before
decoding, so `auto_size` measures both: it decodes the first prompt's first
`AUTO_TOKENS` tokens at each candidate size, twice, in opposite orders (so a
slow spell of a busy machine does not fall on one size only), and keeps the
size with the most tokens per second (the fastest of each size's two runs).
Greedy output is the same at every size (each is AR greedy's), so the choice
changes only speed; with sampling the choice fixes the random stream, so pass
the reported size to reproduce a run elsewhere.

DFlash's `drafts` is estimated instead of swept (`estimate_chain`): its drafter
fills its whole window whatever is verified, so a round verifying N drafts keeps
the same first N tokens, and accepts min(a, N) of the a that the widest would
have had accepted. One decode at the widest size gives each round's a (and the
drafter's confidences, which price `shorten_below`) and what a round costs; the
target's verification of N + 1 tokens, timed alone for each N, prices what
grows with N. On SmolLM2 (two threads, one GSM8K question) it took 6.0 s and
kept the 4 drafts the sweep's 17 decodes kept in 26 s.

The estimate reads a(N) at the widest decode's round starts, and those follow a
rejection, where the drafter does worse than on average: it underrates short
rounds. ar-spec's γ, where that decides between γ = 1 and longer chains, is
still swept: estimated the same way (with its drafter step priced from a second
decode at γ = 1), it predicted τ 1.40 at γ = 1 on spec-smollm2's first question,
where γ = 1 reached 1.55 over the 200, and chose γ = 5, which ran 1.28× AR in
that benchmark against 1.34× for the sweep's γ = 1 in the run before.

The calibration always decodes `AUTO_TOKENS` tokens, whatever the request's
length: it measures the device and the drafters, not the request, and a
choice made on a handful of tokens (no tree built) would be noise. When the
first prompt's answer ends before `MIN_TOKENS`, nothing is timed and the
default size is kept (the report says so).

The choice is remembered for the life of the process, per target object (on its
device and dtype), drafters' weights (a fingerprint, so drafters loaded again
from the same checkpoint for every bench chunk or CLI call hit the memo), the
config's other fields and the thread count: a benchmark's chunks or a server's
requests calibrate once. The calibration's time is added to the run's wall
clock when it runs (it is part of what `auto` costs); its forwards are reported
beside, not mixed into, the run's own counts.
"""
from __future__ import annotations

import copy
import time
import weakref
from dataclasses import replace
from typing import Any, Callable, Sequence, Union

import torch

from ..decoding.streamer import Streamer

AUTO = "auto"
CANDIDATES = (1, 2, 4, 8)  # D²SD's K
DRAFT_CANDIDATES = (1, 2, 3, 4, 6, 8, 11, 15)  # DFlash's drafts a round
# DFlash's drafts with a shorten_below (a round the drafter is unsure of verifies one draft), priced by
# the estimate beside the plain counts: an offline replay of SmolLM2's rounds (8 GSM8K test questions
# past the benchmark's 200) put 5 drafts shortened below 0.3 at 1.07x the best plain count.
SHORTENED = tuple((n, t) for n in (4, 5, 6, 8) for t in (0.15, 0.3, 0.45))
# ar-spec's γ: every width from 2 to 9 verified tokens, since on a CPU the cost of a width need not be
# monotonic (the BLAS picks its kernel by the number of rows; benchmarks/verify-cost-cpu).
GAMMA_CANDIDATES = (1, 2, 3, 4, 5, 6, 7, 8)
DEFAULT_GAMMA = 4  # SpecConfig's default
AUTO_TOKENS = 64  # calibration length: enough rounds (τ ≈ 2-10) for a stable tokens/s
MIN_TOKENS = 16  # fewer than this in the calibration answer: too few rounds to time, keep the default K
DEFAULT_K = 4  # D2SDConfig's default, the paper's
# D²SD trees small enough for a CPU, timed beside the K candidates when k=auto leaves drafts and
# branch at their defaults: (K, drafts verified, tokens a branch holds). benchmarks/round-profile-cpu
# (d2sd-small) measured K = 1-2, 3 drafts and branches of 4-6 as the fastest hand-sized trees on
# SmolLM2, where the default (all 15 drafts, branches of γ₂ − 1) verified 58-node trees.
SMALL_TREES = ((1, 3, 4), (2, 3, 4), (1, 3, 6), (2, 3, 6))

# A candidate is a size for the field being chosen, or a tuple of (field, value) pairs that sets
# several fields at once (D²SD's small trees).
Candidate = Union[int, tuple]


def settings(field: str, candidate: Candidate) -> dict[str, Any]:
    """The config fields a candidate sets."""
    return dict(candidate) if isinstance(candidate, tuple) else {field: candidate}

# target -> {(field, drafters, config, threads): (chosen size, report)}
_CHOSEN: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, tuple[int, dict[str, Any]]]]" = \
    weakref.WeakKeyDictionary()


def candidates(gamma: int, values: Sequence[int] = CANDIDATES, most: bool = False) -> list[int]:
    """The sizes worth trying: a round has γ − 1 drafts (and so at most γ − 1 boundaries), so larger
    sizes only repeat γ − 1; with `most`, γ − 1 itself is always one (all the drafts)."""
    ks = [k for k in values if k <= gamma - 1]
    if most and gamma - 1 not in ks:
        ks.append(gamma - 1)
    return ks or [1]


def choose_size(run: Callable[[Candidate], tuple[int, dict[str, Any]]], ks: Sequence[Candidate],
                clock: Callable[[], float] = time.perf_counter, warm: bool = True, name: str = "k"
                ) -> tuple[Candidate, dict[str, Any]]:
    """Time `run(k)` (which decodes the calibration prompt at size k and returns the tokens it
    generated and its stats) for every k, in order and then in reverse, after one untimed warm-up
    (unless `warm` is False: the caller ran one); the size with the most tokens per second wins
    (ties: the one listed first, the cheaper verification). Each candidate's row names its size
    `name` (and, for a tuple candidate, every field it sets)."""
    if not ks:
        raise ValueError("choose_size needs at least one candidate size")
    start = clock()
    rows: dict[Candidate, dict[str, Any]] = {}
    if len(ks) > 1:
        if warm:
            run(ks[0])  # first calls allocate caches and buffers; keep that out of every K's timing
        for k in [*ks, *reversed(ks)]:
            t0 = clock()
            tokens, stats = run(k)
            dt = clock() - t0
            row = rows.setdefault(k, {**settings(name, k), "seconds": dt, "tokens": tokens,
                                      "acceptance_length": stats.get("acceptance_length"),
                                      "mean_tree_nodes": stats.get("mean_tree_nodes")})
            row["seconds"] = min(row["seconds"], dt)
        for row in rows.values():
            row["tokens_per_second"] = row["tokens"] / row["seconds"] if row["seconds"] > 0 else float("inf")
        order = {k: i for i, k in enumerate(ks)}
        best = max(ks, key=lambda k: (rows[k]["tokens_per_second"], -order[k]))
    else:
        best = ks[0]
    report = {"chosen": settings(name, best)[name], "candidates": [rows[k] for k in ks if k in rows],
              "calibration_seconds": clock() - start}
    if isinstance(best, tuple):
        report["chosen_settings"] = settings(name, best)
    return best, report


class RoundSizes(Streamer):
    """Hears a one-row speculative decode: the tokens each round made final (the prefill's first),
    and the drafter's confidences in each round's drafts where the method reports them (else [])."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.confidences: list[list[float]] = []
        self._drafted: list[float] = []

    def on_draft(self, row: int, confidences: Sequence[float]) -> None:
        self._drafted = list(confidences)

    def on_commit(self, row: int, positions: Sequence[int], token_ids: Sequence[int]) -> None:
        self.sizes.append(len(token_ids))
        self.confidences.append(self._drafted)
        self._drafted = []


@torch.inference_mode()
def forward_seconds(target: torch.nn.Module, context: Sequence[int], widths: Sequence[int], repeats: int = 3,
                    clock: Callable[[], float] = time.perf_counter, **forward_kw: Any) -> dict[int, float]:
    """Seconds of one KV-cached forward of `target` over Q new tokens after `context`, for each Q of
    `widths`: the fastest of `repeats` passes over the widths (alternating their order, after one
    untimed pass: a kernel's first call at a new shape sets it up)."""
    from ..decoding.meter import sync_device
    from ..models.causal import CausalKVCache

    if not context or not widths:
        raise ValueError("forward_seconds needs a context and at least one width")
    device = next(target.parameters()).device
    ids = torch.tensor([list(context)], device=device)
    C = ids.shape[1]
    cache = CausalKVCache.for_model(target, 1, C + max(widths))
    target(ids, kv_cache=cache, **forward_kw)
    new = {q: ids[:, -1:].expand(1, q).contiguous() for q in widths}
    best: dict[int, float] = {}
    for n in range(repeats + 1):
        for q in (widths if n % 2 == 0 else list(reversed(widths))):
            cache.crop(C)
            sync_device(device)
            t0 = clock()
            target(new[q], kv_cache=cache, **forward_kw)
            sync_device(device)
            if n:
                best[q] = min(best.get(q, float("inf")), clock() - t0)
    cache.crop(C)
    return best


def calibration_context(prompt_ids: list[int]) -> list[int]:
    """A context as long as the calibration's mid-answer rounds see (the prompt and half of
    AUTO_TOKENS): a forward's cost depends on its length, not on the ids."""
    if not prompt_ids:
        raise ValueError("the calibration prompt encodes to no tokens")
    return prompt_ids + prompt_ids[-1:] * (AUTO_TOKENS // 2)


def _timed_rounds(run: Callable[[Candidate, Streamer], tuple[int, dict[str, Any]]], n: int,
                  clock: Callable[[], float]) -> tuple[list[int], list[list[float]], float]:
    """Each round's accepted drafts and drafter confidences in a calibration decode at n, and the
    decode's seconds per round."""
    rec = RoundSizes()
    t0 = clock()
    run(n, rec)
    seconds = clock() - t0
    accepted = [size - 1 for size in rec.sizes[1:]]  # a round emits its accepted drafts and one target token
    if not accepted:
        raise ValueError("estimate_chain: the calibration decode made no round")
    return accepted, rec.confidences[1:], seconds / len(accepted)


def verified(n: int, shorten_below: float, confidences: Sequence[float]) -> int:
    """Drafts a round of n verifies under DFlash's `shorten_below` (d2sd.DFlashSpecConfig), from the
    drafter's confidences in its first drafts: the rule decoding applies and the estimate prices."""
    if shorten_below and n > 1 and len(confidences) > 1 and confidences[0] * confidences[1] < shorten_below:
        return 1
    return n


def estimate_chain(run: Callable[[Candidate, Streamer], tuple[int, dict[str, Any]]], values: Sequence[Candidate],
                   width_seconds: Callable[[list[int]], dict[int, float]], name: str,
                   clock: Callable[[], float] = time.perf_counter) -> tuple[Candidate, dict[str, Any]]:
    """The number of drafts a round verifies, for a chain whose first n drafts do not depend on how
    many there are (see the module docstring): `run(n, streamer)` decodes the calibration prompt at
    n; `width_seconds(ns)` times the target's verification of n + 1 tokens, alone, for each n. A
    candidate is n, or n with a `shorten_below` (set as a tuple, see `settings`), priced round by
    round from the drafter's confidences in the widest decode. A round at n costs `other` (what the
    widest decode spent beside its verification: the drafter call, host work) + verification(n)."""
    sizes = {c: settings(name, c) for c in values}
    ns = sorted({int(v[name]) for v in sizes.values()} | {1})
    widest = max(ns)
    accepted, confidences, per_round = _timed_rounds(run, widest, clock)
    width = width_seconds(ns)
    other = max(0.0, per_round - width[widest])
    rows = {}
    for c, size in sizes.items():
        lengths = [verified(int(size[name]), size.get("shorten_below", 0.0), conf) for conf in confidences]
        tau = 1 + sum(min(a, n) for a, n in zip(accepted, lengths)) / len(accepted)
        round_s = sum(other + width[n] for n in lengths) / len(lengths)
        rows[c] = {**size, "acceptance_length": tau, "width_ms": 1e3 * (round_s - other),
                   "round_ms": 1e3 * round_s, "tokens_per_second": tau / round_s}
    order = {c: i for i, c in enumerate(values)}
    best = max(values, key=lambda c: (rows[c]["tokens_per_second"], -order[c]))  # ties: the one listed first
    report = {"chosen": sizes[best][name], "candidates": [rows[c] for c in values], "estimate": "chain",
              "measured": {name: widest, "rounds": len(accepted), "round_ms": 1e3 * per_round,
                           "other_ms": 1e3 * other}}
    if isinstance(best, tuple):
        report["chosen_settings"] = sizes[best]
    return best, report


def auto_size(target: torch.nn.Module, drafters: Sequence[torch.nn.Module], prompt: str, cfg: Any, field: str,
              values: Sequence[Candidate], default: int, decode: Callable[..., Any],
              width_seconds: Callable[[list[int]], dict[int, float]] | None = None
              ) -> tuple[Candidate, dict[str, Any]]:
    """The value of `cfg.field` (set to "auto") for this device: remembered, or measured on `prompt`
    over `values` with `decode(prompts, cfg, meter)` (the method's own loop), `default` when the
    calibration answer is too short to time. With `width_seconds` (DFlash's chain, whose drafts do
    not depend on how many are verified) the size is estimated (`estimate_chain`) rather than
    each value decoded. The report says what was measured."""
    from ..decoding.meter import CostMeter
    from ..models.checkpoint import weights_fingerprint

    param = next(target.parameters())
    skip = {field, "gen_length", "batch_size", "seed"}  # no bearing on speed (with sampling the seed changes
    # which tokens are drawn, not what a size costs: a server's requests with new seeds calibrate once)
    rest = tuple((f, repr(getattr(cfg, f))) for f in cfg.__dataclass_fields__ if f not in skip)
    vocabs = tuple(None if getattr(d, "draft_vocab", None) is None else tuple(d.draft_vocab.tolist())
                   for d in drafters)  # a draft vocabulary is no weight, but changes the drafter's cost
    key = (field, *(weights_fingerprint(d) for d in drafters), vocabs, str(param.device), str(param.dtype), rest,
           torch.get_num_threads())
    memo = _CHOSEN.setdefault(target, {})
    if key in memo:
        k, report = memo[key]
        return k, {**copy.deepcopy(report), "remembered": True}
    forwards = {"nfe": 0, "flops": 0.0}

    def run(k: Candidate, streamer: Streamer | None = None) -> tuple[int, dict[str, Any]]:
        meter = CostMeter(primary="target")
        res = decode([prompt], replace(cfg, **settings(field, k), gen_length=AUTO_TOKENS), meter, False, streamer)
        forwards["nfe"] += meter.nfe
        forwards["flops"] += meter.flops
        return meter.tokens_generated, res.stats

    start = time.perf_counter()
    tokens, _ = run(default)  # also the warm-up of `choose_size`'s timings
    if tokens < MIN_TOKENS:
        k, report = default, {"chosen": default, "candidates": [], "too_short": True,
                              "calibration_seconds": time.perf_counter() - start}
    else:
        if width_seconds is not None:
            k, report = estimate_chain(run, values, width_seconds, field)
        else:
            k, report = choose_size(run, values, warm=False, name=field)
        report["calibration_seconds"] = time.perf_counter() - start  # the first run's included
    report.update(calibration_tokens=AUTO_TOKENS, threads=torch.get_num_threads(),
                  calibration_forwards=forwards["nfe"], calibration_flops=forwards["flops"], remembered=False)
    if not report.get("too_short"):  # a default kept for want of a measurement is not a choice to remember
        memo[key] = (k, copy.deepcopy(report))
    return k, report


def auto_run(target: torch.nn.Module, drafters: list[torch.nn.Module], prompts: Sequence[str], cfg: Any,
             field: str, values: Sequence[Candidate], default: int, decode: Callable[..., Any],
             meter: Any, progress: bool, streamer: Any,
             width_seconds: Callable[[list[int]], dict[int, float]] | None = None) -> Any:
    """Decode with `cfg.field` = "auto" resolved on this device (`auto_size`, timed on the first
    prompt) by `decode(prompts, cfg, meter, progress, streamer)`; the report goes into the stats as
    auto_<field>, and a calibration's time into the wall clock."""
    if not prompts:
        raise ValueError(f"{field}=auto needs a prompt to calibrate on; no prompts to decode")
    value, report = auto_size(target, drafters, prompts[0], cfg, field, values, default, decode, width_seconds)
    res = decode(prompts, replace(cfg, **settings(field, value)), meter, progress, streamer)
    if not report["remembered"]:  # what choosing cost is part of this run's time
        res.meter.wall_seconds += report["calibration_seconds"]
    res.config = cfg
    res.stats[f"auto_{field}"] = report
    return res
