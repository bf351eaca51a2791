"""Never lose a result, never accept a wrong input (issue #21).

Output files are checked before any decoding and written atomically; a
checkpoint of the wrong family, a non-finite option, a drafter with another
tokenizer, an unknown training-config key and an empty prompt are each one
clear error (one `diffspec: error:` line and exit 2 on the command line).
"""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from diffspec.api import build_config, generate
from diffspec.cli import main
from diffspec.decoding.config import DecodeConfig
from diffspec.evaluation.evaluate import write_json
from diffspec.jsonio import OutputError, OutputFile
from diffspec.models.causal import save_causal
from diffspec.models.checkpoint import save_model
from diffspec.models.tokenizer import Tokenizer, check_same_tokenizer, vocab_difference
from diffspec.speculative.ar import ARConfig, SpecConfig
from diffspec.speculative.d2sd import D2SDConfig, DFlashSpecConfig

from test_d2sd import make_target

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--gen-length", "8", "--block-length", "8", "--steps", "8"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    """The CLI contract: exit 2 and exactly one `diffspec: error:` line (notes aside) holding every needle."""
    assert rc == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip() and not l.startswith("diffspec: note:")
             and not re.search(r"\d+%\|", l)]  # tqdm's progress bars share stderr
    assert len(lines) == 1 and lines[0].startswith("diffspec: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Qwen3 (AR) checkpoint on the test tokenizer."""
    return save_causal(make_target(tokenizer, seed=0), tokenizer, tmp_path_factory.mktemp("qwen3") / "target")


def swapped(tokenizer: Tokenizer, a: str = "1", b: str = "2") -> Tokenizer:
    """The same tokenizer with the ids of tokens `a` and `b` exchanged (same size, same tokens)."""
    d = json.loads(tokenizer.hf.to_str())
    vocab = d["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return Tokenizer(HFTokenizer.from_str(json.dumps(d)))


# ---------------------------------------------------------------- 1. output files


def test_output_file_rejects_bad_paths_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        OutputFile.check(blocker / "sub" / "r.json")
    with pytest.raises(OutputError, match="is a directory"):
        OutputFile.check(tmp_path)
    with pytest.raises(OutputError, match="not a regular file"):
        OutputFile.check("/dev/null")
    with pytest.raises(OutputError, match="empty"):
        OutputFile.check("")
    out = OutputFile.check(tmp_path / "new" / "deeper" / "r.json")  # the parent is created now, before the run
    assert out.path.parent.is_dir() and not out.path.exists()


def test_unwritable_directory_is_found_by_a_real_write(tmp_path, monkeypatch):
    """Permission bits say nothing on a read-only mount (or for root): the check writes a probe file."""
    import tempfile

    def refuse(*a, **kw):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="Read-only file system"):
        OutputFile.check(tmp_path / "r.json")


def test_write_is_atomic_and_a_failure_keeps_the_old_result(tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.json"
    write_json({"run": 1}, path)
    assert json.loads(path.read_text()) == {"run": 1} and "overwrit" not in capsys.readouterr().err

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OutputError, match="No space left on device"):
        write_json({"run": 2}, path)
    assert json.loads(path.read_text()) == {"run": 1}  # neither truncated nor half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left behind
    with pytest.raises(TypeError):
        write_json({"bad": object()}, path)  # serialised before the old file is touched
    assert json.loads(path.read_text()) == {"run": 1}


def test_overwriting_says_so_and_keeps_permissions(tmp_path, capsys):
    path = tmp_path / "r.json"
    write_json({"run": 1}, path)
    mode = path.stat().st_mode & 0o777
    assert mode & 0o044  # readable by others, like a plain open() (mkstemp alone would give 0600)
    capsys.readouterr()
    write_json({"run": 2}, path)
    assert "overwriting existing" in capsys.readouterr().err
    assert json.loads(path.read_text()) == {"run": 2} and path.stat().st_mode & 0o777 == mode


def test_a_concurrent_writer_loses_no_result(tmp_path, capsys):
    """A file another process wrote while this run decoded is not clobbered: this run's result goes beside it."""
    path = tmp_path / "r.json"
    out = OutputFile.check(path)
    path.write_text(json.dumps({"writer": "other"}))  # the other run finished first
    dest = out.write_json({"writer": "me"})
    assert dest != path and dest.parent == tmp_path and dest.suffix == ".json"
    assert json.loads(path.read_text()) == {"writer": "other"} and json.loads(dest.read_text()) == {"writer": "me"}
    assert "another process" in capsys.readouterr().err


def test_rescue_saves_a_result_that_cannot_go_where_asked(tmp_path, monkeypatch):
    out = OutputFile.check(tmp_path / "r.json")
    real_replace = os.replace

    def fail_there(src, dst):
        if Path(dst).parent == tmp_path:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_there)
    with pytest.raises(OutputError, match="saved to") as e:
        out.write_json({"accuracy": 0.5}, rescue=True)
    rescued = Path(str(e.value).rsplit("saved to ", 1)[1])
    assert json.loads(rescued.read_text()) == {"accuracy": 0.5}
    rescued.unlink()


def under_a_file(d: Path) -> Path:
    (d / "f").write_text("x")
    return d / "f" / "r.json"


@pytest.mark.parametrize("make_bad,needle", [(lambda d: d, "is a directory"),
                                             (under_a_file, "is a file, not a directory")])
def test_eval_out_is_checked_before_the_model_is_even_loaded(tmp_path, capsys, make_bad, needle):
    bad = make_bad(tmp_path)
    rc, _, err = run(["eval", "--limit", "2", "--model", str(tmp_path / "no-such-model"), "--out", str(bad),
                      *SMALL], capsys)
    one_line_error(rc, err, "--out", needle)  # not "model directory ... does not exist": the out path came first


def test_eval_that_cannot_save_still_prints_and_rescues(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    out.write_text('{"earlier": "result"}')
    real_replace = os.replace

    def disk_full(src, dst):
        if Path(dst) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    rc, stdout, err = run(["eval", "--limit", "2", "--model", str(tiny_checkpoint), "--out", str(out), *SMALL], capsys)
    line = one_line_error(rc, err, "No space left on device", "saved to")
    assert "accuracy" in stdout  # the summary came before the save
    assert json.loads(out.read_text()) == {"earlier": "result"}  # the earlier result survives
    rescued = Path(line.rsplit("saved to ", 1)[1])
    assert json.loads(rescued.read_text())["n"] == 2
    rescued.unlink()


def test_eval_overwrite_is_announced(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("{}")
    rc, _, err = run(["eval", "--limit", "2", "--model", str(tiny_checkpoint), "--out", str(out), *SMALL], capsys)
    assert rc == 0 and "overwriting existing" in err and json.loads(out.read_text())["n"] == 2


def test_bench_out_onto_a_file_fails_before_any_row(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    rc, _, err = run(["bench", "--out", str(tmp_path / "taken"), "--model", str(tmp_path / "no-such-model"),
                      "--methods", "vanilla:steps=8", "--limit", "2", *SMALL[:4]], capsys)
    one_line_error(rc, err, "is a file, not a directory")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.json").mkdir()  # a directory where results.json must go
    rc, _, err = run(["bench", "--out", str(tmp_path / "d"), "--model", str(tmp_path / "no-such-model"),
                      "--methods", "vanilla:steps=8", "--limit", "2", *SMALL[:4]], capsys)
    one_line_error(rc, err, "results.json", "is a directory")


def test_bench_prints_the_table_and_rescues_when_saving_fails(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    rc, stdout, err = run(["bench", "--out", str(tmp_path), "--model", str(tiny_checkpoint), "--limit", "2",
                           "--methods", "vanilla:steps=8", "vanilla:steps=4", *SMALL[:4]], capsys)
    assert err.count("warning: could not save the finished row") == 2  # --resume's copies: warned, not fatal
    line = one_line_error(rc, "\n".join(l for l in err.splitlines()
                                        if not l.startswith(("[bench]", "diffspec: warning: could not save"))),
                          "No space left on device", "saved to")
    assert "| method |" in stdout and "vanilla steps=4" in stdout
    rescued = Path(line.split("saved to ", 1)[1].split(";")[0])
    assert len(json.loads(rescued.read_text())["rows"]) == 2
    rescued.unlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_bench_rerun_replaces_its_files_with_notes(tiny_checkpoint, tmp_path, capsys):
    argv = ["bench", "--out", str(tmp_path), "--model", str(tiny_checkpoint), "--limit", "2",
            "--methods", "vanilla:steps=8", *SMALL[:4]]
    assert run(argv, capsys)[0] == 0
    rc, _, err = run(argv, capsys)
    assert rc == 0 and err.count("overwriting existing") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.png", "results.json", "rows", "table.md"]


# ---------------------------------------------------------------- 2. model family


@pytest.mark.parametrize("method", ["vanilla", "fast-dllm", "dkv-cache", "dualdiffusion", "psd"])
def test_diffusion_methods_refuse_an_ar_checkpoint(method, qwen3_checkpoint, capsys):
    rc, _, err = run(["generate", "--prompt", "hi", "--model", str(qwen3_checkpoint), "--method", method, *SMALL[:4]],
                     capsys)
    one_line_error(rc, err, f"method {method!r}", "masked-diffusion (LLaDA)", "autoregressive (Qwen3)", "qwen3")


def test_eval_and_bench_refuse_an_ar_checkpoint_for_diffusion_methods(qwen3_checkpoint, tmp_path, capsys):
    rc, _, err = run(["eval", "--limit", "2", "--model", str(qwen3_checkpoint), *SMALL], capsys)
    one_line_error(rc, err, "masked-diffusion", "autoregressive")
    rc, _, err = run(["bench", "--model", str(qwen3_checkpoint), "--out", str(tmp_path), "--limit", "2",
                      "--methods", "vanilla:steps=8", *SMALL[:4]], capsys)
    one_line_error(rc, err, "masked-diffusion", "autoregressive")


@pytest.mark.parametrize("method", ["ar", "ar-spec", "dflash", "d2sd"])
def test_ar_methods_refuse_a_llada_checkpoint(method, tiny_checkpoint, capsys):
    rc, _, err = run(["generate", "--prompt", "hi", "--model", str(tiny_checkpoint), "--method", method,
                      "--gen-length", "8"], capsys)
    one_line_error(rc, err, f"method {method!r}", "autoregressive (Qwen3)", "masked-diffusion (LLaDA)")


def test_model_objects_are_checked_too(tiny_model, tokenizer):
    target = make_target(tokenizer)
    with pytest.raises(ValueError, match="needs a masked-diffusion.*but the model object \\(Qwen3Model\\)"):
        generate("hi", model=target, tokenizer=tokenizer, method="vanilla", gen_length=8, block_length=8)
    with pytest.raises(ValueError, match="autoregressive.*LLaDAModel"):
        generate("hi", model=tiny_model, tokenizer=tokenizer, method="ar", gen_length=8)
    with pytest.raises(ValueError, match="model must be a checkpoint directory"):
        generate("hi", model=42, tokenizer=tokenizer)


# ---------------------------------------------------------------- 3. non-finite options


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("argv,needle", [
    (["--temperature", "nan"], "temperature"),
    (["--temperature", "inf"], "temperature"),
    (["--temperature=-inf"], "temperature"),
    (["--cfg-scale", "nan"], "cfg_scale"),
    (["--cfg-scale", "inf"], "cfg_scale"),
    (["--method", "fast-dllm", "--policy", "factor", "--factor", "nan"], "factor"),
    (["--method", "fast-dllm", "--policy", "factor", "--factor", "inf"], "factor"),
    (["--method", "fast-dllm", "--threshold", "nan"], "threshold"),
    (["--method", "fast-dllm", "--policy", "local", "--local-threshold", "nan"], "local_threshold"),
    (["--method", "psd", "--threshold", "nan"], "threshold"),
    (["--method", "dualdiffusion", "--drafter-threshold", "nan"], "drafter_threshold"),
    (["--method", "dualdiffusion", "--drafter-threshold", "1.5"], "drafter_threshold"),
    (["--method", "dualdiffusion", "--rule", "confidence_threshold", "--rule-threshold", "nan"], "rule_threshold"),
    (["--method", "dualdiffusion", "--rule", "kl_divergence", "--rule-threshold", "inf"], "rule_threshold"),
    (["--method", "ar", "--temperature", "nan"], "temperature"),
    (["--method", "d2sd", "--temperature", "inf"], "temperature"),
])
def test_non_finite_cli_options_are_one_line(argv, needle, tiny_checkpoint, capsys):
    rc, _, err = run(["generate", "--prompt", "hi", "--model", str(tiny_checkpoint), *argv], capsys)
    one_line_error(rc, err, needle)


@pytest.mark.parametrize("method,option", [
    ("vanilla", "temperature"), ("vanilla", "cfg_scale"), ("fast-dllm", "threshold"), ("fast-dllm", "factor"),
    ("fast-dllm", "local_threshold"), ("dkv-cache", "temperature"), ("psd", "threshold"),
    ("dualdiffusion", "drafter_threshold"), ("dualdiffusion", "rule_threshold"), ("dualdiffusion", "temperature"),
    ("ar", "temperature"), ("ar-spec", "temperature"), ("dflash", "temperature"), ("d2sd", "temperature"),
])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_api_options_name_the_option(method, option, value):
    with pytest.raises(ValueError, match=option):
        build_config(method, **{option: value})


def test_config_classes_refuse_non_finite_floats():
    for value in (NAN, INF, 10 ** 400):
        for make in (lambda v: DecodeConfig(temperature=v), lambda v: DecodeConfig(cfg_scale=v),
                     lambda v: DecodeConfig(policy="factor", factor=v), lambda v: ARConfig(temperature=v),
                     lambda v: SpecConfig(temperature=v), lambda v: DFlashSpecConfig(temperature=v),
                     lambda v: D2SDConfig(temperature=v)):
            with pytest.raises(ValueError, match="finite|got nan"):  # a NaN temperature fails its >= 0 check
                make(value)
    assert DecodeConfig(temperature=1).temperature == 1  # an int is still a number


# ---------------------------------------------------------------- 4. tokenizer identity


def test_fingerprint_covers_every_id(tokenizer):
    other = swapped(tokenizer)
    assert other.vocab_size == tokenizer.vocab_size
    assert other.fingerprint() != tokenizer.fingerprint()
    assert swapped(other).fingerprint() == tokenizer.fingerprint()  # swapping back restores it
    diff = vocab_difference(tokenizer, other)
    assert "id" in diff and "'1'" in diff and "'2'" in diff
    with pytest.raises(ValueError, match="different tokenizers"):
        check_same_tokenizer(other, tokenizer, "the drafter", "the verifier")
    assert vocab_difference(tokenizer, Tokenizer(HFTokenizer.from_str(tokenizer.hf.to_str()))) is None


def test_the_remembered_fingerprint_follows_an_added_token(tokenizer):
    """The fingerprint is remembered per tokenizer; adding a token (the only change a loaded
    tokenizer's ids can take) must give a new one."""
    tok = Tokenizer(HFTokenizer.from_str(tokenizer.hf.to_str()))
    before = tok.fingerprint()
    assert tok.fingerprint() is before  # remembered, not hashed again
    tok.hf.add_tokens(["<brand-new>"])
    after = tok.fingerprint()
    assert after != before and after[0] == before[0] + 1
    tok.hf.add_special_tokens(["<brand-new>"])  # the same id, now special: same size, another identity
    assert tok.fingerprint()[0] == after[0] and tok.fingerprint() != after


def test_dualdiffusion_refuses_a_drafter_with_swapped_ids(tiny_checkpoint, tiny_model, tokenizer, tmp_path, capsys):
    drafter = save_model(tiny_model, swapped(tokenizer), tmp_path / "drafter")
    with pytest.raises(ValueError, match="tokenizers differ"):
        generate("Tom has 5 pens.", model=str(tiny_checkpoint), method="dualdiffusion", drafter=str(drafter),
                 gen_length=8, block_length=8, steps=8)
    rc, _, err = run(["generate", "--prompt", "hi", "--model", str(tiny_checkpoint), "--method", "dualdiffusion",
                      "--drafter", str(drafter), *SMALL[:4]], capsys)
    one_line_error(rc, err, "tokenizers differ")


def test_ar_spec_refuses_a_drafter_with_swapped_ids(qwen3_checkpoint, tokenizer, tmp_path, capsys):
    drafter = save_causal(make_target(tokenizer, seed=3, num_hidden_layers=1), swapped(tokenizer), tmp_path / "small")
    with pytest.raises(ValueError, match="different tokenizers \\(id"):
        generate("Tom has 5 pens.", model=str(qwen3_checkpoint), method="ar-spec", drafter=str(drafter), gen_length=6)
    rc, _, err = run(["generate", "--prompt", "hi", "--model", str(qwen3_checkpoint), "--method", "ar-spec",
                      "--drafter", str(drafter), "--gen-length", "6"], capsys)
    one_line_error(rc, err, "different tokenizers")
    # a drafter object comes with its tokenizer when the caller has it
    small = make_target(tokenizer, seed=3, num_hidden_layers=1)
    with pytest.raises(ValueError, match="different tokenizers"):
        generate("Tom has 5 pens.", model=str(qwen3_checkpoint), method="ar-spec", drafter=small,
                 drafter_tokenizer=swapped(tokenizer), gen_length=6)


# ---------------------------------------------------------------- 5. training configs


def mdm_config(tmp_path: Path, edit=None, **train) -> Path:
    cfg = {
        "_comment": "comments are free",
        "model": {"d_model": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 1, "mlp_hidden_size": 64,
                  "max_sequence_length": 256},
        "tokenizer": {"vocab_size": 300, "corpus_problems": 300},
        "data": {"gen_length": 48, "block_length": 16, "pool": 200, "mc_fraction": 0.1},
        "train": {"_note": "so are these", "steps": 1, "batch_size": 4, "lr": 1e-3, "warmup": 1, "eval_every": 1,
                  "eval_n": 2, "save_every": 1, "seed": 0, "threads": 1, **train},
        "out": str(tmp_path / "model"), "state_dir": str(tmp_path / "state"),
    }
    if edit:
        edit(cfg)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def _set(section: str | None, key: str, value):
    def edit(cfg):
        (cfg[section] if section else cfg)[key] = value
    return edit


@pytest.mark.parametrize("edit,needles", [
    (_set("train", "stpes", 10), ["train.stpes", "valid keys", "steps", "max_minutes"]),
    (_set(None, "ouut", "x"), ["ouut", "top level", "model", "state_dir"]),
    (_set("model", "d_modle", 64), ["model.d_modle", "d_model", "n_layers"]),
    (_set("data", "gen_lenght", 48), ["data.gen_lenght", "gen_length"]),
    (_set("model", "vocab_size", 999), ["model.vocab_size is taken from the tokenizer"]),
    (_set("model", "d_model", [64]), ["model.d_model must be an integer"]),
    (_set("train", "max_minutes", -1), ["train.max_minutes", "0 = no time limit"]),
    (_set("train", "lr", float("nan")), ["train.lr", "finite"]),
    (_set("train", "steps", 0), ["train.steps", ">= 1"]),
    (_set("train", "batch_size", "8"), ["train.batch_size must be an integer"]),
    (_set(None, "train", [1]), ["train must be a JSON object"]),
])
def test_training_config_keys_and_values_are_checked(tmp_path, capsys, edit, needles):
    rc, _, err = run(["train", "mdm", "--config", str(mdm_config(tmp_path, edit))], capsys)
    one_line_error(rc, err, *needles)
    assert not (tmp_path / "model").exists()  # refused before anything was built


def test_ar_and_drafter_schemas(tmp_path):
    from diffspec.train.ar import train_ar
    from diffspec.train.dflash import train_dflash

    base = {"model": {"hidden_size": 32}, "train": {"steps": 1}, "out": str(tmp_path / "o")}
    (tmp_path / "ar.json").write_text(json.dumps({**base, "train": {"steps": 1, "init_from": "x"}}))
    with pytest.raises(ValueError, match="train.init_from"):  # only the MDM trainer warm-starts
        train_ar(tmp_path / "ar.json")
    (tmp_path / "ar.json").write_text(json.dumps({**base, "tokenizer": {"vocab_size": 300}}))
    with pytest.raises(ValueError, match="unknown key\\(s\\) tokenizer"):  # the AR trainer borrows its tokenizer
        train_ar(tmp_path / "ar.json")
    d = {"target": "t", "kind": "dflash", "model": {"n_layers": 1}, "data": {"gamma": 4}, "train": {"steps": 1},
         "out": str(tmp_path / "o")}
    (tmp_path / "d.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="data.gamma only applies to kind vp"):
        train_dflash(tmp_path / "d.json")
    (tmp_path / "d.json").write_text(json.dumps({**d, "data": {}, "model": {"hidden_size": 48}}))
    with pytest.raises(ValueError, match="model.hidden_size is taken from the target"):
        train_dflash(tmp_path / "d.json")


def test_every_committed_config_loads_with_its_trainers_schema():
    from diffspec.train import ar, block, dflash, mdm
    from diffspec.train.common import read_train_config

    schemas = {"llada-arith.json": mdm.SCHEMA, "llada-arith-drafter.json": mdm.SCHEMA,
               "llada-arith-hard.json": mdm.SCHEMA, "llada-arith-hard-2.json": mdm.SCHEMA, "qwen3-arith.json": ar.SCHEMA, "qwen3-arith-small.json": ar.SCHEMA, "dflash-arith.json": dflash.SCHEMA, "vp-arith.json": dflash.SCHEMA,
               "dream-arith.json": mdm.DREAM_SCHEMA, "ar-smollm2.json": ar.DISTILL_SCHEMA,
               "dflash-smollm2.json": dflash.SCHEMA, "vp-smollm2.json": dflash.SCHEMA,
               "llada2-arith.json": block.SCHEMA}
    paths = sorted((REPO / "configs").glob("*.json"))
    assert {p.name for p in paths} == set(schemas), "a new config: add it here with the trainer that reads it"
    for p in paths:
        cfg = read_train_config(p, schemas[p.name])
        assert cfg["out"] and cfg["train"]


def test_resume_into_another_shape_is_a_clear_error(tmp_path, capsys):
    from diffspec.train.mdm import train_mdm

    train_mdm(mdm_config(tmp_path))
    wider = mdm_config(tmp_path, _set("model", "mlp_hidden_size", 96), steps=2)
    with pytest.raises(ValueError, match="another shape .*ff_proj.weight is \\(64, 32\\) there but \\(96, 32\\)"):
        train_mdm(wider, resume=True)
    rc, _, err = run(["train", "mdm", "--config", str(wider), "--resume"], capsys)
    one_line_error(rc, err, "--resume", "another shape")
    (tmp_path / "state" / "trainer_state.pt").write_bytes(b"not a torch file")
    rc, _, err = run(["train", "mdm", "--config", str(mdm_config(tmp_path)), "--resume"], capsys)
    one_line_error(rc, err, "not a readable trainer state")


def test_max_minutes_zero_means_no_limit(tmp_path):
    from diffspec.train.common import train_loop

    model = torch.nn.Linear(2, 1)
    calls = []

    def loss():
        calls.append(1)
        return model(torch.ones(1, 2)).sum()

    train_loop("t", model, {"max_minutes": 0, "eval_every": 100, "save_every": 100}, 3, tmp_path / "s.pt", False,
               torch.device("cpu"), loss, dict, lambda: None)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="max_minutes"):
        train_loop("t", model, {"max_minutes": -1}, 3, tmp_path / "s.pt", False, torch.device("cpu"), loss, dict,
                   lambda: None)


# ---------------------------------------------------------------- 6. prompts and API types


@pytest.mark.parametrize("template", [None, "qa", "raw"])
@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_is_refused_under_every_template(prompt, template, tiny_checkpoint, capsys):
    argv = ["generate", "--prompt", prompt, "--model", str(tiny_checkpoint)]
    rc, _, err = run(argv + (["--template", template] if template else []), capsys)
    one_line_error(rc, err, "--prompt is empty")


def test_bundled_default_template_refuses_an_empty_prompt(capsys):
    rc, _, err = run(["generate", "--prompt", " "], capsys)  # qa by default: the check precedes the wrapping
    one_line_error(rc, err, "--prompt is empty")


@pytest.mark.parametrize("method", ["vanilla", "ar"])
@pytest.mark.parametrize("prompts,needle", [
    (None, "prompts must be a string or a list of strings, got NoneType"),
    (123, "prompts must be a string or a list of strings, got int"),
    (b"bytes", "got bytes"),
    ({"a": 1}, "got dict"),
    ([None], "prompts\\[0\\] must be a string, got NoneType"),
    (["ok", 5], "prompts\\[1\\] must be a string, got int"),
    ([], "prompts is an empty list"),
    (["ok", "  "], "prompt 1 is empty"),
])
def test_generate_names_the_bad_prompts_argument(method, prompts, needle, tiny_model, tokenizer):
    model = tiny_model if method == "vanilla" else make_target(tokenizer)
    with pytest.raises(ValueError, match=needle):
        generate(prompts, model=model, tokenizer=tokenizer, method=method, gen_length=8, block_length=8)


def test_generate_accepts_tuples_and_generators(tiny_model, tokenizer):
    kw = dict(model=tiny_model, tokenizer=tokenizer, gen_length=8, block_length=8)
    a = generate(("Tom has 5 pens.", "Ana has 2."), **kw)
    b = generate((p for p in ["Tom has 5 pens.", "Ana has 2."]), **kw)
    assert a.token_ids == b.token_ids and len(a.texts) == 2


def test_argparse_complaints_are_one_line_too(capsys):
    rc, _, err = run(["generate", "--prompt", "hi", "--steps", "abc"], capsys)
    one_line_error(rc, err, "--steps", "invalid int value")
    rc, _, err = run(["generate"], capsys)
    one_line_error(rc, err, "--prompt")
    rc, _, err = run(["generate", "--prompt", "hi", "--no-such-flag"], capsys)
    one_line_error(rc, err, "--no-such-flag")
