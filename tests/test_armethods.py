"""AR-target methods through the API and CLI: ar, ar-spec, dflash, d2sd share one budget and stay lossless."""
from __future__ import annotations

import pytest

from diffspec.api import build_config, generate, load_any
from diffspec.cli import main
from diffspec.evaluation.evaluate import task_config
from diffspec.models.causal import Qwen3Model, save_causal
from diffspec.models.dflash import save_dflash
from diffspec.speculative.armethods import ARMethodConfig

from test_d2sd import make_drafter, make_target

PROMPT = "Tom has 5 pens. Tom buys 3 more."


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ar")
    target = make_target(tokenizer, seed=0)
    small = make_target(tokenizer, seed=5, num_hidden_layers=1)
    paths = {"target": save_causal(target, tokenizer, root / "target"),
             "small": save_causal(small, tokenizer, root / "small"),
             "dflash": root / "dflash", "vp": root / "vp"}
    save_dflash(make_drafter(target, tokenizer, seed=1, block_size=4), paths["dflash"])
    save_dflash(make_drafter(target, tokenizer, seed=2, block_size=8), paths["vp"])
    return paths


def test_configs_map_gen_length_and_refuse_foreign_options():
    cfg = build_config("d2sd", gen_length=20, gamma=4, gamma2=8, k=2, vp_drafter="x")
    assert isinstance(cfg, ARMethodConfig) and cfg.decode.gen_length == 20 and cfg.vp_drafter == "x"
    assert cfg.to_dict()["k"] == 2
    assert task_config("arith", "ar").decode.gen_length == 48  # block_length / steps are not passed on
    with pytest.raises(ValueError, match="do not apply to the autoregressive method 'ar'"):
        build_config("ar", steps=4)
    with pytest.raises(ValueError, match="only applies to method 'd2sd'"):
        build_config("dflash", gamma2=8)
    with pytest.raises(ValueError, match="gamma2"):
        build_config("d2sd", gamma=8, gamma2=4)
    with pytest.raises(ValueError, match="'gamma' only applies"):
        build_config("vanilla", gamma=3)


def test_load_any_dispatches_on_model_type(ckpts, tiny_checkpoint):
    m, _ = load_any(ckpts["target"])
    assert isinstance(m, Qwen3Model)
    m, _ = load_any(tiny_checkpoint)
    assert not isinstance(m, Qwen3Model)


def test_every_ar_method_gives_the_greedy_tokens(ckpts):
    kw = dict(model=str(ckpts["target"]), gen_length=12)
    base = generate([PROMPT], method="ar", **kw)
    spec = generate([PROMPT], method="ar-spec", drafter=str(ckpts["small"]), gamma=3, **kw)
    dflash = generate([PROMPT], method="dflash", drafter=str(ckpts["dflash"]), gamma=4, **kw)
    d2sd = generate([PROMPT], method="d2sd", drafter=str(ckpts["dflash"]), vp_drafter=str(ckpts["vp"]),
                    gamma=4, gamma2=8, k=2, **kw)
    for r in (spec, dflash, d2sd):
        assert r.raw_ids == base.raw_ids
    assert d2sd.config.to_dict()["vp_drafter"] == str(ckpts["vp"])
    assert set(d2sd.meter.models) == {"target", "drafter", "vp_drafter"}


def test_an_ar_drafters_draft_vocabulary_is_read_beside_it_only(ckpts, tmp_path, tokenizer):
    """draft_vocab.json narrows a drafter loaded as one; the same file beside a model loaded as the
    target is not read (a target narrowed to a few ids would decode other text)."""
    import shutil

    from diffspec.models.draft_vocab import write_draft_vocab
    from diffspec.speculative.armethods import build_ar_config, load_drafters

    kw = dict(model=str(ckpts["target"]), gen_length=12)
    base = generate([PROMPT], method="ar", **kw)
    small = shutil.copytree(ckpts["small"], tmp_path / "small")
    write_draft_vocab(small, {t: 1 for t in base.raw_ids[0]}, 100)
    target, tok = load_any(ckpts["target"])
    drafter = load_drafters(build_ar_config("ar-spec", drafter=str(small)), target, tok)["drafter"]
    assert sorted(drafter.draft_vocab.tolist()) == sorted(set(base.raw_ids[0]))
    spec = generate([PROMPT], method="ar-spec", drafter=str(small), gamma=3, **kw)
    assert spec.raw_ids == base.raw_ids
    narrowed_target = shutil.copytree(ckpts["target"], tmp_path / "target")
    write_draft_vocab(narrowed_target, {5: 1}, 1)
    assert load_any(narrowed_target)[0].draft_vocab is None
    assert generate([PROMPT], method="ar", model=str(narrowed_target), gen_length=12).raw_ids == base.raw_ids


def test_ar_methods_need_an_ar_target(tiny_checkpoint):
    with pytest.raises(ValueError, match="needs an autoregressive"):
        generate([PROMPT], method="ar", model=str(tiny_checkpoint), gen_length=8)


def test_cli_ar_methods(ckpts, capsys):
    base = ["generate", "--prompt", PROMPT, "--model", str(ckpts["target"]), "--gen-length", "10"]
    assert main(base + ["--method", "ar"]) == 0
    greedy = capsys.readouterr().out
    assert main(base + ["--method", "d2sd", "--drafter", str(ckpts["dflash"]), "--vp-drafter", str(ckpts["vp"]),
                        "--gamma", "4", "--gamma2", "8", "--k", "2"]) == 0
    assert capsys.readouterr().out == greedy
    assert main(base + ["--method", "dflash", "--drafter", str(ckpts["dflash"]), "--k", "2"]) == 2
    assert "only applies to method 'd2sd'" in capsys.readouterr().err


def test_bench_runs_ar_methods_and_refuses_mixed_runs(ckpts, tmp_path, capsys):
    from diffspec.bench.runner import run_bench, suite

    m, tok = load_any(ckpts["target"])
    specs = ["ar", f"ar-spec:drafter={ckpts['small']},gamma=2",
             f"d2sd:drafter={ckpts['dflash']},vp_drafter={ckpts['vp']},gamma=4,gamma2=8,k=2"]
    r = run_bench(m, tok, specs, limit=2, out_dir=tmp_path, overrides={"gen_length": 8})
    rows = r["rows"]
    assert [x["accuracy"] for x in rows[1:]] == [rows[0]["accuracy"]] * 2  # lossless
    assert [x["same_ids_as_baseline"] for x in rows] == [1.0, 1.0, 1.0]  # token for token
    assert "same ids as baseline" in (tmp_path / "table.md").read_text()
    assert rows[2]["config"]["k"] == 2 and rows[2]["spec"]["acceptance_length"] >= 1  # the stats survive
    assert "d2sd" in " ".join(suite("d2sd", "arith"))
    assert main(["bench", "--methods", "vanilla", "ar", "--limit", "1", "--out", str(tmp_path)]) == 2
    assert "separate runs" in capsys.readouterr().err
