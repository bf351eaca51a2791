"""Property tests of the decoding contract (issue #21): for any drawn configuration and prompts,
`generate` either refuses with a ValueError that names the offending option, or returns ids that
are in the vocabulary, fill the configured length, and repeat exactly under the same seed.

Tiny random models keep each example to milliseconds; the example counts are fixed and the draws
derandomized, so the suite is reproducible and stays well under a minute on one thread.
"""
from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffspec.api import generate
from diffspec.cli import main
from diffspec.decoding.config import POLICIES
from diffspec.models.tokenizer import EOS_TOKEN, MASK_TOKEN

from test_d2sd import make_drafter, make_target

NAN, INF = math.nan, math.inf

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SPECIALS = [EOS_TOKEN, MASK_TOKEN, "<|eot_id|>", "<|start_header_id|>"]
# Clean prompts decode on the tiny models (they fit the 128 positions with any drawn gen_length).
clean_prompt = st.one_of(
    st.sampled_from(["Tom has 5 pens. Tom buys 3 more.", "1+1=", "Question: 7*2?\nAnswer:"]),
    st.text(min_size=1, max_size=8).filter(lambda t: t.strip() and MASK_TOKEN not in t),
)
# Any prompt: also empty / whitespace, long (past the tiny models' 128 positions), any unicode,
# and text with special tokens spliced in (the mask token must be refused, the others decode).
any_prompt = st.one_of(
    clean_prompt,
    st.sampled_from(["", " ", "\n\t "]),
    st.integers(20, 80).map(lambda n: "Ana has 7 pens. " * n),
    st.text(min_size=1, max_size=40),
    st.tuples(st.sampled_from(SPECIALS), st.text(max_size=10)).map(lambda t: f"Tom {t[0]} has {t[1]}"),
)


def prompt_sets(p: st.SearchStrategy[str]) -> st.SearchStrategy[str | list[str]]:
    return st.one_of(p, st.lists(p, min_size=1, max_size=3))


# (prompts, clean): clean prompts never cause an error of their own.
_clean = prompt_sets(clean_prompt).map(lambda ps: (ps, True))
prompts = st.one_of(_clean, _clean, prompt_sets(any_prompt).map(lambda ps: (ps, False)))

DIFFUSION_METHODS = ["vanilla", "fast-dllm", "dkv-cache", "psd", "dualdiffusion"]
CACHES_OF = {"vanilla": ["none"], "fast-dllm": ["none", "prefix", "dual"],
             "dkv-cache": ["dkv-decode", "dkv-greedy", "dkv-prefill"], "psd": ["none", "prefix", "dual"],
             "dualdiffusion": ["none", "prefix", "dual"]}
POLICIES_OF = {"vanilla": ["schedule"], "fast-dllm": list(POLICIES), "dkv-cache": ["schedule"],
               "psd": ["threshold", "factor", "local"], "dualdiffusion": ["schedule", "threshold"]}
# Values no context accepts: a configuration with one of them must be refused, naming that option.
BAD = {"gen_length": [0, -4], "block_length": [0, -1], "steps": [0, -1, 1000], "temperature": [-1.0, NAN, INF],
       "cfg_scale": [-0.5, NAN, INF], "threshold": [0.0, 1.5, NAN, -INF], "factor": [0.0, -1.0, NAN, INF],
       "local_threshold": [0.0, 2.0, NAN], "remasking": ["bogus"], "cache": ["bogus"], "policy": ["bogus"],
       "batch_size": [0], "refresh_interval": [0]}


@st.composite
def valid_options(draw, method: str) -> dict[str, Any]:
    """A configuration `method` accepts (each option given or left to its default)."""
    gen_length = draw(st.sampled_from([8, 16]))
    block_length = draw(st.sampled_from([8, 16] if method == "psd" else [1, 2, 4, 8, 16]).filter(
        lambda b: gen_length % b == 0))
    blocks = gen_length // block_length
    policy = draw(st.sampled_from(POLICIES_OF[method]))
    opts: dict[str, Any] = {"gen_length": gen_length, "block_length": block_length, "policy": policy,
                            "cache": draw(st.sampled_from(CACHES_OF[method])), "seed": draw(st.integers(0, 3)),
                            "batch_size": draw(st.sampled_from([1, 2, 32]))}
    if policy == "schedule":
        opts["steps"] = blocks * draw(st.integers(1, gen_length // blocks))
    if policy in ("threshold", "local"):
        opts["threshold"] = draw(st.sampled_from([0.05, 0.5, 0.9, 1.0]))
    if policy == "local":
        opts["local_threshold"] = opts["threshold"] * draw(st.sampled_from([0.5, 1.0]))
    if policy == "factor":
        opts["factor"] = draw(st.sampled_from([0.5, 1.0, 3.0]))
    if method != "psd":
        opts["temperature"] = draw(st.sampled_from([0.0, 0.0, 0.7]))
        opts["remasking"] = draw(st.sampled_from(["low_confidence", "random"]))
    if method == "vanilla" and draw(st.booleans()):  # guidance needs cache none
        opts["cfg_scale"] = draw(st.sampled_from([0.0, 0.5]))
    if method == "dkv-cache" and opts["cache"] != "dkv-prefill":
        opts["refresh_interval"] = draw(st.integers(1, 4))
    return leave_some_to_defaults(draw, opts, ("seed", "batch_size", "temperature", "remasking", "cfg_scale",
                                               "refresh_interval", "cache"))


def leave_some_to_defaults(draw, opts: dict[str, Any], optional: tuple[str, ...]) -> dict[str, Any]:
    """Drop some of the options whose defaults keep the configuration valid."""
    return {k: v for k, v in opts.items() if k not in optional or draw(st.integers(0, 4)) > 0}


@st.composite
def decode_cases(draw) -> tuple[str, dict[str, Any], str | None]:
    """(method, options, the one option set to a value no context accepts, or None)."""
    method = draw(st.sampled_from(DIFFUSION_METHODS))
    opts = draw(valid_options(method))
    bad = None
    if draw(st.integers(0, 2)) == 0:
        bad = draw(st.sampled_from(sorted(BAD)))
        opts[bad] = draw(st.sampled_from(BAD[bad]))
    if method == "dualdiffusion":  # the drafter's cache / policy / threshold go by drafter_* names
        rename = {k: f"drafter_{k}" for k in ("cache", "policy", "threshold")}
        opts = {rename.get(k, k): v for k, v in opts.items()}
        bad = rename.get(bad, bad)
    return method, opts, bad


def names(message: str, candidates) -> bool:
    """Does the message name one of `candidates`? Whole words only ('threshold' is not found inside
    'local_threshold'), a plural allowed ('caches')."""
    return any(re.search(rf"(?<![\w]){re.escape(n)}s?(?![\w])", message) for n in candidates)


def check_result(res, ps: list[str], gen_length: int, vocab: int, mask_id: int) -> None:
    assert len(res.token_ids) == len(res.texts) == len(ps)
    for raw, cut in zip(res.raw_ids, res.token_ids):
        assert len(raw) == gen_length  # the canvas is filled to exactly the configured length
        assert all(0 <= t < vocab and t != mask_id for t in raw)
        assert cut == raw[:len(cut)]


def generate_or_refuse(ps: Any, kw: dict[str, Any], bad: str | None, clean: bool) -> Any:
    """generate(ps, **kw), held to the contract: a refusal (None) must name the bad option or the
    unclean prompt, and a result must not come from a bad option."""
    try:
        res = generate(ps, **kw)
    except ValueError as e:
        event("refused")
        assert bad or not clean, f"a valid configuration with clean prompts was refused: {e}"
        culprits = ([bad] if bad else []) + ([] if clean else ["prompt", "prompts"])
        assert names(str(e), culprits), f"{e!s} names none of {culprits}"
        return None
    event(f"decoded with {kw['method']}")
    assert bad is None, f"{bad}={kw[bad]!r} was accepted"
    return res


@SETTINGS
@given(case=decode_cases(), drawn=prompts)
def test_diffusion_generate_contract(tiny_model, tokenizer, case, drawn):
    method, opts, bad = case
    ps, clean = drawn
    kw = dict(model=tiny_model, tokenizer=tokenizer, method=method, **opts)
    res = generate_or_refuse(ps, kw, bad, clean)
    if res is None:
        return
    plist = [ps] if isinstance(ps, str) else ps
    gen_length = res.config.gen_length
    assert gen_length == opts.get("gen_length", gen_length)
    check_result(res, plist, gen_length, tiny_model.config.embedding_size, tiny_model.config.mask_token_id)
    again = generate(ps, **kw)
    assert again.token_ids == res.token_ids and again.raw_ids == res.raw_ids  # same seed, same ids


@pytest.fixture(scope="module")
def ar_models(tokenizer):
    target = make_target(tokenizer, seed=0)
    return {"target": target, "small": make_target(tokenizer, seed=5, num_hidden_layers=1),
            "block": make_drafter(target, tokenizer, seed=1, block_size=4),
            "vp": make_drafter(target, tokenizer, seed=2, block_size=8)}


AR_BAD = {"gen_length": [0, -1], "temperature": [-1.0, NAN, INF, -INF], "batch_size": [0], "gamma": [0, -2],
          "gamma2": [1], "k": [0, -1]}


@st.composite
def ar_cases(draw) -> tuple[str, dict[str, Any], str | None]:
    """(method, options, the one option set to a value no context accepts, or None), for the
    tiny target and drafters of `ar_models` (DFlash window 4, VP window 8)."""
    method = draw(st.sampled_from(["ar", "ar-spec", "dflash", "d2sd"]))
    opts: dict[str, Any] = {"gen_length": draw(st.sampled_from([1, 5, 12])),
                            "temperature": draw(st.sampled_from([0.0, 0.0, 0.8])),
                            "seed": draw(st.integers(0, 3)), "batch_size": draw(st.sampled_from([1, 2, 8]))}
    if method != "ar":
        opts["gamma"] = draw(st.integers(1 if method == "ar-spec" else 2, 4))
    if method == "d2sd":
        opts["gamma2"] = draw(st.integers(opts["gamma"], 8))
        opts["k"] = draw(st.sampled_from([1, 2, 4]))
    opts = leave_some_to_defaults(draw, opts, ("seed", "batch_size", "temperature", "gen_length"))
    bad = None
    if draw(st.integers(0, 2)) == 0:
        bad = draw(st.sampled_from([k for k in AR_BAD if k in ("gen_length", "temperature", "batch_size")
                                    or (k == "gamma" and method != "ar") or method == "d2sd"]))
        opts[bad] = draw(st.sampled_from(AR_BAD[bad]))
    return method, opts, bad


@SETTINGS
@given(case=ar_cases(), drawn=prompts)
def test_ar_generate_contract(ar_models, tokenizer, case, drawn):
    method, opts, bad = case
    ps, clean = drawn
    kw: dict[str, Any] = dict(model=ar_models["target"], tokenizer=tokenizer, method=method, **opts)
    if method == "ar-spec":
        kw["drafter"] = ar_models["small"]
    elif method in ("dflash", "d2sd"):
        kw["drafter"] = ar_models["block"]
        if method == "d2sd":
            kw["vp_drafter"] = ar_models["vp"]
    res = generate_or_refuse(ps, kw, bad, clean)
    if res is None:
        return
    plist = [ps] if isinstance(ps, str) else ps
    budget, eos = res.config.gen_length, set(ar_models["target"].config.eos_token_ids)
    assert budget == opts.get("gen_length", budget)
    assert len(res.token_ids) == len(plist)
    for raw in res.raw_ids:
        # the configured length, or shorter only because the row stopped at its EOS
        assert len(raw) == budget or (raw and raw[-1] in eos and len(raw) <= budget)
        assert all(0 <= t < tokenizer.vocab_size for t in raw)
    again = generate(ps, **kw)
    assert again.raw_ids == res.raw_ids  # same seed, same ids (sampling included)


FLOAT_FLAGS = ["--temperature", "--cfg-scale", "--threshold", "--factor", "--local-threshold"]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["vanilla", "fast-dllm", "psd"]),
       flag=st.sampled_from(FLOAT_FLAGS),
       value=st.sampled_from(["nan", "inf", "-inf", "-1", "0", "0.5", "1", "3", "abc", "1e400"]),
       text=st.one_of(st.sampled_from(["", "  ", "Tom has 5 pens."]), st.text(max_size=20)))
def test_cli_is_exit_0_or_one_error_line(tiny_checkpoint, capsys, method, flag, value, text):
    """Whatever the flag values, the CLI exits 0 with a completion or 2 with one `diffspec: error:` line."""
    policy = {"--factor": "factor", "--local-threshold": "local"}.get(flag)
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", text, "--method", method,
            "--gen-length", "8", "--block-length", "8", f"{flag}={value}"]
    if policy and method != "vanilla":
        argv += ["--policy", policy]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc in (0, 2)
    event(f"exit {rc}")
    if rc == 2:
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("diffspec: error:"), err
        assert out == ""
    else:
        assert value not in ("nan", "inf", "-inf", "1e400", "abc")  # never accepted
        assert "[" in err and "forwards" in err
