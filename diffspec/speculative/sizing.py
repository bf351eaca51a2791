"""D²SD's tree sized for the device it runs on (`k="auto"`, issue #34).

How many rejection boundaries K are worth re-anchoring depends on what a wider
tree costs here. On a GPU a verification of 100 tree nodes costs about what one
token costs; on a 2-core CPU (benchmarks/verify-cost-cpu) 16 nodes cost 1.9×
one token and 128 cost 6×, and the VP drafter's batch of K + 1 windows grows
with K. The gain, a longer accepted path, depends on the drafters and the text.
Neither is known before decoding, so `auto_k` measures both: it decodes the
first prompt's first `AUTO_TOKENS` tokens at each candidate K, twice, in
opposite orders (so a slow spell of a busy machine does not fall on one K
only), and keeps the K with the most tokens per second (the fastest of each
K's two runs). Greedy output is the same at every K (each is AR greedy's), so
the choice changes only speed; with sampling the choice fixes the random
stream, so pass the reported K to reproduce a run elsewhere.

The calibration always decodes `AUTO_TOKENS` tokens, whatever the request's
length: it measures the device and the drafters, not the request, and a
choice made on a handful of tokens (no tree built) would be noise. When the
first prompt's answer ends before `MIN_TOKENS`, nothing is timed and D²SD's
default K is kept (the report says so).

The choice is remembered for the life of the process, per target object (on its
device and dtype), drafters' weights (a fingerprint, so drafters loaded again
from the same checkpoint for every bench chunk or CLI call hit the memo), sizes,
temperature and thread count: a benchmark's chunks or a server's requests
calibrate once. The calibration's time is added to the run's wall clock when it
runs (it is part of what `auto` costs); its forwards are reported beside, not
mixed into, the run's own counts.
"""
from __future__ import annotations

import copy
import time
import weakref
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

AUTO = "auto"
CANDIDATES = (1, 2, 4, 8)
AUTO_TOKENS = 64  # calibration length: enough rounds (τ ≈ 2-10) for a stable tokens/s
MIN_TOKENS = 16  # fewer than this in the calibration answer: too few rounds to time, keep the default K
DEFAULT_K = 4  # D2SDConfig's default, the paper's

# target -> {(drafters, sizes, threads): (chosen k, report)}
_CHOSEN: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, tuple[int, dict[str, Any]]]]" = \
    weakref.WeakKeyDictionary()


def candidates(gamma: int) -> list[int]:
    """The K worth trying: a round has at most γ − 1 boundaries, so larger K only repeat γ − 1."""
    ks = [k for k in CANDIDATES if k <= gamma - 1]
    return ks or [1]


def choose_k(run: Callable[[int], tuple[int, dict[str, Any]]], ks: Sequence[int],
             clock: Callable[[], float] = time.perf_counter, warm: bool = True) -> tuple[int, dict[str, Any]]:
    """Time `run(k)` (which decodes the calibration prompt at K = k and returns the tokens it
    generated and its stats) for every k, in order and then in reverse, after one untimed warm-up
    (unless `warm` is False: the caller ran one); the K with the most tokens per second wins (ties:
    the smaller K, the smaller tree)."""
    if not ks:
        raise ValueError("choose_k needs at least one candidate K")
    start = clock()
    rows: dict[int, dict[str, Any]] = {}
    if len(ks) > 1:
        if warm:
            run(ks[0])  # first calls allocate caches and buffers; keep that out of every K's timing
        for k in [*ks, *reversed(ks)]:
            t0 = clock()
            tokens, stats = run(k)
            dt = clock() - t0
            row = rows.setdefault(k, {"k": k, "seconds": dt, "tokens": tokens,
                                      "acceptance_length": stats.get("acceptance_length"),
                                      "mean_tree_nodes": stats.get("mean_tree_nodes")})
            row["seconds"] = min(row["seconds"], dt)
        for row in rows.values():
            row["tokens_per_second"] = row["tokens"] / row["seconds"] if row["seconds"] > 0 else float("inf")
        best = max(rows.values(), key=lambda r: (r["tokens_per_second"], -r["k"]))["k"]
    else:
        best = ks[0]
    return best, {"chosen": best, "candidates": [rows[k] for k in ks if k in rows],
                  "calibration_seconds": clock() - start}


def auto_k(target: torch.nn.Module, drafter: torch.nn.Module, vp_drafter: torch.nn.Module, prompt: str,
           cfg: Any, decode: Callable[..., Any]) -> tuple[int, dict[str, Any]]:
    """K for `cfg` (a D2SDConfig with k="auto") on this device: remembered, or measured on `prompt`
    with `decode(prompts, cfg, meter)` (d2sd's own loop). The report says what was measured."""
    from ..decoding.meter import CostMeter
    from ..models.checkpoint import weights_fingerprint

    param = next(target.parameters())
    key = (weights_fingerprint(drafter), weights_fingerprint(vp_drafter), str(param.device), str(param.dtype),
           cfg.gamma, cfg.gamma2, cfg.temperature, cfg.stop_at_eos, torch.get_num_threads())
    memo = _CHOSEN.setdefault(target, {})
    if key in memo:
        k, report = memo[key]
        return k, {**copy.deepcopy(report), "remembered": True}
    forwards = {"nfe": 0, "flops": 0.0}

    def run(k: int) -> tuple[int, dict[str, Any]]:
        meter = CostMeter(primary="target")
        res = decode([prompt], replace(cfg, k=k, gen_length=AUTO_TOKENS), meter)
        forwards["nfe"] += meter.nfe
        forwards["flops"] += meter.flops
        return meter.tokens_generated, res.stats

    start = time.perf_counter()
    tokens, _ = run(DEFAULT_K)  # also the warm-up of `choose_k`'s timings
    if tokens < MIN_TOKENS:
        k, report = DEFAULT_K, {"chosen": DEFAULT_K, "candidates": [], "too_short": True,
                                "calibration_seconds": time.perf_counter() - start}
    else:
        k, report = choose_k(run, candidates(cfg.gamma), warm=False)
        report["calibration_seconds"] = time.perf_counter() - start  # the first run's included
    report.update(calibration_tokens=AUTO_TOKENS, threads=torch.get_num_threads(),
                  calibration_forwards=forwards["nfe"], calibration_flops=forwards["flops"], remembered=False)
    memo[key] = (k, copy.deepcopy(report))
    return k, report
