"""A bench spec's `model=PATH`: that row is decoded by another checkpoint, with its own tokenizer, so
one table compares models. Each test fails if `model=` were ignored (the row decoded by the run's
model), keyed by the run's weights, or loaded only after other rows had decoded."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import diffspec.evaluation.evaluate as ev
from diffspec.bench.runner import label_of, load_row_models, parse_spec, plan_bench, run_bench
from diffspec.cli import main
from diffspec.models.checkpoint import load_model, save_model
from diffspec.models.tokenizer import EOS_TOKEN, MASK_TOKEN, train_bpe

SMALL = {"gen_length": 8, "block_length": 8}


def spy_run_part(monkeypatch) -> list[tuple[Any, Any, int]]:
    """run_part (under both whole rows and chunks) recording the model, tokenizer and examples it got."""
    calls: list[tuple[Any, Any, int]] = []
    real = ev.run_part

    def part(task, examples, model, tokenizer, *a, **kw):
        calls.append((model, tokenizer, len(examples)))
        return real(task, examples, model, tokenizer, *a, **kw)

    monkeypatch.setattr(ev, "run_part", part)
    return calls


@pytest.fixture
def deeper(make_model, tokenizer, tmp_path) -> Path:
    """Another model on the same tokenizer, with 3 layers to the run model's 2: more FLOPs per token."""
    return save_model(make_model(seed=1, n_layers=3), tokenizer, tmp_path / "deeper")


def test_a_row_with_model_is_decoded_by_that_model(tiny_model, tokenizer, deeper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # model= paths are relative to the current directory
    calls = spy_run_part(monkeypatch)
    specs = ["vanilla:steps=8", "vanilla:steps=8,model=deeper", "vanilla:steps=4,model=./deeper"]
    r = run_bench(tiny_model, tokenizer, specs, limit=2, out_dir=tmp_path / "out", overrides=SMALL)
    base, row, again = r["rows"]
    assert calls[0][0] is tiny_model
    assert calls[1][0].config.n_layers == 3 and calls[2][0] is calls[1][0]  # loaded once for both spellings
    assert calls[1][1] is not tokenizer and calls[1][1].hf.get_vocab() == tokenizer.hf.get_vocab()
    per_token = lambda x: x["flops"] / x["tokens_processed"]  # noqa: E731
    assert per_token(row) > 1.3 * per_token(base)  # 3 layers against 2
    alone = run_bench(*load_model(deeper), ["vanilla:steps=8"], limit=2, out_dir=tmp_path / "alone",
                      overrides=SMALL)["rows"][0]
    for k in ("flops", "nfe", "tokens_generated", "accuracy"):
        assert row[k] == alone[k], k  # exactly what the other model gives as the run's model
    assert (row["label"], again["label"]) == ("vanilla steps=8 [deeper]", "vanilla steps=4 [deeper]")
    assert row["model"] == "deeper" and again["model"] == "./deeper" and "model" not in base  # as given
    assert "model" not in row["config"]  # not a method option
    assert isinstance(row["same_ids_as_baseline"], float)  # the same tokenizer: ids compare
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"][1]["model"] == "deeper" and "[deeper]" in (tmp_path / "out" / "table.md").read_text()


@pytest.mark.parametrize("chunk", [0, 2])
def test_resume_keys_follow_the_rows_own_model(chunk, tiny_model, tokenizer, make_model, deeper, tmp_path,
                                               monkeypatch):
    specs = ["vanilla:steps=8", f"vanilla:steps=8,model={deeper}"]
    kw = dict(limit=2, out_dir=tmp_path / "out", overrides={**SMALL, "batch_size": 2}, chunk=chunk)
    first = run_bench(tiny_model, tokenizer, specs, **kw)
    save_model(make_model(seed=2, n_layers=3), tokenizer, deeper)  # same path, other weights
    calls = spy_run_part(monkeypatch)
    again = run_bench(tiny_model, tokenizer, specs, resume=True, **kw)
    assert again["resumed_rows"] == ["vanilla steps=8"]  # the run model's row is reused ...
    assert len(calls) == 1 and calls[0][0].config.n_layers == 3  # ... the retrained model's is decoded again
    assert again["rows"][1]["flops"] == first["rows"][1]["flops"]  # the same shapes, so the same cost
    calls.clear()
    assert run_bench(tiny_model, tokenizer, specs, resume=True, **kw)["resumed_rows"] == \
        ["vanilla steps=8", "vanilla steps=8 [deeper]"]
    assert calls == []


def test_a_bad_model_fails_before_any_row_decodes(tiny_model, tokenizer, tiny_checkpoint, tmp_path, monkeypatch):
    calls = spy_run_part(monkeypatch)
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"vanilla:steps=4,model={missing}'.*does not exist"):
        run_bench(tiny_model, tokenizer, ["vanilla:steps=8", f"vanilla:steps=4,model={missing}"], limit=2,
                  out_dir=tmp_path / "a", overrides=SMALL)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (corrupt / name).write_bytes((tiny_checkpoint / name).read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match=f"model={corrupt}: .*safetensors"):
        run_bench(tiny_model, tokenizer, ["vanilla:steps=8", f"vanilla:model={corrupt}"], limit=2,
                  out_dir=tmp_path / "b", overrides=SMALL)
    assert calls == []  # neither the first row nor any other decoded
    with pytest.raises(ValueError, match="model= needs a checkpoint directory"):
        parse_spec("vanilla:model=")
    qwen = Path(__file__).resolve().parents[1] / "diffspec" / "assets" / "qwen3-arith"
    with pytest.raises(ValueError, match="fast-dllm:model=.*needs a masked-diffusion"):
        plan_bench([f"fast-dllm:model={qwen}"], "arith")  # the row's method against the row's model


def test_another_tokenizer_is_used_and_its_ids_are_not_compared(tiny_model, tokenizer, arith_texts, make_model,
                                                                 tmp_path, monkeypatch):
    tok = train_bpe(arith_texts, vocab_size=280)
    model = make_model(seed=1, mask_token_id=tok.token_to_id(MASK_TOKEN), eos_token_id=tok.token_to_id(EOS_TOKEN))
    other = save_model(model, tok, tmp_path / "other-vocab")
    calls = spy_run_part(monkeypatch)
    r = run_bench(tiny_model, tokenizer, ["vanilla:steps=8", f"vanilla:steps=8,model={other}"], limit=2,
                  out_dir=tmp_path / "out", overrides=SMALL)
    assert calls[0][1] is tokenizer and calls[1][1].vocab_size == 280  # each row encodes with its own
    assert r["rows"][0]["same_ids_as_baseline"] == 1.0 and r["rows"][1]["same_ids_as_baseline"] is None
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert "[other-vocab]" in table[3] and table[3].split("|")[-2].strip() == ""  # a blank cell, no crash


def test_labels_plan_and_placement(tiny_model, tokenizer, tiny_checkpoint):
    method, opts = parse_spec("fast-dllm:cache=dual,policy=threshold,model=diffspec/assets/llada-arith")
    assert opts["model"] == "diffspec/assets/llada-arith"
    assert label_of(method, opts) == "fast-dllm cache=dual policy=threshold [llada-arith]"
    assert label_of(*parse_spec("dualdiffusion:rule=exact_match,model=/x/y/")) == "dualdiffusion exact_match [y]"
    parsed, configs = plan_bench([f"vanilla:steps=12,model={tiny_checkpoint}"], "arith")
    assert "model" not in configs[0].to_dict() and configs[0].steps == 12
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)  # rows load on the run model's dtype
    (m, t), = load_row_models([f"vanilla:model={tiny_checkpoint}"], parsed, half, tokenizer)
    assert m is not half and next(m.parameters()).dtype == torch.bfloat16 and t is not tokenizer


def test_cli_refuses_model_rows_under_chat_and_lets_them_mix_families(tiny_checkpoint, tmp_path, capsys):
    spec = f"vanilla:model={tiny_checkpoint}"
    assert main(["bench", "--chat", "--methods", "vanilla", spec, "--out", str(tmp_path / "a")]) == 2
    assert "--chat" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["bench", "--quantize", "int8", "--methods", "vanilla", spec, "--out", str(tmp_path / "q")]) == 2
    assert "--model only" in capsys.readouterr().err and not (tmp_path / "q").exists()
    qwen = Path(__file__).resolve().parents[1] / "diffspec" / "assets" / "qwen3-arith"
    args = ["bench", "--model", str(tiny_checkpoint), "--limit", "1", "--gen-length", "8",
            "--methods", "vanilla:steps=8,block_length=8", f"ar:model={qwen}", "--out", str(tmp_path / "b")]
    assert main(args) == 0  # an AR row on its own AR model beside diffusion rows on --model
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["vanilla steps=8 block_length=8", "ar [qwen3-arith]"]
