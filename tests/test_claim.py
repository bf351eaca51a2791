"""The frontier claim computed from a bench run (`bench.claim`): which bug each test would catch is
in its name."""
from __future__ import annotations

import json
import math

import pytest

from diffspec.bench.claim import accuracy_at, cost_for, decide, main


def row(method, acc, flops, nfe=10.0, label=None):
    return {"method": method, "accuracy": acc, "flops": flops, "nfe_per_sequence": nfe,
            "label": label or f"{method} {acc} {flops}"}


RUN = [row("vanilla", 0.80, 1200.0, 128.0),  # the baseline: savings are against it
       row("fast-dllm", 0.50, 100.0), row("fast-dllm", 0.70, 400.0), row("fast-dllm", 0.60, 500.0),
       row("psd", 0.72, 200.0, label="psd above"),  # 6x: fast-dllm at 200 = 0.60 (log-interpolated)
       row("psd", 0.55, 150.0, label="psd below"),
       row("dualdiffusion", 0.79, 1000.0, label="dual outside the band"),  # 1.2x: not judged
       row("psd", 0.71, 300.0, label="psd above the front's best"),
       row("psd", 0.705, 390.0, label="psd a hair above")]


def test_the_reference_front_is_read_between_its_points_in_log_cost():
    front = [(100.0, 0.5), (400.0, 0.7)]
    assert accuracy_at(front, 200.0) == pytest.approx(0.6)  # halfway in log cost
    assert accuracy_at(front, 50.0) == 0.5 and accuracy_at(front, 1e9) == 0.7  # bounds outside it
    assert cost_for(front, 0.6) == pytest.approx(200.0) and cost_for(front, 0.5) == 100.0
    assert cost_for(front, 0.4) is None and math.isinf(cost_for(front, 0.71))  # unmeasured / never


def test_rows_above_the_curve_win_and_rows_below_or_outside_the_band_do_not():
    v = {x.label: x for x in decide(RUN, ["psd", "dualdiffusion"], "fast-dllm")}
    assert "dual outside the band" not in v  # 1.2x fewer FLOPs: outside 3-12x
    assert v["psd above"].wins and v["psd above"].margin == pytest.approx(0.12)
    assert v["psd above"].saving == pytest.approx(6.0)
    assert not v["psd below"].wins and v["psd below"].margin < 0
    # the dominated fast-dllm point (0.60 at 500 FLOPs) is not on the front; the front never reaches
    # 0.71, so there is no cost ratio and the margin decides: 0.71 against 0.658 at 300 FLOPs wins
    best = v["psd above the front's best"]
    assert math.isinf(best.reference_cost_ratio)
    assert best.margin == pytest.approx(0.71 - (0.5 + 0.2 * math.log(3) / math.log(4))) and best.wins
    # ... and +0.9 points over the front at its cost (+0.5 over its best) is noise, not a win
    hair = v["psd a hair above"]
    assert math.isinf(hair.reference_cost_ratio) and 0 < hair.margin < 0.02 and not hair.wins


def test_rows_cheaper_than_the_whole_front_are_judged_against_its_cheapest_point():
    run = [row("vanilla", 0.8, 1200.0), row("fast-dllm", 0.5, 300.0),
           row("psd", 0.6, 200.0, label="beats it all"), row("psd", 0.05, 200.0, label="cheap and wrong")]
    v = {x.label: x for x in decide(run, ["psd"], "fast-dllm")}
    assert v["beats it all"].below_front and v["beats it all"].margin == pytest.approx(0.1)
    assert v["beats it all"].wins  # cheaper and 10 points above anything the reference measured
    assert v["cheap and wrong"].reference_cost_ratio is None and not v["cheap and wrong"].wins


def test_a_row_without_a_cost_is_an_error_or_skipped():
    run = [row("vanilla", 0.8, 1200.0), row("fast-dllm", 0.5, 100.0), row("psd", 0.6, 0.0, label="no cost")]
    assert decide(run, ["psd"], "fast-dllm", band=(0.1, 1e9)) == []
    with pytest.raises(ValueError, match="positive"):
        decide([row("vanilla", 0.8, 0.0), *run[1:]], ["psd"], "fast-dllm")


def test_a_cheaper_row_at_equal_accuracy_wins_by_the_cost_ratio():
    run = [row("vanilla", 0.8, 1200.0), row("fast-dllm", 0.5, 100.0), row("fast-dllm", 0.7, 400.0),
           row("psd", 0.69, 200.0, label="cheap")]
    (v,) = decide(run, ["psd"], "fast-dllm")
    assert v.reference_cost_ratio >= 1.5 and v.wins  # fast-dllm needs ~1.8x the FLOPs for 69 %


def test_the_forwards_axis_and_bad_inputs(tmp_path, capsys):
    v = decide(RUN, ["psd"], "fast-dllm", axis="forwards", band=(1.0, 20.0))
    assert {x.axis for x in v} == {"forwards"}
    with pytest.raises(ValueError, match="no 'ar' rows"):
        decide(RUN, ["psd"], "ar")
    with pytest.raises(ValueError, match="unknown axis"):
        decide(RUN, ["psd"], "fast-dllm", axis="wall")
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": RUN}))
    main([str(path)])
    out = capsys.readouterr().out
    assert "psd above" in out and "**yes**" in out
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "missing.json")])


def test_a_row_within_noise_of_the_front_wins_only_by_the_cost_ratio():
    """A flat reference front: +0.4 points at equal cost is no margin, but the reference needs 1.58x
    the FLOPs for the same accuracy, which is a win at the default ratio (1.5) and not at 2."""
    run = [row("vanilla", 0.8, 1200.0), row("fast-dllm", 0.50, 100.0), row("fast-dllm", 0.52, 1000.0),
           row("psd", 0.51, 200.0, label="flat")]
    (v,) = decide(run, ["psd"], "fast-dllm", band=(1.0, 12.0))
    assert v.margin < 0.02 and v.reference_cost_ratio == pytest.approx(10 ** 0.5 / 2, rel=1e-3) and v.wins
    (v2,) = decide(run, ["psd"], "fast-dllm", band=(1.0, 12.0), ratio=2.0)
    assert not v2.wins


def test_the_band_is_inclusive_and_checked():
    run = [row("vanilla", 0.8, 1200.0), row("fast-dllm", 0.5, 100.0), row("psd", 0.6, 400.0, label="3x"),
           row("psd", 0.6, 100.0, label="12x"), row("psd", 0.6, 0.5, label="cheap")]
    assert {v.label for v in decide(run, ["psd"], "fast-dllm")} == {"3x", "12x"}
    for band in ((0.0, 5.0), (5.0, 3.0)):
        with pytest.raises(ValueError, match="band"):
            decide(run, ["psd"], "fast-dllm", band=band)
    with pytest.raises(ValueError, match="no rows"):
        decide([], ["psd"], "fast-dllm")


def test_equal_to_the_reference_best_is_a_ratio_and_two_points_is_a_win():
    """A row exactly as accurate as the reference's best, for less, wins by the cost ratio (that
    accuracy is reached, not 'never'); a margin of exactly 2 points is a win."""
    flat = [row("vanilla", 0.8, 1200.0), row("fast-dllm", 0.69, 100.0), row("fast-dllm", 0.70, 1000.0),
            row("psd", 0.70, 300.0, label="as good, cheaper")]
    (v,) = decide(flat, ["psd"], "fast-dllm")
    assert v.margin < 0.02 and v.reference_cost_ratio == pytest.approx(1000 / 300) and v.wins
    single = [row("vanilla", 0.8, 1200.0), row("fast-dllm", 0.60, 100.0), row("psd", 0.62, 200.0, label="+2")]
    (v,) = decide(single, ["psd"], "fast-dllm")
    assert v.margin == pytest.approx(0.02) and v.wins
