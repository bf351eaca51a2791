"""`--compile`: torch.compile of the model's forward decodes exactly what eager does (issue #22 part 2).

The fast tests trace with dynamo's `eager` backend (no code generation, seconds), which still
replaces the forward the decoding loops call: a wiring bug (the flag ignored, the compiled forward
never reached, the KV cache objects broken by tracing) shows up as no captured graph or other ids.
The inductor backend (generated C++ on a CPU, about a minute to warm up) is a slow test.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from diffspec.api import generate, resolve_model
from diffspec.cli import main
from diffspec.models.compiled import compile_forward, compiled_backend
from diffspec.bench.rows import weights_fingerprint

PROMPT = "What is 2 + 3?"
CASES = [("vanilla", {}), ("fast-dllm", {"cache": "dual", "policy": "threshold"}), ("ar", {}), ("dflash", {})]


@pytest.mark.parametrize("method,opts", CASES, ids=[c[0] for c in CASES])
def test_compiled_forward_decodes_the_same_ids(method, opts):
    eager = generate([PROMPT], method=method, **opts)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, tok = resolve_model(None, None, method=method, compile="eager")
    assert compiled_backend(model) == "eager"
    res = generate([PROMPT], model=model, tokenizer=tok, method=method, **opts)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode loop reached the compiled forward
    assert res.token_ids == eager.token_ids and res.meter.nfe == eager.meter.nfe


def test_compile_keeps_the_weights_and_refuses_bad_backends(capsys):
    model, tok = resolve_model(None, None)
    before = weights_fingerprint(model)
    assert compile_forward(model, "eager") is model and compile_forward(model, "eager") is model  # twice: a no-op
    assert weights_fingerprint(model) == before and compiled_backend(model) == "eager"
    with pytest.raises(ValueError, match="already compiled with backend 'eager'"):
        compile_forward(model, "inductor")
    with pytest.raises(ValueError, match="unknown --compile backend 'tensorrt'"):
        resolve_model(None, None, compile="tensorrt")
    assert main(["generate", "--prompt", "1 + 1", "--compile", "fast"]) == 2
    assert "unknown --compile backend 'fast'; choose one of inductor" in capsys.readouterr().err


def test_cli_compile_flag_reaches_the_model(capsys, monkeypatch):
    import diffspec.api as api

    seen = []
    real = api.resolve_model

    def spy(*args, **kw):
        seen.append(kw.get("compile"))
        return real(*args, **kw)

    monkeypatch.setattr(api, "resolve_model", spy)
    argv = ["generate", "--prompt", "Tom has 5 apples. Tom buys 3 more. Tom gives away 2. How many apples does Tom have now?"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    torch._dynamo.reset()
    assert main(argv + ["--compile", "eager"]) == 0
    assert capsys.readouterr().out == eager and eager.strip() and "eager" in seen


@pytest.mark.slow
def test_inductor_compiled_forward_decodes_the_same_ids():
    for method in ("vanilla", "ar"):
        eager = generate([PROMPT], method=method)
        torch._dynamo.reset()
        res = generate([PROMPT], method=method, compile="inductor")
        assert res.token_ids == eager.token_ids
