"""Pareto plots: accuracy against forwards, FLOPs and wall clock on shared axes.

When every row is equally accurate (lossless methods), the quality axis is
tokens per forward of the target (verifier) instead: a flat line of points
says nothing.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from ..jsonio import parse_json_file  # noqa: E402

AXES = [("nfe_per_sequence", "forwards per sequence"), ("flops", "FLOPs (total)"), ("wall_seconds", "wall-clock seconds")]


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
    """Points are numbered by row and the labels listed in a key below the axes: a sweep's labels
    are long and its points cluster near the top, so labels written beside points overlap."""
    labels = [textwrap.wrap(f"{i}. {r['label']}  ({100 * r['accuracy']:.1f}%)", 88, subsequent_indent="    ")
              for i, r in enumerate(rows, 1)]
    half = (len(labels) + 1) // 2
    columns = ["\n".join(line for lab in labels[:half] for line in lab),
               "\n".join(line for lab in labels[half:] for line in lab)]
    key_lines = max(c.count("\n") + 1 for c in columns)
    height = 4.4 + 0.15 * key_lines
    fig = plt.figure(figsize=(5.2 * len(AXES), height))
    top = 0.15 * key_lines / height  # share of the height the key takes
    grid = fig.add_gridspec(1, len(AXES), bottom=top + 0.12, top=0.88, wspace=0.28)
    axes = [fig.add_subplot(grid[0, i]) for i in range(len(AXES))]
    y_key, y_name, scale = y_axis(rows)
    if y_key != "accuracy":
        title = f"{title}\nevery row {100 * rows[0]['accuracy']:.1f}% accurate: {y_name} against cost"
    families = sorted({r.get("method", r["label"]) for r in rows})
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    for ax, (key, name) in zip(axes, AXES):
        for i, r in enumerate(rows, 1):
            ax.scatter(r[key], scale * r[y_key], color=colors[r.get("method", r["label"])], s=36, zorder=3)
            ax.annotate(str(i), (r[key], scale * r[y_key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(r[key], scale * r[y_key]) for r in rows])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", alpha=0.5, lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis collide
        ax.set_xlabel(name + " (log)")
        ax.set_ylabel(y_name)
        ax.grid(alpha=0.3)
    for f in families:
        axes[0].scatter([], [], color=colors[f], label=f)
    axes[0].legend(fontsize=8, loc="best")
    for col, text in enumerate(columns):
        fig.text(0.04 + 0.49 * col, top + 0.02, text, fontsize=7, va="top", family="monospace")
    fig.suptitle(title)
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
    need = {"label", "accuracy"} | {k for k, _ in AXES}
    if not rows or not all(isinstance(r, dict) and need <= set(r) for r in rows):
        raise ValueError(f"{results_path} is not a `diffspec bench` results.json (need rows with {sorted(need)})")
    title = f"{result.get('task', '')}: accuracy vs cost ({result.get('n', '?')} examples)"
    return pareto_plot(rows, out or results_path.with_name("pareto.png"), title=title)
