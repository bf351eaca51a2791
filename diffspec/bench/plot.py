"""Pareto plots: accuracy against forwards, FLOPs and wall clock on shared axes.

When every row is equally accurate (lossless methods), the quality axis is
tokens per forward of the target (verifier) instead: a flat line of points
says nothing.

Each log axis starts and ends on a labelled tick, so the largest (and smallest)
cost can be read off the axis. In the wall-clock panel, rows measured under load
(the table's ⚠, `table.overloaded`) are hollow: their wall clock is unreliable,
their forwards and FLOPs are not.
"""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from ..evaluation.flexible import flexible_accuracy  # noqa: E402
from ..jsonio import parse_json_file  # noqa: E402
from .table import drafter_flops, modelled_gpu_ms, overloaded, target_forwards_per_sequence  # noqa: E402

# (row key, axis label, scale): FLOPs are shown in GFLOPs so tick labels stay short.
AXES = [("nfe_per_sequence", "forwards per sequence", 1.0), ("flops", "GFLOPs (total)", 1e-9),
        ("wall_seconds", "wall-clock seconds", 1.0)]


# With a drafter in some row, all forwards mix cheap drafter calls with the target's: the target's
# own forwards (what sets a speculative method's latency) get an axis of their own, second. Not
# when the quality axis is already tokens per target forward (lossless rows): the same tokens over
# target forwards would only draw a hyperbola.
TARGET_AXIS = (target_forwards_per_sequence, "target / verifier forwards per sequence", 1.0)


# Rows whose forwards were counted by shape get a fourth panel: their latency on one H100 at
# LLaDA-8B's shapes by the roofline model of `bench.latency` (a model, so its label says so).
GPU_AXIS = (modelled_gpu_ms, "H100 ms / answer, LLaDA-8B shapes (roofline MODEL)", 1.0)


def plot_axes(rows: list[dict[str, Any]]) -> list[tuple[Any, str, float]]:
    axes = list(AXES)
    if y_axis(rows)[0] == "accuracy" and any(drafter_flops(r) is not None for r in rows) \
            and all(target_forwards_per_sequence(r) for r in rows):
        axes = [AXES[0], TARGET_AXIS, *AXES[1:]]
    if all(modelled_gpu_ms(r) for r in rows):
        axes.append(GPU_AXIS)
    return axes


def _value(r: dict[str, Any], key: Any) -> float:
    return key(r) if callable(key) else r[key]


def _key_label(i: int, r: dict[str, Any]) -> str:
    """One line of the plot's key; the flexible accuracy only where the table shows it (GSM8K rows)."""
    flex_acc = flexible_accuracy(r)
    flex = f", flexible {100 * flex_acc:.1f}%" if flex_acc is not None else ""
    return f"{i:>2}. {r['label']}  ({100 * r['accuracy']:.1f}%{flex})"


def _tick_label(v: float, _pos: Any = None) -> str:
    """Short labels: a FLOPs axis spans 20,000 to 1,000,000 GFLOPs, whose full digits run into each other."""
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:,.0f}" if v >= 10 else f"{v:.3g}"


# How far past the outermost point an axis end must be, so no marker or its number sits on the frame:
# at least this factor, and at least this share of the data's span on the log scale.
END_PAD, END_PAD_SHARE = 1.04, 0.04


def readable_log_axis(ax: Any, values: list[float]) -> None:
    """Several labelled ticks on a log x axis, even when the data span less than a decade
    (matplotlib's default then labels one power of ten, or none), and an axis that starts and ends
    on one of them: otherwise the largest value (850k GFLOPs, between ticks 500k and 1M) is read
    off an unlabelled stretch."""
    lo, hi = min(values), max(values)
    span = hi / lo if lo > 0 else 10.0
    subs = (1.0, 2.0, 5.0) if span >= 20 else (1.0, 2.0, 3.0, 5.0, 7.0) if span >= 4 else \
        tuple(float(i) for i in range(1, 10))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(_tick_label))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis collide
    if lo > 0:
        ax.set_xlim(*tick_bounds(lo, hi, subs))


def tick_bounds(lo: float, hi: float, subs: tuple[float, ...]) -> tuple[float, float]:
    """The largest tick (s·10^k, s in `subs`) at or below lo / pad and the smallest at or above
    hi · pad: axis limits that are labelled ticks, with room for the outermost markers."""
    pad = max(END_PAD, (hi / lo) ** END_PAD_SHARE)
    ticks = [s * 10.0 ** k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
             for s in subs]
    return max(t for t in ticks if t <= lo / pad), min(t for t in ticks if t >= hi * pad)


UNDER_LOAD = "hollow (wall clock): measured under load, ⚠ in the table"


def _point(ax: Any, x: Any, y: Any, color: Any, hollow: bool, label: str | None = None) -> Any:
    """One marker: filled, or hollow for a wall clock measured while other work ran (`table.overloaded`)."""
    if hollow:
        return ax.scatter(x, y, s=36, zorder=3, facecolors="none", edgecolors=[color], linewidths=1.3, label=label)
    return ax.scatter(x, y, s=36, zorder=3, color=color, label=label)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with lower-or-equal cost and higher-or-equal accuracy."""
    front, best = [], -1.0
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front


def y_axis(rows: list[dict[str, Any]]) -> tuple[str, str, float]:
    """(row key, axis label, scale) of the quality axis: accuracy, unless every row has the same
    accuracy (a comparison of lossless methods), where tokens per target forward is what differs."""
    if len(rows) > 1 and len({round(r["accuracy"], 12) for r in rows}) == 1 and \
            all("tokens_per_forward" in r for r in rows):
        return "tokens_per_forward", "tokens per forward (target / verifier)", 1.0
    return "accuracy", "accuracy (%)", 100.0


def pareto_plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Points are numbered by row and the labels listed in one key below the axes: a sweep's labels
    are long and its points cluster near the top, so labels written beside points overlap."""
    labels = [textwrap.wrap(_key_label(i, r), 150, subsequent_indent="     ") for i, r in enumerate(rows, 1)]
    axes_spec = plot_axes(rows)
    key = "\n".join(line for lab in labels for line in lab)
    key_lines = key.count("\n") + 1
    line_h = 0.14  # inches per key line at fontsize 8 (8 pt × 1.2 spacing, a little spare)
    y_key, y_name, y_scale = y_axis(rows)
    if y_key != "accuracy":
        title = f"{title}\nevery row {100 * rows[0]['accuracy']:.1f}% accurate: {y_name} against cost"
    # From the top, in inches: the title's lines, then the legend's row, then the axes, then the key.
    title_h, legend_h = 0.1 + 0.26 * (title.count("\n") + 1), 0.35
    height = title_h + 4.6 + line_h * key_lines
    fig = plt.figure(figsize=(5.4 * len(axes_spec), height))
    bottom = (line_h * key_lines + 0.2) / height  # share of the height the key takes
    top = 1 - (title_h + legend_h + 0.1) / height
    grid = fig.add_gridspec(1, len(axes_spec), bottom=bottom + 0.75 / height, top=top, left=0.05, right=0.98, wspace=0.22)
    axes = [fig.add_subplot(grid[0, i]) for i in range(len(axes_spec))]
    families = sorted({r.get("method", r["label"]) for r in rows})
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    handles: list[Any] = []
    for ax, (key_name, name, x_scale) in zip(axes, axes_spec):
        xs = [x_scale * _value(r, key_name) for r in rows]
        for i, (x, r) in enumerate(zip(xs, rows), 1):
            hollow = key_name == "wall_seconds" and overloaded(r.get("load"))
            _point(ax, x, y_scale * r[y_key], colors[r.get("method", r["label"])], hollow)
            ax.annotate(str(i), (x, y_scale * r[y_key]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(x, y_scale * r[y_key]) for x, r in zip(xs, rows)])
        (line,) = ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", alpha=0.6,
                          lw=1, label="Pareto frontier: best quality at this cost or less")
        handles = handles or [line]
        if len(families) > 1 and len(rows) > 2 * len(families):  # a sweep: each family's own front too
            for f in families:
                own = pareto_front([(x, y_scale * r[y_key]) for x, r in zip(xs, rows)
                                    if r.get("method", r["label"]) == f])
                if len(own) > 1:
                    (dashed,) = ax.plot([p[0] for p in own], [p[1] for p in own], color=colors[f], alpha=0.5, lw=1,
                                        ls="--", label="dashed: each method's own frontier")
                    if len(handles) == 1:
                        handles.append(dashed)
        ax.set_xscale("log")
        readable_log_axis(ax, xs)
        ax.set_xlabel(name + " (log scale)")
        ax.set_ylabel(y_name)
        ax.grid(alpha=0.3, which="both")
    handles += [axes[0].scatter([], [], color=colors[f], label=f) for f in families]
    if any(overloaded(r.get("load")) for r in rows):
        handles.append(_point(axes[0], [], [], "gray", True, label=UNDER_LOAD))
    fig.legend(handles=handles, labels=[h.get_label() for h in handles], loc="upper center", fontsize=8,
               ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, 1 - title_h / height))  # below the title
    fig.text(0.04, bottom, key, fontsize=8, va="top", family="monospace")
    fig.suptitle(title, y=1 - 0.08 / height, va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_results(results_path: str | Path, out: str | Path | None = None) -> Path:
    """Redraw a bench run's plot from its results.json, so a plot can be re-rendered without re-running."""
    results_path = Path(results_path)
    if not results_path.is_file():
        raise ValueError(f"{results_path} does not exist; pass the results.json a `diffspec bench` run wrote")
    result = parse_json_file(results_path)
    rows = result.get("rows") if isinstance(result, dict) else None
    need = {"label", "accuracy"} | {k for k, _, _ in AXES}
    if not rows or not all(isinstance(r, dict) and need <= set(r) for r in rows):
        raise ValueError(f"{results_path} is not a `diffspec bench` results.json (need rows with {sorted(need)})")
    title = f"{result.get('task', '')}: accuracy vs cost ({result.get('n', '?')} examples)"
    target = Path(out) if out is not None else results_path.with_name("pareto.png")
    if target.exists():
        print(f"overwriting {target}", file=sys.stderr)
    return pareto_plot(rows, target, title=title)
