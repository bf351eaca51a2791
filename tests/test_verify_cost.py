"""`python -m diffspec.bench.verify_cost`: the verification-cost curve's files, on the bundled arith target.

Checks the outputs' shape and consistency, never a speed (the machine may be busy)."""
from __future__ import annotations

import json

from diffspec.bench.verify_cost import GEMM_ROWS, main
from diffspec.speculative.armethods import DEFAULT_TARGET


def test_verify_cost_writes_curve_table_and_plot(tmp_path):
    import shutil

    from diffspec.models.draft_vocab import write_draft_vocab
    from diffspec.speculative.armethods import bundled_drafter

    ar_drafter = shutil.copytree(bundled_drafter("ar-spec", None), tmp_path / "ar")
    write_draft_vocab(ar_drafter, {i: 1 for i in range(40)}, 40)
    out = tmp_path / "vc"
    assert main(["--out", str(out), "--model", str(DEFAULT_TARGET), "--threads", "1", "--repeats", "1",
                 "--sizes", "1,4", "--context", "16", "--vp-windows", "2", "--ar-drafter", str(ar_drafter)]) == 0
    r = json.loads((out / "results.json").read_text())
    curve = r["runs"]["1"]["target"]
    assert [c["Q"] for c in curve] == [1, 4]
    assert all(c["ms"] > 0 and c["ms_layers"] > 0 and c["ms_head"] >= 0 for c in curve)
    drafters = r["runs"]["1"]["drafters"]
    assert all(set(drafters[k]) >= {"recompute_context_full_head", "cached_context_read_cells"}
               for k in drafters if k != "ar-spec drafter")
    ar = drafters.pop("ar-spec drafter")
    assert len(drafters) == 2 and set(ar) == {"one_token_full_head", "two_tokens_full_head",
                                              "one_token_draft_vocab", "two_tokens_draft_vocab"}
    assert all(v > 0 for v in ar.values())
    gemm = r["runs"]["1"]["gemm_layouts"]  # both layouts of the head and the blocks, every row count
    assert [g["rows"] for g in gemm] == list(GEMM_ROWS)
    assert all(g[f"{part}_{how}"] > 0 for g in gemm for part in ("head", "blocks") for how in ("f_linear", "weight_left", "packed"))
    assert r["load"]["cores"] >= 1 and r["context"] == 16
    table = (out / "table.md").read_text()
    assert "| the blocks' linears |" in table
    assert "| Q | 1 | 4 |" in table and "Load average" in table and "ar-spec drafter: one token full head" in table
    assert (out / "curve.png").stat().st_size > 0


def test_round_profile_splits_model_head_and_host_time(tmp_path):
    """Every model call is attributed to its meter name, the target's LM head is found by its shape,
    and the parts add up to the decode's wall clock (host = the rest)."""
    from diffspec.bench.round_profile import main as profile

    out = tmp_path / "rp"
    assert profile(["--out", str(out), "--model", str(DEFAULT_TARGET), "--task", "arith", "--no-chat", "--limit",
                    "1", "--gen-length", "24", "--threads", "1", "--methods", "ar", "d2sd:k=1"]) == 0
    r = json.loads((out / "results.json").read_text())
    ar, d2 = r["results"]
    assert set(ar["models"]) == {"model"} and set(d2["models"]) == {"target", "drafter", "vp_drafter"}
    for res, target in ((ar, "model"), (d2, "target")):
        assert res["host_s"] >= 0 and sum(m["s"] for m in res["models"].values()) <= res["wall_s"]
        assert 0 < res["models"][target]["head_share"] < 1
    assert d2["models"]["drafter"]["calls"] >= 1 and d2["acceptance_length"] >= 1
    assert "| d2sd:k=1 |" in (out / "table.md").read_text()


def test_round_profile_rejects_a_bad_spec_before_loading(capsys):
    """A misspelt method option must stop the profiler with argparse's message, not a traceback after
    the model has loaded."""
    import pytest

    from diffspec.bench.round_profile import main as profile

    with pytest.raises(SystemExit) as e:
        profile(["--out", "unused", "--model", "/nonexistent", "--methods", "dflash:draftz=4"])
    assert e.value.code == 2 and "draftz" in capsys.readouterr().err


def test_round_profile_pairs_each_target_forward_with_the_same_width_alone(tmp_path):
    """--paired: every cached target forward of the decode is paired with a standalone one of the
    same width (AR: one token each; DFlash: its verification widths), and the table says so."""
    from diffspec.bench.round_profile import main as profile

    out = tmp_path / "pp"
    assert profile(["--out", str(out), "--model", str(DEFAULT_TARGET), "--task", "arith", "--no-chat", "--limit",
                    "1", "--gen-length", "16", "--threads", "1", "--methods", "ar", "dflash:drafts=3",
                    "--paired"]) == 0
    rows = json.loads((out / "paired.json").read_text())["pairs"]
    ar = [r for r in rows if r["method"] == "ar"]
    assert [r["q"] for r in ar] == [1] and ar[0]["n"] == 15  # 16 tokens: the prefill's, then 15 forwards
    df = [r for r in rows if r["method"] == "dflash:drafts=3"]
    assert df and max(r["q"] for r in df) == 4 and all(r["ratio"] > 0 and r["alone_ms"] > 0 for r in df)
    assert "| dflash:drafts=3 | 4 |" in (out / "paired.md").read_text()
