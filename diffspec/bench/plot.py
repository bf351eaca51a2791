"""Pareto plots: accuracy against forwards, FLOPs and wall clock on shared axes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXES = [("nfe_per_sequence", "forwards per sequence"), ("flops", "FLOPs (total)"), ("wall_seconds", "wall-clock seconds")]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with lower-or-equal cost and higher-or-equal accuracy."""
    front, best = [], -1.0
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front


def pareto_plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    fig, axes = plt.subplots(1, len(AXES), figsize=(5.2 * len(AXES), 4.4))
    families = sorted({r.get("method", r["label"]) for r in rows})
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    for ax, (key, name) in zip(axes, AXES):
        for r in rows:
            ax.scatter(r[key], 100 * r["accuracy"], color=colors[r.get("method", r["label"])], s=36, zorder=3)
            ax.annotate(r["label"], (r[key], 100 * r["accuracy"]), fontsize=6, alpha=0.8,
                        xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(r[key], 100 * r["accuracy"]) for r in rows])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", alpha=0.5, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(name + " (log)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for f in families:
        axes[0].scatter([], [], color=colors[f], label=f)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
