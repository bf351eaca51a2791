"""Bench rows report what a reader needs to trust them: progress per row, machine load, repeats."""
from __future__ import annotations

import pytest

from diffspec.bench.runner import overloaded, run_bench
from diffspec.bench.table import format_table
from diffspec.decoding.config import DecodeConfig
from diffspec.decoding.diffusion import diffusion_generate
from diffspec.decoding.meter import CostMeter
from diffspec.models.checkpoint import load_model


@pytest.fixture(scope="module")
def bundled():
    return load_model()


def test_repeats_interleave_rows_and_take_the_median_wall(bundled, tmp_path, capsys):
    model, tok = bundled
    result = run_bench(model, tok, ["vanilla:steps=48", "fast-dllm"], limit=2, out_dir=tmp_path, repeats=3)
    err = capsys.readouterr().err
    order = [line.split(":")[0] for line in err.splitlines() if "(repeat" in line]
    assert order == ["[bench] row 1/2 (repeat 1/3)", "[bench] row 2/2 (repeat 1/3)",
                     "[bench] row 1/2 (repeat 2/3)", "[bench] row 2/2 (repeat 2/3)",
                     "[bench] row 1/2 (repeat 3/3)", "[bench] row 2/2 (repeat 3/3)"]
    assert "[bench] row 2/2: accuracy" in err  # each row's result as it finishes
    for r in result["rows"]:
        walls = r["wall_seconds_repeats"]
        assert len(walls) == 3 and r["wall_seconds"] == sorted(walls)[1]
        assert {"loadavg_start", "loadavg_end", "cpu_seconds", "cores"} <= set(r["load"])
        assert r["load"]["cpu_seconds"] > 0


def test_bad_repeats_fail_before_decoding(bundled, tmp_path):
    model, tok = bundled
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        run_bench(model, tok, ["vanilla"], limit=2, out_dir=tmp_path, repeats=0)


def test_an_overloaded_row_is_flagged_in_the_table():
    row = {"label": "x", "accuracy": 0.5, "wall_seconds": 3.0, "load": {"loadavg_start": 3.5, "loadavg_end": 1.0,
                                                                         "cores": 2, "cpu_seconds": 1.0}}
    calm = {**row, "load": {**row["load"], "loadavg_start": 1.0}}
    assert overloaded(row["load"]) and not overloaded(calm["load"])
    assert "3.0 ⚠" in format_table([row]) and "unreliable" in format_table([row])
    assert "⚠" not in format_table([calm])


def test_too_long_prompts_fail_before_any_decoding(bundled):
    model, tok = bundled
    meter = CostMeter()
    long_prompt = "Question: " + "Ana has 3 pens. " * 200 + "\nAnswer:"
    with pytest.raises(ValueError, match="--k-shot 0.*--gen-length"):
        diffusion_generate(model, tok, ["Question: Ana has 3 pens.\nAnswer:", long_prompt], DecodeConfig(), meter=meter)
    assert meter.nfe == 0


def test_frontier_suite_sweeps_every_family_and_parses():
    from diffspec.bench.runner import plan_bench, suite

    specs = suite("frontier", "arith")
    parsed, _ = plan_bench(specs, "arith")
    methods = {m for m, _ in parsed}
    assert methods == {"vanilla", "fast-dllm", "dkv-cache", "dualdiffusion", "psd"}
    thresholds = [o["threshold"] for m, o in parsed if m == "fast-dllm" and "threshold" in o]
    assert min(thresholds) <= 0.5 and max(thresholds) >= 0.99


def test_dream_suite_covers_the_algs_and_the_cached_methods():
    from diffspec.bench.runner import plan_bench, suite

    specs = suite("dream", "arith")
    parsed, configs = plan_bench(specs, "arith")
    algs = {o["alg"] for m, o in parsed if m == "dream"}
    assert algs == {"origin", "maskgit_plus", "topk_margin", "entropy"}
    assert {m for m, _ in parsed} == {"dream", "vanilla", "fast-dllm", "dkv-cache", "psd", "dualdiffusion"}
    assert parsed[0] == ("dream", {"alg": "entropy", "steps": 48})


def test_block_suite_compares_the_block_model_with_its_bidirectional_teacher():
    from pathlib import Path

    from diffspec.bench.runner import plan_bench, suite
    from diffspec.models.checkpoint import DEFAULT_MODEL_DIR

    specs = suite("block", "arith")
    parsed, configs = plan_bench(specs, "arith")
    teacher = [(m, o) for m, o in parsed if "model" in o]
    assert parsed[0] == ("vanilla", {"steps": 48, "model": teacher[0][1]["model"]})
    assert {Path(o["model"]).resolve() for _, o in teacher} == {DEFAULT_MODEL_DIR.resolve()}
    assert {m for m, _ in teacher} == {"vanilla", "fast-dllm"}
    assert {m for m, o in parsed if "model" not in o} == {"llada2", "sdar", "psd", "dualdiffusion"}
    caches = [c.cache for (m, o), c in zip(parsed, configs) if m == "llada2"]
    assert "none" in caches and caches.count("auto") >= 4  # the exact cache, and once the recompute beside it


def test_block_suite_runs_from_the_cli_on_the_bundled_block_model(tmp_path):
    """`--suite block` without --model decodes on the bundled llada2-arith (the bidirectional methods
    would refuse it) and its teacher rows on llada-arith."""
    import json

    from diffspec.cli import main
    from diffspec.models.checkpoint import DEFAULT_BLOCK_DIR

    if not (DEFAULT_BLOCK_DIR / "config.json").is_file():
        pytest.skip("diffspec/assets/llada2-arith is not trained")
    assert main(["bench", "--suite", "block", "--limit", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["label"] == "vanilla steps=48 [llada-arith]" and len(rows) == 16
    by_label = {r["label"]: r for r in rows}
    cached = by_label["llada2 block_length=4 steps=4 threshold=0.9"]
    recomputed = by_label["llada2 block_length=4 steps=4 threshold=0.9 cache=none"]
    assert cached["same_ids_as_baseline"] == recomputed["same_ids_as_baseline"]
    assert cached["flops"] < recomputed["flops"] / 2  # the exact cache does cache


def test_spec_smollm2_suite_sizes_each_method_on_the_device():
    from diffspec.bench.runner import plan_bench, suite

    parsed, _ = plan_bench(suite("spec-smollm2", "gsm8k"), "gsm8k")
    assert parsed[0] == ("ar", {"batch_size": 1}) and ("ar", {}) in parsed
    assert ("ar-spec", {"gamma": "auto"}) in parsed and ("dflash", {"drafts": "auto"}) in parsed
    assert parsed[-1] == ("d2sd", {"k": "auto"})
    assert {m for m, _ in parsed} == {"ar", "ar-spec", "dflash", "d2sd"}


def test_d2sd_smollm2_suite_has_the_issue_rows():
    from diffspec.bench.runner import plan_bench, suite

    specs = suite("d2sd-smollm2", "gsm8k")
    parsed, _ = plan_bench(specs, "gsm8k")
    assert parsed[0] == ("ar", {"batch_size": 1}) and ("ar", {}) in parsed
    assert sorted(o.get("k") for m, o in parsed if m == "d2sd") == [1, 2, 4]
    assert {m for m, _ in parsed} == {"ar", "ar-spec", "dflash", "d2sd"}
