"""`python -m diffspec.bench.verify_cost`: the verification-cost curve's files, on the bundled arith target.

Checks the outputs' shape and consistency, never a speed (the machine may be busy)."""
from __future__ import annotations

import json

from diffspec.bench.verify_cost import main
from diffspec.speculative.armethods import DEFAULT_TARGET


def test_verify_cost_writes_curve_table_and_plot(tmp_path):
    out = tmp_path / "vc"
    assert main(["--out", str(out), "--model", str(DEFAULT_TARGET), "--threads", "1", "--repeats", "1",
                 "--sizes", "1,4", "--context", "16", "--vp-windows", "2"]) == 0
    r = json.loads((out / "results.json").read_text())
    curve = r["runs"]["1"]["target"]
    assert [c["Q"] for c in curve] == [1, 4]
    assert all(c["ms"] > 0 and c["ms_layers"] > 0 and c["ms_head"] >= 0 for c in curve)
    drafters = r["runs"]["1"]["drafters"]
    assert len(drafters) == 2 and all(set(d) >= {"recompute_context_full_head", "cached_context_read_cells"}
                                      for d in drafters.values())
    assert r["load"]["cores"] >= 1 and r["context"] == 16
    table = (out / "table.md").read_text()
    assert "| Q | 1 | 4 |" in table and "Load average" in table
    assert (out / "curve.png").stat().st_size > 0


def test_round_profile_splits_model_head_and_host_time(tmp_path):
    """Every model call is attributed to its meter name, the target's LM head is found by its shape,
    and the parts add up to the decode's wall clock (host = the rest)."""
    from diffspec.bench.round_profile import main as profile

    out = tmp_path / "rp"
    assert profile(["--out", str(out), "--model", str(DEFAULT_TARGET), "--task", "arith", "--no-chat", "--limit",
                    "1", "--gen-length", "24", "--threads", "1", "--methods", "ar,d2sd"]) == 0
    r = json.loads((out / "results.json").read_text())
    ar, d2 = r["results"]
    assert set(ar["models"]) == {"model"} and set(d2["models"]) == {"target", "drafter", "vp_drafter"}
    for res, target in ((ar, "model"), (d2, "target")):
        assert res["host_s"] >= 0 and sum(m["s"] for m in res["models"].values()) <= res["wall_s"]
        assert 0 < res["models"][target]["head_share"] < 1
    assert d2["models"]["drafter"]["calls"] >= 1 and d2["acceptance_length"] >= 1
    assert "| d2sd |" in (out / "table.md").read_text()
