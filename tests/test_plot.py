"""The bench plot must be readable: labelled ticks on every log axis (its ends among them), one key, the
frontier explained, and the wall clocks measured under load told apart."""
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
    # the axis starts and ends on a labelled tick, beyond the data: the extreme values can be read off
    locs = [t.get_loc() for t in labelled]
    assert min(locs) == pytest.approx(lo) and max(locs) == pytest.approx(hi), (values, lo, hi, locs)
    assert lo < min(values) and max(values) < hi


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


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


# The SmolLM2 suite's shape: every row equally accurate (so a two-line title), GFLOPs from 20k to 840k;
# the d2sd row's wall clock was measured with the load average above the cores (the table's ⚠).
SMOL_ROWS = [{"label": f"r{i}", "method": m, "accuracy": 0.0, "nfe_per_sequence": n, "flops": f, "wall_seconds": w,
              "tokens_per_forward": t, "load": {"loadavg_start": load, "loadavg_end": load, "cores": 2}}
             for i, (m, n, f, w, t, load) in enumerate([("ar", 162, 2.2e13, 1023, 1.0, 1.0),
                                                        ("dflash", 180, 1.8e14, 3900, 1.77, 2.1),
                                                        ("d2sd", 242, 8.4e14, 11984, 1.98, 3.5)])]


def _drawn(rows, tmp_path, monkeypatch):
    """pareto_plot's figure, drawn again after saving (it is closed then) so its boxes can be measured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figs = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (figs.append(self), real_savefig(self, *a, **k))[1])
    pareto_plot(rows, tmp_path / "p.png", title="gsm8k: accuracy vs cost (200 examples)")
    canvas = FigureCanvasAgg(figs[0])
    canvas.draw()
    return figs[0], canvas.get_renderer()


def _labelled_ticks(ax, renderer):
    lo, hi = ax.get_xlim()
    return [(t.get_loc(), t.label1.get_text(), t.label1.get_window_extent(renderer))
            for t in ax.xaxis.get_major_ticks() if lo * (1 - 1e-9) <= t.get_loc() <= hi * (1 + 1e-9)
            and t.label1.get_text()]


def test_nothing_overlaps_on_a_lossless_plot_over_a_wide_flops_range(tmp_path, monkeypatch):
    """Before, the legend sat on the title's second line, '500,000' ran into '1,000,000', and the largest
    GFLOPs value (840k) lay past the last labelled tick (500k): now every axis ends on a labelled tick."""
    fig, renderer = _drawn(SMOL_ROWS, tmp_path, monkeypatch)
    title = fig._suptitle.get_window_extent(renderer)
    legend = fig.legends[0].get_window_extent(renderer)
    assert not _boxes_overlap(title, legend)
    assert legend.x0 >= 0 and legend.x1 <= fig.bbox.width  # the legend (with its ⚠ entry) fits the figure
    for ax, key, scale in zip(fig.axes, ("nfe_per_sequence", "flops", "wall_seconds"), (1, 1e-9, 1)):
        ticks = _labelled_ticks(ax, renderer)
        boxes = [b for _, _, b in ticks]
        assert len(boxes) >= 2
        assert not any(_boxes_overlap(a, b) for a, b in zip(boxes, boxes[1:])), ax.get_xlabel()
        assert not _boxes_overlap(ax.get_window_extent(renderer), legend)
        largest = max(scale * r[key] for r in SMOL_ROWS)
        last = max(loc for loc, _, _ in ticks)
        assert last == pytest.approx(ax.get_xlim()[1]) and last >= largest, ax.get_xlabel()
    assert _labelled_ticks(fig.axes[1], renderer)[-1][1] == "1M"


def test_wall_clock_panel_marks_rows_measured_under_load(tmp_path, monkeypatch):
    """The row the table marks ⚠ (load average 3.5 on 2 cores) is hollow in the wall-clock panel only,
    and the legend says what hollow means; rows measured without competing work stay filled."""
    from diffspec.bench.plot import UNDER_LOAD
    from diffspec.bench.table import format_table

    assert [("⚠" in line) for line in format_table(SMOL_ROWS).splitlines()[2:5]] == [False, False, True]
    fig, _ = _drawn(SMOL_ROWS, tmp_path, monkeypatch)

    def filled(ax, x):  # whether the marker drawn at x has a visible face
        hits = [c for c in ax.collections if len(c.get_offsets()) and c.get_offsets()[0][0] == pytest.approx(x)]
        assert len(hits) == 1, x
        faces = hits[0].get_facecolors()
        return len(faces) > 0 and faces[0][3] > 0

    wall = next(ax for ax in fig.axes if "wall-clock" in ax.get_xlabel())
    assert [filled(wall, r["wall_seconds"]) for r in SMOL_ROWS] == [True, True, False]
    flops = next(ax for ax in fig.axes if "GFLOPs" in ax.get_xlabel())
    assert all(filled(flops, 1e-9 * r["flops"]) for r in SMOL_ROWS)
    assert UNDER_LOAD in [t.get_text() for t in fig.legends[0].get_texts()]
    calm = [{**r, "load": {"loadavg_start": 1.0, "loadavg_end": 1.0, "cores": 2}} for r in SMOL_ROWS]
    fig, _ = _drawn(calm, tmp_path, monkeypatch)
    assert UNDER_LOAD not in [t.get_text() for t in fig.legends[0].get_texts()]


def test_rows_with_forward_shapes_get_a_modelled_gpu_panel_and_column(tmp_path, monkeypatch):
    """A run that counted its forwards by shape gets the H100 roofline model as a fourth panel and a
    table column (labelled a model); rows from before shapes were counted keep three panels."""
    from diffspec.bench.plot import plot_axes
    from diffspec.bench.table import format_table

    def row(label, shapes):
        return {"label": label, "method": label, "accuracy": 0.9, "nfe_per_sequence": 10.0, "flops": 1e9,
                "wall_seconds": 1.0, "sequences": 1, "primary": "model", "tokens_per_forward": 2.0,
                "models": {"model": {"nfe": sum(shapes.values()), "flops": 1e9, "sequence_forwards": 10,
                                     "params": 100, "shapes": shapes}}}

    rows = [row("vanilla", {"1,100,100": 10}), row("fast-dllm", {"1,32,100": 4, "1,100,100": 1})]
    axes = plot_axes(rows)
    assert len(axes) == 4 and "roofline MODEL" in axes[-1][1]
    assert axes[-1][0](rows[0]) > axes[-1][0](rows[1]) > 0
    fig, _ = _drawn(rows, tmp_path, monkeypatch)
    assert len([a for a in fig.axes if a.get_xlabel()]) == 4
    head = format_table(rows).splitlines()[0]
    assert head.index("wall s") < head.index("H100 ms/answer (roofline model, 8B)")
    old = [{**r, "models": {"model": {k: v for k, v in r["models"]["model"].items() if k != "shapes"}}} for r in rows]
    assert len(plot_axes(old)) == 3 and "H100" not in format_table(old)
