"""The bench plot must be readable: labelled ticks on every log axis, one key, the frontier explained."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from diffspec.bench.plot import pareto_front, pareto_plot, readable_log_axis  # noqa: E402


@pytest.mark.parametrize("values", [[25.0, 175.0], [5.4, 24.0], [1750.0, 16200.0], [3.1, 3.9], [200.0, 1080.0]])
def test_log_axis_labels_several_ticks_inside_the_data(values):
    fig, ax = plt.subplots()
    ax.scatter(values, [1] * len(values))
    ax.set_xscale("log")
    readable_log_axis(ax, values)
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    labelled = [t for t in ax.xaxis.get_major_ticks() if lo <= t.get_loc() <= hi and t.label1.get_text()]
    plt.close(fig)
    assert len(labelled) >= 2, values


def test_pareto_front_keeps_only_undominated_points():
    assert pareto_front([(1, 50), (2, 40), (3, 70), (4, 70), (5, 90)]) == [(1, 50), (3, 70), (5, 90)]


def test_plot_has_one_key_and_a_frontier_legend(tmp_path, monkeypatch):
    rows = [{"label": f"row {i}", "method": m, "accuracy": a, "nfe_per_sequence": n, "flops": f, "wall_seconds": w}
            for i, (m, a, n, f, w) in enumerate([("vanilla", 0.77, 48, 1.6e13, 160), ("fast-dllm", 0.67, 7.6, 1.7e12, 20),
                                                 ("vanilla", 0.19, 12, 4e12, 40)])]
    texts: list[str] = []
    real_text = matplotlib.figure.Figure.text
    monkeypatch.setattr(matplotlib.figure.Figure, "text",
                        lambda self, x, y, s, *a, **k: (texts.append(s), real_text(self, x, y, s, *a, **k))[1])
    legends: list[list[str]] = []
    real_legend = matplotlib.figure.Figure.legend
    monkeypatch.setattr(matplotlib.figure.Figure, "legend",
                        lambda self, *a, **k: (legends.append(list(k.get("labels", []))), real_legend(self, *a, **k))[1])
    path = pareto_plot(rows, tmp_path / "p.png", title="t")
    assert path.stat().st_size > 0
    keys = [t for t in texts if "row 0" in t]  # (the suptitle is a figure text too)
    assert len(keys) == 1 and all(f"{i}. row {i - 1}" in keys[0] for i in (1, 2, 3))
    assert legends and any("Pareto frontier" in lab for lab in legends[0])


def test_target_forwards_get_an_axis_when_a_drafter_runs_and_accuracy_differs():
    from diffspec.bench.plot import plot_axes

    def row(acc, fwd, target_fwd, drafter):
        models = {"target": {"flops": 1e9, "sequence_forwards": target_fwd}}
        if drafter:
            models["drafter"] = {"flops": 1e8, "sequence_forwards": fwd - target_fwd}
        return {"label": "r", "accuracy": acc, "nfe_per_sequence": fwd / 2, "sequences": 2, "primary": "target",
                "models": models, "tokens_per_forward": 1.0, "flops": 1e9, "wall_seconds": 1.0}

    names = lambda rows: [a[1] for a in plot_axes(rows)]  # noqa: E731
    lossy = [row(0.9, 100, 100, False), row(0.8, 120, 40, True)]
    assert names(lossy)[1] == "target / verifier forwards per sequence" and len(names(lossy)) == 4
    assert [f(lossy[1]) if callable(f) else None for f, _, _ in plot_axes(lossy)][1] == 20.0
    # lossless rows are already plotted as tokens per target forward: no hyperbola panel
    assert len(names([row(0.5, 100, 100, False), row(0.5, 120, 40, True)])) == 3
    assert len(names([row(0.9, 100, 100, False), row(0.8, 50, 50, False)])) == 3
