"""CLI and API surface: the commands README promises, their JSON, and one-line errors."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from diffspec.api import build_config
from diffspec.bench.plot import pareto_front
from diffspec.bench.runner import parse_spec
from diffspec.cli import main
from diffspec.models.checkpoint import DEFAULT_MODEL_DIR, save_model


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_prints_completion_and_cost(tiny_checkpoint, capsys):
    rc, out, err = run(["generate", "--prompt", "Tom has 5 apples.", "--model", str(tiny_checkpoint),
                        "--template", "qa", "--gen-length", "16", "--block-length", "8"], capsys)
    assert rc == 0
    assert out.endswith("\n") and out.count("\n") >= 1
    assert "forwards 16" in err  # steps default to gen-length


@pytest.mark.parametrize("method, field, values", [("dflash", "drafts", "DRAFT_CANDIDATES"),
                                                   ("ar-spec", "gamma", "GAMMA_CANDIDATES")])
def test_generate_reports_what_auto_chose(capsys, method, field, values):
    """dflash --drafts auto and ar-spec --gamma auto say which size they picked and each size's speed,
    so a user can pass it next."""
    from diffspec.speculative import sizing

    sizing._CHOSEN.clear()
    rc, out, err = run(["generate", "--prompt", "Ana has 3 pens. Ana buys 4 more. How many pens does Ana have now?",
                        "--model", str(DEFAULT_MODEL_DIR.parent / "qwen3-arith"), "--method", method,
                        f"--{field}", "auto"], capsys)
    assert rc == 0, err
    line = re.search(rf"--{field} auto chose {field}=(\d+)(,shorten_below=[\d.]+)? \((.*)\)", err)
    shortened = len(sizing.SHORTENED) if method == "dflash" else 0  # DFlash's counts with a shorten_below too
    assert line and (int(line.group(1)) in getattr(sizing, values) or line.group(2))
    assert line.group(3).count("tok/s") == len(getattr(sizing, values)) + shortened or "too short" in line.group(3)


def test_a_small_tree_is_reported_with_all_its_sizes():
    """d2sd --k auto may pick a small tree (k, drafts and branch together): the line names all three."""
    from diffspec.cli import _sizes

    row = {"k": 1, "drafts": 3, "branch": 4, "seconds": 2.0, "tokens": 64, "acceptance_length": 2.1,
           "mean_tree_nodes": 7.0, "tokens_per_second": 32.0}
    assert _sizes(row, "k") == "k=1,drafts=3,branch=4" and _sizes({"k": 2, "seconds": 1.0}, "k") == "k=2"


@pytest.mark.parametrize("extra", [
    ["--method", "fast-dllm", "--cache", "dual", "--policy", "threshold", "--threshold", "0.9"],
    ["--method", "fast-dllm", "--cache", "prefix", "--policy", "factor", "--factor", "1.0"],
    ["--method", "dkv-cache", "--cache", "dkv-decode", "--refresh-interval", "4"],
])
def test_generate_with_accelerated_methods(tiny_checkpoint, capsys, extra):
    rc, _, err = run(["generate", "--prompt", "Ana has 3 pens.", "--model", str(tiny_checkpoint),
                      "--gen-length", "16", "--block-length", "8", *extra], capsys)
    assert rc == 0, err


def test_caches_really_cache_through_the_cli(tiny_checkpoint, tokenizer, tmp_path, capsys):
    """`eval --method fast-dllm --cache X` on 2 prompts (one batch, longest prompt P, canvas T = P + 16),
    gen 16, block 8, schedule policy with 4 steps (2 per block), so every cache makes the same 4
    forwards and only the columns fed differ (tokens processed = columns x 2 rows):
    none:   4 full forwards                                      -> 2 · 4T
    prefix: per block a full forward, then one on [block start, T) -> 2 · ((T + 16) + (T + 8))
    dual:   per block a full forward, then one on the block (8)    -> 2 · 2 (T + 8)"""
    from diffspec.tasks import load_examples

    P = max(len(tokenizer.encode(e.prompt)) for e in load_examples("arith", 2))
    T = P + 16
    got = {}
    for cache in ("none", "prefix", "dual"):
        out_file = tmp_path / f"{cache}.json"
        rc, _, err = run(["eval", "--task", "arith", "--limit", "2", "--model", str(tiny_checkpoint), "--method",
                          "fast-dllm", "--cache", cache, "--policy", "schedule", "--gen-length", "16",
                          "--block-length", "8", "--steps", "4", "--out", str(out_file)], capsys)
        assert rc == 0, err
        r = json.loads(out_file.read_text())
        assert r["config"]["cache"] == cache and r["nfe"] == 4
        got[cache] = r["tokens_processed"]
    assert got == {"none": 2 * 4 * T, "prefix": 2 * (2 * T + 24), "dual": 2 * 2 * (T + 8)}


def test_generate_reports_fewer_flops_with_a_cache(tiny_checkpoint, capsys):
    """`generate` prints the cost on stderr; with the same forwards, the dual cache feeds fewer columns."""
    base = ["generate", "--prompt", "Ana has 3 pens. Ana buys 4 more. How many pens does Ana have now?", "--model",
            str(tiny_checkpoint), "--gen-length", "32", "--block-length", "8", "--method", "fast-dllm", "--policy",
            "schedule", "--steps", "16"]
    flops = {}
    for cache in ("none", "dual"):
        rc, _, err = run(base + ["--cache", cache], capsys)
        assert rc == 0, err
        m = re.search(r"forwards (\d+), .*GFLOPs ([0-9.]+)", err)
        assert m and m.group(1) == "16", err
        flops[cache] = float(m.group(2))
    assert 0 < flops["dual"] < flops["none"]


def test_eval_writes_json_with_required_fields(tiny_checkpoint, tmp_path, capsys):
    out_file = tmp_path / "r.json"
    rc, out, _ = run(["eval", "--task", "arith", "--limit", "4", "--model", str(tiny_checkpoint),
                      "--gen-length", "16", "--block-length", "8", "--steps", "8", "--out", str(out_file)], capsys)
    assert rc == 0
    r = json.loads(out_file.read_text())
    for key in ("accuracy", "n", "nfe", "tokens_per_forward", "flops", "wall_seconds", "config"):
        assert key in r
    assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 4
    assert r["config"]["steps"] == 8 and r["tokens_per_forward"] == pytest.approx(2.0)
    assert "accuracy" in out
    # the JSON keeps arith's flexible match; the printed line, like the bench table, shows it for GSM8K only
    assert "accuracy_flexible" in r and "flexible" not in out


def test_eval_arith_mc_uses_letter_scoring(make_model, tokenizer, tmp_path, capsys, monkeypatch):
    """`eval --task arith-mc` scores the first standalone letter against the example's gold letter.
    The tiny model's own completions are noise, so the run's decoded texts are replaced by known
    ones (right letter, wrong letter, right letter then a number, the right *number* alone) and
    the accuracy must be exactly 2 / 4; scored as numbers it would be 0."""
    import diffspec.evaluation.evaluate as evaluate
    from diffspec.tasks import load_examples

    ckpt = save_model(make_model(max_sequence_length=512), tokenizer, tmp_path / "long")
    examples = load_examples("arith-mc", 4)
    golds = [e.gold for e in examples]
    assert all(len(g) == 1 and g in "ABCD" for g in golds)
    other = {g: "ABCD"[("ABCD".index(g) + 1) % 4] for g in "ABCD"}
    number = re.search(rf"^{golds[3]}\. (\d+)$", examples[3].prompt, re.M).group(1)  # the gold choice's value
    texts = [f" {golds[0]}", f" {other[golds[1]]}", f" {golds[2]}. 12", f" {number}"]
    real_generate = evaluate.generate

    def generate_with_known_texts(prompts, **kw):
        res = real_generate(prompts, **kw)  # the real decode (cost, ids), then known texts
        assert list(prompts) == [e.prompt for e in examples]
        res.texts = list(texts)
        return res

    monkeypatch.setattr(evaluate, "generate", generate_with_known_texts)
    out_file = tmp_path / "mc.json"
    rc, out, err = run(["eval", "--task", "arith-mc", "--limit", "4", "--model", str(ckpt), "--out", str(out_file)],
                       capsys)
    assert rc == 0, err
    r = json.loads(out_file.read_text())
    assert [s["gold"] for s in r["samples"]] == golds
    assert [s["pred"] for s in r["samples"]] == [golds[0], other[golds[1]], golds[2], None]
    assert [s["correct"] for s in r["samples"]] == [True, False, True, False]
    assert r["accuracy"] == 0.5 and "accuracy_flexible" not in r
    assert "arith-mc [vanilla, generate] accuracy 50.0% on 4" in out


def test_eval_arith_mc_scores_the_models_own_letters(make_model, tokenizer, tmp_path, capsys):
    """Unpatched: every sample's prediction is the first standalone A-D of its completion, and the
    accuracy is the share of predictions equal to the examples' gold letters."""
    from diffspec.tasks import load_examples

    ckpt = save_model(make_model(max_sequence_length=512), tokenizer, tmp_path / "long")
    out_file = tmp_path / "mc.json"
    rc, out, err = run(["eval", "--task", "arith-mc", "--limit", "3", "--model", str(ckpt), "--out", str(out_file)],
                       capsys)
    assert rc == 0 and "arith-mc" in out, err
    r = json.loads(out_file.read_text())
    golds = [e.gold for e in load_examples("arith-mc", 3)]
    assert [s["gold"] for s in r["samples"]] == golds
    for s in r["samples"]:
        letter = re.search(r"\b([ABCD])\b", s["completion"])
        assert s["pred"] == (letter.group(1) if letter else None)
        assert s["correct"] == (s["pred"] == s["gold"])
    assert r["accuracy"] == sum(s["correct"] for s in r["samples"]) / 3


def test_bench_writes_table_json_and_plot(tiny_checkpoint, tmp_path, capsys):
    rc, out, err = run(["bench", "--model", str(tiny_checkpoint), "--limit", "3", "--out", str(tmp_path),
                      "--gen-length", "16", "--block-length", "8",
                      "--methods", "vanilla:steps=16", "vanilla:steps=4", "fast-dllm:cache=dual,policy=threshold"], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["label"] for r in res["rows"]][0] == "vanilla steps=16"
    assert res["rows"][1]["speedup_nfe"] == pytest.approx(4.0)
    assert res["rows"][0]["speedup_wall"] == pytest.approx(1.0)
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    assert "| method |" in out and (tmp_path / "table.md").is_file()
    # `diffspec plot` redraws the same run's plot from its results.json
    rc, _, err = run(["plot", str(tmp_path / "results.json"), "--out", str(tmp_path / "again.png")], capsys)
    assert rc == 0 and (tmp_path / "again.png").stat().st_size > 1000, err


def test_plot_rejects_what_is_not_a_bench_result(tmp_path, capsys):
    rc, _, err = run(["plot", str(tmp_path / "missing.json")], capsys)
    _one_line_error(rc, err, "does not exist")
    (tmp_path / "bad.json").write_text("{not json")
    rc, _, err = run(["plot", str(tmp_path / "bad.json")], capsys)
    _one_line_error(rc, err, "not valid JSON")
    (tmp_path / "other.json").write_text(json.dumps({"accuracy": 0.5}))
    rc, _, err = run(["plot", str(tmp_path / "other.json")], capsys)
    _one_line_error(rc, err, "not a `diffspec bench` results.json")


def _one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffspec: error:"), err
    assert needle in lines[0]


def test_missing_model_dir_is_one_line(tmp_path, capsys):
    rc, _, err = run(["generate", "--prompt", "hi", "--model", str(tmp_path / "nope")], capsys)
    _one_line_error(rc, err, "does not exist")


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_missing_model_is_reported_before_missing_data(command, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """`eval` / `bench --task gsm8k --model M` with neither there: the model is named first (a user meets
    --model before the data file), whatever kind of model path it is; with the model there, the data
    file comes next, and before any weights are loaded."""
    import diffspec.api

    base = [command, "--task", "gsm8k", "--data", str(tmp_path / "gsm8k.jsonl"), "--limit", "2"]
    base += ["--out", str(tmp_path / "out")] if command == "bench" else []
    for model, needle in ((tmp_path / "missing-dir", "model directory"), (tmp_path / "m.gguf", "GGUF file"),
                          (tmp_path / "gsm8k.jsonl", "model directory")):
        rc, _, err = run([*base, "--model", str(model)], capsys)
        _one_line_error(rc, err, needle)
        assert str(model) in err
    if command == "eval":  # a model of the wrong family is a model error too
        rc, _, err = run([*base, "--model", str(tiny_checkpoint), "--method", "ar"], capsys)
        _one_line_error(rc, err, "model_type")

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the data file was checked")

    monkeypatch.setattr(diffspec.api, "resolve_model", no_load)
    rc, _, err = run([*base, "--model", str(tiny_checkpoint)], capsys)
    _one_line_error(rc, err, "not found")


def test_corrupt_safetensors_is_one_line(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file at all")
    rc, _, err = run(["generate", "--prompt", "hi", "--model", str(bad)], capsys)
    _one_line_error(rc, err, "safetensors")


def test_config_weights_mismatch_is_one_line(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["d_model"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run(["generate", "--prompt", "hi", "--model", str(bad)], capsys)
    _one_line_error(rc, err, "shape")


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--task", "nope"], "unknown task"),
    (["eval", "--task", "arith", "--steps", "7"], "multiple of the number of blocks"),
    (["eval", "--task", "arith", "--method", "magic"], "unknown method"),
    (["eval", "--task", "arith", "--method", "vanilla", "--cache", "dual"], "does not use cache"),
    (["eval", "--task", "arith", "--method", "fast-dllm", "--threshold", "1.5"], "threshold"),
    (["eval", "--task", "gsm8k", "--data", "/nonexistent/gsm8k.jsonl"], "not found"),
    (["bench", "--methods", "vanilla:bogus=3"], "bad option"),
    (["bench", "--methods", "vanilla:steps=abc"], "needs a int"),
    (["generate", "--prompt", "hi", "--device", "tpu"], "device"),
    (["generate", "--prompt", "hi", "--dtype", "float8"], "dtype"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "--prompt", "", "--template", "qa"], "--prompt is empty"),
    (["generate", "--prompt", "hi", "--steps", "x"], "invalid int value"),  # argparse's own complaint, one line too
    (["eval", "--task", "arith", "--out", "/dev/null"], "not a regular file"),
])
def test_bad_options_are_one_line(argv, needle, tiny_checkpoint, capsys):
    if "--model" not in argv and argv[0] != "bench" or argv[0] == "bench":
        argv = [*argv, "--model", str(tiny_checkpoint)]
    rc, _, err = run(argv, capsys)
    _one_line_error(rc, err, needle)


def test_empty_prompt_is_one_line(tiny_checkpoint, capsys):
    rc, _, err = run(["generate", "--prompt", "  ", "--model", str(tiny_checkpoint), "--template", "raw"], capsys)
    _one_line_error(rc, err, "empty")


def test_console_script_error_has_no_traceback(tmp_path):
    # no timeout: the child takes ~2 s (~9 s on a loaded 2-core machine), and a limit would be a wall clock
    proc = subprocess.run([sys.executable, "-m", "diffspec.cli", "generate", "--prompt", "x", "--model",
                           str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("diffspec: error:")


def test_build_config_presets_and_errors():
    assert build_config("fast-dllm").cache == "dual" and build_config("fast-dllm").policy == "threshold"
    assert build_config("dkv-cache").cache == "dkv-prefill"  # the best dKV variant measured here
    assert build_config("vanilla", steps=12).steps == 12
    with pytest.raises(ValueError, match="unknown decoding option"):
        build_config("vanilla", stepz=3)
    with pytest.raises(ValueError, match="does not use cache"):
        build_config("fast-dllm", cache="dkv-decode")
    with pytest.raises(ValueError, match="schedule"):
        build_config("vanilla", policy="threshold")


def test_explicit_config_is_never_overridden_by_the_method_preset():
    for method, cache, policy in [("fast-dllm", "prefix", "schedule"), ("fast-dllm", "none", "factor"),
                                  ("dkv-cache", "dkv-greedy", "schedule"), ("dkv-cache", "dkv-prefill", "schedule")]:
        cfg = build_config(method, cache=cache, policy=policy)
        again = build_config(method, cfg)  # what generate(config=cfg) does
        assert (again.cache, again.policy) == (cache, policy)
    assert build_config("vanilla", gen_length=32).steps == 32  # full steps follow gen_length in the API too


def test_parse_spec_and_pareto_front():
    assert parse_spec("fast-dllm:cache=dual,threshold=0.8") == ("fast-dllm", {"cache": "dual", "threshold": 0.8})
    assert pareto_front([(1, 50), (2, 40), (3, 70), (4, 70)]) == [(1, 50), (3, 70)]


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(), reason="bundled model not present")
def test_bundled_model_generates(capsys):
    rc, out, err = run(["generate", "--prompt", "Tom has 5 apples. Tom buys 3 more. How many apples does Tom have now?"], capsys)
    assert rc == 0 and "####" in out, out


def test_plot_quality_axis_is_tpf_when_every_row_is_equally_accurate():
    from diffspec.bench.plot import y_axis

    lossless = [{"accuracy": 1.0, "tokens_per_forward": 1.0}, {"accuracy": 1.0, "tokens_per_forward": 9.6}]
    assert y_axis(lossless)[0] == "tokens_per_forward"
    assert y_axis([{**lossless[0], "accuracy": 0.9}, lossless[1]])[0] == "accuracy"
    assert y_axis(lossless[:1])[0] == "accuracy"  # one row: nothing to compare, keep accuracy


CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def chat_checkpoint(tiny_checkpoint, tmp_path):
    d = tmp_path / "chat"
    shutil.copytree(tiny_checkpoint, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT}))
    return d


def test_generate_chat_renders_the_checkpoints_template(chat_checkpoint, capsys):
    from diffspec.api import chat_prompts, generate

    rendered = chat_prompts(str(chat_checkpoint), "vanilla", ["1+1"], system="be brief")
    assert rendered == ["<system>be brief\n<user>1+1\n<assistant>"]
    opts = ["--gen-length", "16", "--block-length", "8"]
    rc, out, err = run(["generate", "--model", str(chat_checkpoint), "--prompt", "1+1", "--chat", "--system",
                        "be brief", *opts], capsys)
    assert rc == 0, err
    want = generate(rendered, model=str(chat_checkpoint), gen_length=16, block_length=8).texts[0]
    plain = generate(["1+1"], model=str(chat_checkpoint), gen_length=16, block_length=8).texts[0]
    assert out == want + "\n" and want != plain  # the template reached the model


def test_chat_errors_name_the_fix(tiny_checkpoint, capsys):
    rc, _, err = run(["generate", "--model", str(tiny_checkpoint), "--prompt", "1+1", "--chat"], capsys)
    assert rc == 2 and "has no chat template" in err
    rc, _, err = run(["generate", "--prompt", "1+1", "--system", "x"], capsys)
    assert rc == 2 and "--system only applies with --chat" in err
    rc, _, err = run(["generate", "--prompt", "1+1", "--chat", "--template", "qa"], capsys)
    assert rc == 2 and "drop --template qa" in err


def test_eval_chat_wraps_every_prompt(chat_checkpoint, tmp_path, capsys):
    out_file = tmp_path / "r.json"
    rc, _, err = run(["eval", "--task", "arith", "--model", str(chat_checkpoint), "--chat", "--limit", "2",
                      "--gen-length", "16", "--block-length", "8", "--out", str(out_file)], capsys)
    assert rc == 0, err
    r = json.loads(out_file.read_text())
    assert r["chat"] is True and all(s["prompt"].endswith("<assistant>") for s in r["samples"])
    rc, _, err = run(["eval", "--task", "arith-mc", "--model", str(chat_checkpoint), "--chat", "--limit", "2",
                      "--scoring", "likelihood"], capsys)
    assert rc == 2 and "--chat applies to --scoring generate" in err


def test_bench_chat_and_k_shot_shape_every_rows_prompts(chat_checkpoint, tmp_path, capsys):
    out = tmp_path / "b"
    rc, _, err = run(["bench", "--model", str(chat_checkpoint), "--methods", "vanilla:steps=8", "fast-dllm",
                      "--chat", "--limit", "2", "--gen-length", "16", "--block-length", "8", "--out", str(out)], capsys)
    assert rc == 0, err
    r = json.loads((out / "results.json").read_text())
    assert r["first_prompt"].startswith("<user>") and r["first_prompt"].endswith("<assistant>")
    assert len(r["rows"]) == 2
    rc, _, err = run(["bench", "--methods", "vanilla:steps=8", "--chat", "--limit", "1", "--gen-length", "16",
                      "--out", str(tmp_path / "c")], capsys)
    assert rc == 2 and "no chat template" in err


def test_eval_and_bench_read_the_validation_split(tiny_checkpoint, tmp_path, capsys):
    """--split validation scores other problems than the default test split (tune there, report on
    test); a file task has no splits and says so."""
    from diffspec.tasks import load_examples
    from diffspec.tasks.arith import split_of

    res = {}
    for split in ("test", "validation"):
        out_file = tmp_path / f"{split}.json"
        rc, _, _ = run(["eval", "--task", "arith", "--limit", "3", "--split", split, "--model", str(tiny_checkpoint),
                        "--gen-length", "16", "--block-length", "8", "--steps", "8", "--out", str(out_file)], capsys)
        assert rc == 0
        res[split] = json.loads(out_file.read_text())
    assert res["validation"]["split"] == "validation"
    prompts = [s["prompt"] for s in res["validation"]["samples"]]
    assert prompts == [e.prompt for e in load_examples("arith", limit=3, split="validation")]
    assert all(split_of(p.removeprefix("Question: ").rsplit("\nAnswer:", 1)[0]) == "validation" for p in prompts)
    assert not set(prompts) & {s["prompt"] for s in res["test"]["samples"]}
    rc, _, err = run(["bench", "--task", "arith", "--limit", "2", "--split", "validation", "--model",
                      str(tiny_checkpoint), "--methods", "vanilla:steps=8", "--gen-length", "16", "--block-length",
                      "8", "--out", str(tmp_path / "b")], capsys)
    assert rc == 0
    bench = json.loads((tmp_path / "b" / "results.json").read_text())
    assert bench["split"] == "validation"
    rc, _, err = run(["eval", "--task", "gsm8k", "--split", "validation", "--model", str(tiny_checkpoint)], capsys)
    _one_line_error(rc, err, "--split validation applies to the generated tasks")
