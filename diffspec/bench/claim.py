"""Is a challenger family above a reference family's accuracy–cost curve? A frontier claim, computed.

DualDiffusion and PSD claim a better accuracy–cost frontier than Fast-dLLM. On a bench run
(`results.json`) this module decides it row by row instead of by eye: for every challenger row whose
cost lies in a band of savings against the baseline row (e.g. 3× to 12× fewer FLOPs than vanilla),

- **at equal cost**: the reference's accuracy at that cost, read off its Pareto front with linear
  interpolation in log-cost between measured points (beyond its most expensive point: its best
  accuracy; below its cheapest point: that point's accuracy, an upper bound, shown as "≤"), and
  the challenger's margin (then a lower bound);
- **at equal accuracy**: the reference's cost to reach the challenger's accuracy (interpolated the
  same way; "never" when no reference row reaches it; unknown when the challenger's accuracy is
  below the reference's cheapest point), as a ratio to the challenger's cost.

A row wins when its margin is at least `points` (default +2) or the reference needs at least
`ratio` (default 1.5×) its cost. A reference that never reaches the row's accuracy gives no ratio:
then the margin alone decides, so +0.2 points above the reference's best is not a win. Both
readings are needed: a frontier that is flat in accuracy makes the first small and the second large.

    python -m diffspec.bench.claim benchmarks/frontier-arith-hard-cpu/results.json
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .plot import pareto_front

AXES = {"flops": ("flops", "FLOPs"), "forwards": ("nfe_per_sequence", "forwards / answer")}


@dataclass(frozen=True)
class Verdict:
    label: str
    axis: str
    saving: float  # baseline cost / row cost
    accuracy: float
    reference_accuracy: float  # the reference's accuracy at the row's cost
    below_front: bool  # the reference has nothing that cheap: reference_accuracy is an upper bound
    reference_cost_ratio: float | None  # its cost for the row's accuracy / the row's cost (inf: never; None: unknown)
    wins: bool

    @property
    def margin(self) -> float:
        return self.accuracy - self.reference_accuracy


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear y(x) through increasing xs (x inside [xs[0], xs[-1]])."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def accuracy_at(front: list[tuple[float, float]], cost: float) -> float:
    """The front's accuracy at `cost` (interpolated in log cost). Below its cheapest point: that
    point's accuracy, which bounds what the reference could do for less."""
    if cost <= front[0][0]:
        return front[0][1]
    if cost >= front[-1][0]:
        return front[-1][1]
    return _interp(math.log(cost), [math.log(c) for c, _ in front], [a for _, a in front])


def cost_for(front: list[tuple[float, float]], accuracy: float) -> float | None:
    """The front's cost to reach `accuracy` (interpolated in log cost); inf when it never does; None
    below its cheapest point's accuracy (what the reference would need for so little is unmeasured)."""
    if accuracy > front[-1][1]:
        return math.inf
    if accuracy < front[0][1]:
        return None
    if accuracy == front[0][1]:
        return front[0][0]
    return math.exp(_interp(accuracy, [a for _, a in front], [math.log(c) for c, _ in front]))


def decide(rows: list[dict[str, Any]], challengers: Sequence[str], reference: str, axis: str = "flops",
           band: tuple[float, float] = (3.0, 12.0), points: float = 0.02, ratio: float = 1.5) -> list[Verdict]:
    """One verdict per challenger row whose saving against rows[0] (the baseline) is within `band`."""
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
    if not rows:
        raise ValueError("no rows")
    if band[0] <= 0 or band[1] < band[0]:
        raise ValueError(f"band must be 0 < low <= high, got {band}")
    key = AXES[axis][0]
    base = rows[0][key]
    ref = [r for r in rows if r["method"] == reference]
    if not ref:
        raise ValueError(f"no {reference!r} rows in the run; methods there: {sorted({r['method'] for r in rows})}")
    costly = [r for r in rows if not (r.get(key) or 0) > 0]
    if costly and (costly[0] is rows[0] or any(r["method"] == reference for r in costly)):
        raise ValueError(f"rows without a positive {AXES[axis][1]}: {[r['label'] for r in costly]}")
    front = pareto_front([(r[key], r["accuracy"]) for r in ref])
    out = []
    for r in rows:
        if r["method"] not in challengers or r in costly:
            continue
        saving = base / r[key]
        if not band[0] <= saving <= band[1]:
            continue
        at = accuracy_at(front, r[key])
        need = cost_for(front, r["accuracy"])
        cost_ratio = None if need is None else need / r[key]
        # "never" (the reference does not reach this accuracy) is no cost ratio: then the margin decides
        wins = r["accuracy"] - at >= points - 1e-12 or (cost_ratio is not None and ratio <= cost_ratio < math.inf)
        out.append(Verdict(r["label"], axis, saving, r["accuracy"], at, r[key] < front[0][0], cost_ratio, wins))
    return out


def table(verdicts: list[Verdict], reference: str, points: float, ratio: float) -> str:
    lines = [f"| row | axis | saving vs baseline | accuracy | {reference} at equal cost | margin | "
             f"{reference} cost for equal accuracy | wins (≥ +{points * 100:g} pts or ≥ {ratio:g}×) |",
             "|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        at = f"{'≤ ' if v.below_front else ''}{v.reference_accuracy:.1%}"
        margin = f"{'≥ ' if v.below_front else ''}{v.margin * 100:+.1f}"
        r = v.reference_cost_ratio
        cost = "unknown (below its cheapest)" if r is None else "never" if math.isinf(r) else f"{r:.2f}×"
        lines.append(f"| {v.label} | {AXES[v.axis][1]} | {v.saving:.1f}× | {v.accuracy:.1%} | {at} | {margin} | "
                     f"{cost} | {'**yes**' if v.wins else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m diffspec.bench.claim", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a bench results.json (its first row is the baseline)")
    ap.add_argument("--challengers", nargs="+", default=["dualdiffusion", "psd"])
    ap.add_argument("--reference", default="fast-dllm")
    ap.add_argument("--axes", nargs="+", default=list(AXES), help=f"{' | '.join(AXES)} (default both)")
    ap.add_argument("--band", nargs=2, type=float, default=(3.0, 12.0), metavar=("LOW", "HIGH"),
                    help="savings against the baseline row to judge (default 3 12)")
    ap.add_argument("--points", type=float, default=2.0, help="accuracy margin in points that wins (default 2)")
    ap.add_argument("--ratio", type=float, default=1.5, help="cost ratio at equal accuracy that wins (default 1.5)")
    a = ap.parse_args(argv)
    path = Path(a.results)
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (a bench --out directory's results.json)")
    rows = json.loads(path.read_text())["rows"]
    for axis in a.axes:
        verdicts = decide(rows, a.challengers, a.reference, axis, tuple(a.band), a.points / 100, a.ratio)
        print(f"\n{AXES[axis][1]}: {sum(v.wins for v in verdicts)} of {len(verdicts)} rows in the band win\n")
        print(table(verdicts, a.reference, a.points / 100, a.ratio))


if __name__ == "__main__":
    main()
