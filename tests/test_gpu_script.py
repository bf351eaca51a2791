"""benchmarks/gpu/run.sh (issue #22) in the default test suite, so the GPU run cannot rot while no GPU is around.

The dry run is the same script on CPU with tiny shapes, --limit 2 and three bench suites
(about a minute on one idle thread); the pip stage is skipped (DIFFSPEC_SKIP_INSTALL=1: the tests
already run on an installed checkout). It checks outputs, not speed: a dry run has no time budget
and no stage timeout (DIFFSPEC_GPU_BUDGET_S=none), so a loaded machine only makes it slower, and
no subprocess timeout guards it either. More runs, each under a second, check the bookkeeping:
a failing stage is recorded and the next stage still runs, a spent budget stops stages from
starting (a 5 s budget is spent before the first stage, whatever the machine's speed), and
either way the exit status says so.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
DRY_SUITES = ("steps", "d2sd", "threshold")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="run.sh needs bash and coreutils' timeout")


def _run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "DIFFSPEC_SKIP_INSTALL": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", **env}
    for var in ("DIFFSPEC_GPU_SUITES", "DIFFSPEC_GPU_LIMIT", "DIFFSPEC_GPU_LIMIT_D2SD", "DIFFSPEC_GPU_BUDGET_S",
                "DIFFSPEC_GPU_SKIP", "DIFFSPEC_GPU_DTYPE", "DIFFSPEC_CUDA_TESTS_DEVICE", "DIFFSPEC_CUDA_REPORT"):
        if var not in env:
            full.pop(var, None)
    return subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run", *args], env=full, capture_output=True,
                          text=True)


def _stages(out: Path) -> dict[str, list[str]]:
    rows = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
    assert all(len(r) == 6 for r in rows), rows
    return {r[0]: r[1:] for r in rows}


def test_dry_run_writes_every_output(tmp_path: Path) -> None:
    out, tar = tmp_path / "run", tmp_path / "run.tar.gz"
    p = _run(out, "--tar", str(tar))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    stages = _stages(out)
    assert {k: v[0] for k, v in stages.items()} == {
        "env": "ok", "install": "skipped", "cuda-tests": "ok", "gpu-timings": "ok", "decode-loop": "ok",
        **{f"bench-{s}": "ok" for s in DRY_SUITES}, "summary": "ok"}
    # no stage ran under a time limit (column 5 of stages.tsv), so none can time out on a busy machine
    assert {k: v[3] for k, v in stages.items() if k != "install"} == {k: "-" for k in stages if k != "install"}
    assert "no time budget" in p.stdout

    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] is True and env["torch"] == torch.__version__

    # the CUDA tests were collected and, without a GPU, all skipped
    suite = ET.parse(out / "cuda-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == int(suite.get("errors")) == 0
    if not torch.cuda.is_available():
        assert int(suite.get("skipped")) == int(suite.get("tests"))

    gpu = json.loads((out / "gpu" / "gpu.json").read_text())
    assert gpu["dry_run"] is True and gpu["errors"] == [] and gpu.get("finished")
    assert gpu["device_ceilings"]["memory_bandwidth"]["tb_s"] > 0
    llada, qwen3 = gpu["llada"], gpu["qwen3"]
    assert {"full_b1_L16", "full_b1_L64", "dual_cache_step_b1_L64", "views_full_L32_x8",
            "views_dual_cache_L32_x8"} <= set(llada)
    assert llada["views_full_L32_x1"]["cost_vs_one_view"] == 1.0
    assert {"decode_step_past32", "tree_verify_4x8_past32", "chain_verify_5_past32"} <= set(qwen3)
    assert qwen3["tree_verify_4x8_past32"]["queries"] == 1 + 4 * 8  # the anchor + 4 branches
    assert all(r["ms"] > 0 and r["roofline_ms"] > 0 for s in (llada, qwen3) for k, r in s.items() if k != "model")
    assert "| full_b1_L64 |" in (out / "gpu" / "gpu.md").read_text()

    decode = json.loads((out / "decode" / "decode.json").read_text())
    assert decode["errors"] == [] and decode["backend"] == "eager"
    assert [r["method"] for r in decode["rows"]] == ["vanilla", "fast-dllm", "dflash"]
    assert all(r["compiled_same_ids"] and r["forwards"] > 0 and r["compiled_s"] > 0 for r in decode["rows"])

    for s in DRY_SUITES:
        res = json.loads((out / "bench" / s / "results.json").read_text())
        assert res["n"] == 2 and res["rows"] and all(r["n"] == 2 for r in res["rows"])
        assert "--device cpu --dtype bfloat16" in res["command"]
        assert (out / "bench" / s / "table.md").read_text().startswith("|")
        assert (out / "bench" / s / "pareto.png").stat().st_size > 0

    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]][:3] == ["env", "install", "cuda-tests"]
    assert set(summary["bench"]) == set(DRY_SUITES)
    md = (out / "summary.md").read_text()
    assert "## Large-shape timings" in md and "## bench d2sd" in md and "## Decode loops" in md
    assert "every stage passed" in p.stdout

    with tarfile.open(tar) as t:
        names = set(t.getnames())
    assert {"run/summary.md", "run/gpu/gpu.json", "run/bench/d2sd/results.json"} <= names


def test_a_failing_stage_is_recorded_and_the_rest_still_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = _run(out, PYTHON="false", DIFFSPEC_GPU_SKIP="gpu-timings")  # every python stage fails at once
    assert p.returncode == 1
    stages = _stages(out)
    assert list(stages) == ["env", "install", "cuda-tests", "gpu-timings", "decode-loop",
                            *[f"bench-{s}" for s in DRY_SUITES],
                            "summary"]
    assert stages["install"][0] == stages["gpu-timings"][0] == "skipped"
    assert all(v[0] == "failed" for k, v in stages.items() if k not in ("install", "gpu-timings"))
    assert "some stage failed" in p.stdout


def test_a_budget_is_seconds_or_none(tmp_path: Path) -> None:
    p = _run(tmp_path / "run", DIFFSPEC_GPU_BUDGET_S="10m")
    assert p.returncode == 2 and "seconds or none" in p.stderr


def test_a_spent_budget_starts_no_more_stages(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = _run(out, DIFFSPEC_GPU_BUDGET_S="5")
    assert p.returncode == 1
    stages = _stages(out)
    assert stages["cuda-tests"][0] == stages["bench-steps"][0] == "no-time"
    assert stages["summary"][0] == "ok"  # the summary runs outside the budget
