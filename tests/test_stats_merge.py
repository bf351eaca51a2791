"""Speculative counters merged across parts of a run: rates recomputed from summed counters, never averaged."""
from __future__ import annotations

from diffspec.decoding.meter import CostMeter
from diffspec.speculative.ar import ARSpecStats
from diffspec.speculative.d2sd import BlockSpecStats
from diffspec.speculative.psd import PSDStats
from diffspec.methods._stats import merge_summaries, stats_class


def test_block_stats_merge_recomputes_the_rates():
    a, b = BlockSpecStats(), BlockSpecStats()
    a.rounds, a.accepted, a.max_tree_nodes = 1, 9, 40  # τ = 10 on one round
    a.record_win("first_draft", 9)
    b.rounds, b.accepted, b.max_tree_nodes = 3, 0, 70  # τ = 1 on three rounds
    b.record_win("none", 0)
    b.record_win("none", 0)
    m = merge_summaries([a.summary(), b.summary()])
    assert m["acceptance_length"] == (9 + 4) / 4  # 3.25, not the mean of 10 and 1
    assert m["max_tree_nodes"] == 70 and m["wins"] == {"first_draft": 1, "none": 2}
    assert stats_class(a.summary()) is BlockSpecStats  # not ARSpecStats, whose counters it also holds


def test_ar_and_psd_stats_merge_and_mixed_parts_do_not():
    x, y = ARSpecStats(rounds=2, drafted=8, accepted=6), ARSpecStats(rounds=2, drafted=8, accepted=0)
    assert merge_summaries([x.summary(), y.summary()])["acceptance_rate"] == 6 / 16
    assert stats_class(x.summary()) is ARSpecStats
    p = PSDStats(iterations=4, accepted=2, drafted=8)
    assert merge_summaries([p.summary(), p.summary()])["accepted_per_iteration"] == 0.5
    assert merge_summaries([x.summary(), p.summary()]) is None
    assert merge_summaries([{"something": 1}]) is None and merge_summaries([]) is None


def test_cost_meter_round_trips_through_its_summary():
    m = CostMeter(primary="target", tokens_generated=7, sequences=2, wall_seconds=1.5)
    m.record("target", batch=2, n_query=3, n_keys=5, flops=10.0)
    m.record("drafter", batch=1, n_query=1, n_keys=1, flops=2.0)
    back = CostMeter.from_summary(m.summary())
    assert back.summary() == m.summary()


def test_d2sd_auto_k_report_survives_the_merge():
    a, b = BlockSpecStats(rounds=2, accepted=4), BlockSpecStats(rounds=1, accepted=1)
    sa, sb = a.summary(), b.summary()
    sa["auto_k"] = {"chosen": 2, "candidates": [{"k": 1}, {"k": 2}], "remembered": False}
    sb["auto_k"] = {"chosen": 2, "candidates": [{"k": 1}, {"k": 2}], "remembered": True}
    m = merge_summaries([sa, sb])
    assert m["auto_k"]["chosen"] == 2 and m["auto_k"]["chosen_per_part"] == [2, 2]
    assert m["auto_k"]["remembered"] is False  # the part that measured
    assert "auto_k" not in merge_summaries([a.summary(), b.summary()])


def test_dflash_auto_drafts_report_survives_the_merge():
    a, b = BlockSpecStats(rounds=2, accepted=4), BlockSpecStats(rounds=1, accepted=1)
    sa, sb = a.summary(), b.summary()
    sa["auto_drafts"] = {"chosen": 3, "candidates": [{"drafts": 3}], "remembered": False}
    sb["auto_drafts"] = {"chosen": 4, "candidates": [{"drafts": 4}], "remembered": False}
    m = merge_summaries([sa, sb])
    assert m["auto_drafts"]["chosen"] == 3 and m["auto_drafts"]["chosen_per_part"] == [3, 4]
    assert "auto_k" not in m


def test_ar_spec_auto_gamma_report_survives_the_merge():
    from diffspec.speculative.ar import ARSpecStats

    sa, sb = ARSpecStats(rounds=2, drafted=8, accepted=3).summary(), ARSpecStats(rounds=1, drafted=4).summary()
    sa["auto_gamma"] = {"chosen": 4, "candidates": [{"gamma": 4}], "remembered": False}
    sb["auto_gamma"] = {"chosen": 4, "candidates": [{"gamma": 4}], "remembered": True}
    m = merge_summaries([sa, sb])
    assert m["auto_gamma"]["chosen"] == 4 and m["auto_gamma"]["chosen_per_part"] == [4, 4]
    assert m["rounds"] == 3 and m["accepted"] == 3
