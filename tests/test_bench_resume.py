"""`diffspec bench --resume`: a long run stopped part-way goes on without decoding its finished rows
again, and never reuses a row that was measured on other data, options, weights or drafters."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import diffspec.bench.runner as runner
from diffspec.bench import rows as rows_store
from diffspec.cli import main
from diffspec.models.checkpoint import load_model, save_model
from diffspec.speculative.armethods import build_ar_config

ARGS = ["--limit", "2", "--gen-length", "8", "--block-length", "8", "--steps", "8",
        "--methods", "vanilla:steps=8", "vanilla:steps=4"]


def bench(ckpt: Path, out: Path, *extra: str) -> dict:
    assert main(["bench", "--model", str(ckpt), "--out", str(out), *ARGS, *extra]) == 0
    return json.loads((out / "results.json").read_text())


def counting_evaluate(monkeypatch, fail_at: int | None = None) -> list[str]:
    """evaluate() that records which methods it decoded (and can fail at one call, like a session ending)."""
    calls: list[str] = []
    real = runner.evaluate

    def wrapped(task, model, tok, method, cfg, **kw):
        calls.append(f"{method}:{cfg.steps}")
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt("stopped")
        return real(task, model, tok, method, cfg, **kw)

    monkeypatch.setattr(runner, "evaluate", wrapped)
    return calls


def test_resume_reuses_every_finished_row_and_gives_the_same_table(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    first = bench(tiny_checkpoint, tmp_path)
    assert len(list((tmp_path / "rows").glob("*.json"))) == 2
    calls = counting_evaluate(monkeypatch)
    again = bench(tiny_checkpoint, tmp_path, "--resume")
    assert calls == []  # nothing decoded again
    assert again["resumed_rows"] == ["vanilla steps=8", "vanilla steps=4"] and first["resumed_rows"] == []
    keep = ("label", "accuracy", "nfe_per_sequence", "flops", "same_ids_as_baseline", "measured_at", "speedup_nfe")
    assert [{k: r[k] for k in keep} for r in again["rows"]] == [{k: r[k] for k in keep} for r in first["rows"]]
    assert "reusing the row measured at" in capsys.readouterr().err


def test_without_resume_every_row_is_decoded_again(tiny_checkpoint, tmp_path, monkeypatch):
    bench(tiny_checkpoint, tmp_path)
    calls = counting_evaluate(monkeypatch)
    assert bench(tiny_checkpoint, tmp_path)["resumed_rows"] == []
    assert calls == ["vanilla:8", "vanilla:4"]


def test_a_stopped_run_resumes_at_the_row_it_stopped_in(tiny_checkpoint, tmp_path, monkeypatch):
    calls = counting_evaluate(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--model", str(tiny_checkpoint), "--out", str(tmp_path), *ARGS])
    assert not (tmp_path / "results.json").exists() and len(list((tmp_path / "rows").glob("*.json"))) == 1
    calls.clear()
    r = bench(tiny_checkpoint, tmp_path, "--resume")
    assert calls == ["vanilla:4"] and r["resumed_rows"] == ["vanilla steps=8"]
    assert r["rows"][1]["same_ids_as_baseline"] == pytest.approx(r["rows"][1]["same_ids_as_baseline"])
    assert r["rows"][1]["speedup_nfe"] == pytest.approx(2.0)  # ratios against the reused baseline row


@pytest.mark.parametrize("change", ["options", "examples", "weights"])
def test_a_row_measured_otherwise_is_never_reused(change, tiny_checkpoint, tmp_path, monkeypatch):
    bench(tiny_checkpoint, tmp_path / "out")
    ckpt, extra = tiny_checkpoint, []
    if change == "options":
        extra = ["--seed", "1"]
    elif change == "examples":
        extra = ["--limit", "3"]  # one more example: rows on 2 examples must not stand for 3
    else:
        model, tok = load_model(tiny_checkpoint)
        with torch.no_grad():
            next(model.parameters()).mul_(1.01)
        ckpt = save_model(model, tok, tmp_path / "other")
    calls = counting_evaluate(monkeypatch)
    r = bench(ckpt, tmp_path / "out", "--resume", *extra)
    assert calls == ["vanilla:8", "vanilla:4"] and r["resumed_rows"] == []
    assert r["n"] == (3 if change == "examples" else 2)


def test_row_key_follows_the_drafter_weights(tiny_model, tmp_path):
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    (drafter / "model.safetensors").write_bytes(b"one")
    cfg = build_ar_config("ar-spec", drafter=str(drafter))
    key = lambda: rows_store.row_key("ar-spec", "arith", cfg, "ex", "model", tiny_model)  # noqa: E731
    before = key()
    assert key() == before
    (drafter / "model.safetensors").write_bytes(b"two")  # retrained: same path, other weights
    assert key() != before
    assert rows_store.drafter_paths(build_ar_config("ar"), tiny_model) == []
    d2sd = rows_store.drafter_paths(build_ar_config("d2sd"), tiny_model)
    assert len(d2sd) == 2 and all(Path(p).is_dir() for p in d2sd)  # the bundled DFlash and VP drafters


def test_weights_fingerprint_sees_a_dtype_or_value_change(tiny_model):
    base = rows_store.weights_fingerprint(tiny_model)
    other = type(tiny_model)(tiny_model.config)
    other.load_state_dict(tiny_model.state_dict())
    assert rows_store.weights_fingerprint(other) == base
    with torch.no_grad():
        list(other.parameters())[-1].add_(1e-3)
    assert rows_store.weights_fingerprint(other) != base
    assert rows_store.weights_fingerprint(copy.deepcopy(tiny_model).to(torch.bfloat16)) != base
    assert rows_store.weights_fingerprint(tiny_model) == base  # the shared fixture is untouched


def test_resume_errors_are_clear(tiny_checkpoint, tmp_path, capsys):
    bench(tiny_checkpoint, tmp_path)
    for f in (tmp_path / "rows").glob("*.json"):
        f.write_text("{not json")
    assert main(["bench", "--model", str(tiny_checkpoint), "--out", str(tmp_path), *ARGS, "--resume"]) == 2
    assert "saved bench row" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_checkpoint), "--out", str(tmp_path), *ARGS, "--resume",
                 "--repeats", "2"]) == 2
    assert "--repeats" in capsys.readouterr().err


# ---- chunks: a row longer than a sitting

CHUNKED = ["--limit", "5", "--gen-length", "8", "--block-length", "8", "--batch-size", "2",
           "--methods", "vanilla:steps=8", "psd:policy=threshold"]


def _same_row(a: dict, b: dict) -> None:
    for k in ("accuracy", "nfe", "nfe_per_sequence", "flops", "tokens_generated", "sequences", "models", "spec",
              "same_ids_as_baseline"):
        assert a.get(k) == b.get(k), k


def test_a_chunked_row_equals_the_whole_row(tiny_checkpoint, tmp_path, monkeypatch):
    whole = json.loads(_bench_out(tiny_checkpoint, tmp_path / "whole", CHUNKED))
    parts = []
    real = runner.rows_store.save_part

    def spy(out_dir, key, start, end, part):
        parts.append((start, end))
        return real(out_dir, key, start, end, part)

    monkeypatch.setattr(runner.rows_store, "save_part", spy)
    chunked = json.loads(_bench_out(tiny_checkpoint, tmp_path / "chunked", CHUNKED + ["--chunk", "3"]))
    assert parts == [(0, 4), (4, 5)] * 2  # 3 rounded up to two batches of 2; the last chunk is short
    for a, b in zip(whole["rows"], chunked["rows"]):
        _same_row(a, b)
    assert chunked["rows"][1]["spec"]["iterations"] > 0  # PSD's counters summed over the chunks
    assert chunked["rows"][1]["chunks"] == {"examples_per_chunk": 4, "chunks": 2, "reused": 0}
    assert "spec_per_rank" not in chunked["rows"][1] and chunked["rows"][1]["world_size"] == 1


def test_a_row_stopped_between_chunks_resumes_inside_the_row(tiny_checkpoint, tmp_path, monkeypatch):
    whole = json.loads(_bench_out(tiny_checkpoint, tmp_path / "whole", CHUNKED))
    calls = []
    import diffspec.evaluation.evaluate as ev

    real_part = ev.run_part

    def part(task, examples, *a, **kw):
        calls.append(len(examples))
        if len(calls) == 4:  # vanilla's 2 chunks, psd's first, then the session ends in psd's second
            raise KeyboardInterrupt("stopped")
        return real_part(task, examples, *a, **kw)

    monkeypatch.setattr(ev, "run_part", part)
    out = tmp_path / "chunked"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--model", str(tiny_checkpoint), "--out", str(out), *CHUNKED, "--chunk", "4"])
    calls.clear()
    r = json.loads(_bench_out(tiny_checkpoint, out, CHUNKED + ["--chunk", "4", "--resume"]))
    assert calls == [1]  # only the psd row's last chunk (1 example) was decoded again
    assert r["resumed_rows"] == ["vanilla steps=8"] and r["rows"][1]["chunks"]["reused"] == 1
    for a, b in zip(whole["rows"], r["rows"]):
        _same_row(a, b)


def _bench_out(ckpt: Path, out: Path, args: list[str]) -> str:
    assert main(["bench", "--model", str(ckpt), "--out", str(out), *args]) == 0
    return (out / "results.json").read_text()


def test_chunk_option_is_checked(tiny_checkpoint, tmp_path, capsys):
    assert main(["bench", "--model", str(tiny_checkpoint), "--out", str(tmp_path), *ARGS, "--chunk", "-1"]) == 2
    assert "chunk must be an integer >= 0" in capsys.readouterr().err


def test_a_larger_limit_reuses_the_chunks_it_shares(tiny_checkpoint, tmp_path, monkeypatch):
    import diffspec.evaluation.evaluate as ev

    small = ["--gen-length", "8", "--block-length", "8", "--batch-size", "2", "--methods", "vanilla:steps=8"]
    _bench_out(tiny_checkpoint, tmp_path, ["--limit", "4", "--chunk", "2", *small])
    calls = []
    real_part = ev.run_part

    def part(task, examples, *a, **kw):
        calls.append(len(examples))
        return real_part(task, examples, *a, **kw)

    monkeypatch.setattr(ev, "run_part", part)
    r = json.loads(_bench_out(tiny_checkpoint, tmp_path, ["--limit", "6", "--chunk", "2", "--resume", *small]))
    assert calls == [2]  # examples 5-6 only: 1-4 came from the 4-example run
    assert r["n"] == 6 and r["rows"][0]["chunks"] == {"examples_per_chunk": 2, "chunks": 3, "reused": 2}
    whole = json.loads(_bench_out(tiny_checkpoint, tmp_path / "whole", ["--limit", "6", *small]))
    _same_row(whole["rows"][0], r["rows"][0])


def test_shards_split_a_row_and_the_assembling_run_decodes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import diffspec.evaluation.evaluate as ev

    args = ["--limit", "5", "--gen-length", "8", "--block-length", "8", "--batch-size", "2",
            "--methods", "vanilla:steps=8", "--chunk", "2", "--resume"]
    whole = json.loads(_bench_out(tiny_checkpoint, tmp_path / "whole", args[:-3]))
    calls: list[int] = []
    real_part = ev.run_part

    def part(task, examples, *a, **kw):
        calls.append(len(examples))
        return real_part(task, examples, *a, **kw)

    monkeypatch.setattr(ev, "run_part", part)
    out = tmp_path / "sharded"
    assert main(["bench", "--model", str(tiny_checkpoint), "--out", str(out), *args, "--shard", "0/2"]) == 0
    assert calls == [2, 1]  # chunks 0 (examples 1-2) and 2 (example 5) only
    assert not (out / "results.json").exists()  # the row is not whole yet: no table from a shard
    calls.clear()
    assert main(["bench", "--model", str(tiny_checkpoint), "--out", str(out), *args, "--shard", "1/2"]) == 0
    assert calls == [2]  # chunk 1; the row is now whole, so this last shard writes the table too
    assert (out / "results.json").exists()
    calls.clear()
    r = json.loads(_bench_out(tiny_checkpoint, out, args))
    assert calls == []  # assembling decodes nothing
    assert r["resumed_rows"] == ["vanilla steps=8"]
    _same_row(whole["rows"][0], r["rows"][0])


@pytest.mark.parametrize("extra, message", [
    (["--shard", "2/2", "--chunk", "2", "--resume"], "0 <= I < N"),
    (["--shard", "half", "--chunk", "2", "--resume"], "--shard takes I/N"),
    (["--shard", "0/2", "--resume"], "give --chunk N too"),
    (["--shard", "0/2", "--chunk", "2"], "give --resume too"),
    (["--shard", "0/2", "--chunk", "2", "--resume", "--repeats", "2"], "cannot be combined with --repeats > 1"),
])
def test_shard_option_is_checked(tiny_checkpoint, tmp_path, capsys, extra, message):
    assert main(["bench", "--model", str(tiny_checkpoint), "--out", str(tmp_path), *ARGS, *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_shard_assembles_the_row_when_the_other_shard_finished_meanwhile(tiny_checkpoint, tmp_path, monkeypatch):
    """Shard 0 passes chunk 1 before shard 1 has saved it; shard 1 finishes while shard 0 decodes
    chunk 2, so shard 0 finds chunk 1 on its second look and writes the whole table."""
    import diffspec.evaluation.evaluate as ev

    args = ["--limit", "5", "--gen-length", "8", "--block-length", "8", "--batch-size", "2",
            "--methods", "vanilla:steps=8", "--chunk", "2", "--resume"]
    out = tmp_path / "sharded"
    real_part = ev.run_part
    calls: list[int] = []

    def part(task, examples, *a, **kw):
        calls.append(len(examples))
        if len(calls) == 2:  # shard 0's second chunk (example 5): the other shard runs and finishes now
            assert main(["bench", "--model", str(tiny_checkpoint), "--out", str(out), *args, "--shard", "1/2"]) == 0
        return real_part(task, examples, *a, **kw)

    monkeypatch.setattr(ev, "run_part", part)
    assert main(["bench", "--model", str(tiny_checkpoint), "--out", str(out), *args, "--shard", "0/2"]) == 0
    assert calls == [2, 1, 2]  # shard 0: chunks 0 and 2; shard 1 (inside): chunk 1 only
    r = json.loads((out / "results.json").read_text())
    assert r["rows"][0]["n"] == 5 and r["rows"][0]["chunks"]["reused"] == 1


def test_weights_fingerprint_reads_an_int8_model(tiny_model):
    """`bench --quantize int8` fingerprints the quantized model (int8 weights and their scales):
    it must hash, differ from the float model's, and follow the int8 weights' values."""
    from diffspec.models.quantized import quantize_blocks

    base = rows_store.weights_fingerprint(tiny_model)
    q = quantize_blocks(copy.deepcopy(tiny_model))
    fp = rows_store.weights_fingerprint(q)
    assert fp != base and fp == rows_store.weights_fingerprint(q)
    nudged = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(m for m in nudged.modules() if isinstance(m, torch.nn.Linear) and m.weight.shape[0] > 1).weight.mul_(2)
    assert rows_store.weights_fingerprint(quantize_blocks(nudged)) != fp
