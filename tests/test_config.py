"""Option validation shared by every method: types, and options that would be silently ignored."""
from __future__ import annotations

import pytest

from diffspec.api import build_config
from diffspec.cli import main
from diffspec.decoding.config import DecodeConfig
from diffspec.evaluation.evaluate import task_config


@pytest.mark.parametrize("kw, match", [
    (dict(gen_length="48"), "gen_length must be a int"),
    (dict(steps=4.0), "steps must be a int"),
    (dict(threshold="high"), "threshold must be a float"),
    (dict(cache=None), "cache must be a str"),
    (dict(seed=True), "seed must be a int"),
])
def test_wrong_types_are_refused_up_front(kw, match):
    with pytest.raises(ValueError, match=match):
        DecodeConfig(**kw)


def test_ints_are_fine_where_floats_are_expected():
    assert DecodeConfig(temperature=1, threshold=1).threshold == 1


@pytest.mark.parametrize("method, kw, bad", [
    ("vanilla", dict(threshold=0.8), "threshold"),
    ("fast-dllm", dict(policy="threshold", factor=2.0), "factor"),
    ("fast-dllm", dict(policy="factor", threshold=0.5), "threshold"),
    ("fast-dllm", dict(policy="threshold", local_radius=2), "local_radius"),
    ("fast-dllm", dict(cache="dual", refresh_interval=4), "refresh_interval"),
    ("dkv-cache", dict(cache="dkv-prefill", refresh_interval=4), "refresh_interval"),
    ("psd", dict(policy="factor", threshold=0.5), "threshold"),
])
def test_options_that_would_be_ignored_are_errors(method, kw, bad):
    with pytest.raises(ValueError, match=f"'{bad}'.*no effect"):
        build_config(method, **kw)
    loose = build_config(method, strict=False, **kw)  # bench sweeps apply overrides to every row
    assert loose is not None


def test_used_options_pass():
    assert build_config("fast-dllm", policy="local", threshold=0.9, local_threshold=0.6).local_threshold == 0.6
    assert build_config("dkv-cache", cache="dkv-decode", refresh_interval=4).refresh_interval == 4
    assert task_config("arith", "fast-dllm", threshold=0.8).steps == 48  # task defaults are never "unused"


def test_cli_reports_an_ignored_option(tiny_checkpoint, capsys):
    rc = main(["generate", "--prompt", "Tom has 5 pens.", "--model", str(tiny_checkpoint), "--threshold", "0.8"])
    assert rc == 2 and "no effect with policy 'schedule'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["vanilla", "fast-dllm", "dkv-cache", "psd", "dualdiffusion"])
def test_one_full_steps_rule_for_every_diffusion_builder(method):
    """A gen_length alone decodes one token per step, in every builder and through every task
    default; a base config at full steps stays at full steps for a new gen_length, one with fewer
    steps keeps its count; explicit steps win."""
    decode = lambda c: getattr(c, "decode", c)  # noqa: E731
    assert decode(build_config(method, gen_length=96)).steps == 96
    assert decode(build_config(method, gen_length=96, steps=24)).steps == 24
    assert decode(task_config("arith-hard", method)).steps == 128
    assert decode(task_config("arith-hard", method, gen_length=64)).steps == 64
    assert decode(task_config("arith", method, steps=12)).steps == 12
    reduced = build_config(method, gen_length=96, steps=24)
    assert decode(build_config(method, reduced, gen_length=48)).steps == 24
    full = build_config(method, gen_length=96)
    assert decode(build_config(method, full, gen_length=48)).steps == 48
    assert decode(build_config(method, full, gen_length=48, steps=12)).steps == 12
