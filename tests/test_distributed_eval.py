"""Data-parallel `diffspec eval` under torchrun (gloo on CPU): a 2-process run writes the same result
(accuracy, n, cost totals, every sample) as a 1-process run on the same examples."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diffspec.cli import main
from diffspec.evaluation.evaluate import Shard
from diffspec.models.checkpoint import save_model

from conftest import REPO_ROOT

SAME = ("accuracy", "n", "nfe", "nfe_per_sequence", "tokens_processed", "flops", "tokens_generated",
        "tokens_per_forward", "sequences", "models", "config", "samples", "task", "method", "scoring")


def test_shards_are_whole_batches_of_the_single_process_order() -> None:
    assert Shard(0, 2).batches(10, 4) == [0, 1, 2, 3, 8, 9]
    assert Shard(1, 2).batches(10, 4) == [4, 5, 6, 7]
    assert Shard().batches(5, 4) == [0, 1, 2, 3, 4]
    three = [Shard(r, 3).batches(11, 2) for r in range(3)]
    assert sorted(i for part in three for i in part) == list(range(11))


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "-m", "diffspec", *args], capture_output=True, text=True, cwd=REPO_ROOT, env=env)


def compare(one: dict, two: dict) -> None:
    for k in SAME:
        assert one.get(k) == two.get(k), k
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(two["wall_seconds_per_rank"]) == 2 and two["wall_seconds"] > 0


@pytest.mark.parametrize("extra", [
    ["--task", "arith", "--gen-length", "16", "--block-length", "8", "--steps", "8"],
    ["--task", "arith-mc", "--scoring", "likelihood", "--mc-num", "2"],
], ids=["generate", "likelihood"])
def test_two_process_gloo_run_equals_one_process(make_model, tokenizer, tmp_path, capsys, extra) -> None:
    ckpt = save_model(make_model(seed=1, max_sequence_length=512), tokenizer, tmp_path / "model")
    args = ["eval", *extra, "--limit", "6", "--batch-size", "2", "--model", str(ckpt)]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0, capsys.readouterr().err
    run = torchrun([*args, "--out", str(tmp_path / "two.json")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("accuracy") == 1 and "2 ranks" in run.stdout  # rank 0 alone reports
    compare(json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text()))
