"""The `diffspec.methods` package: a method is declared in one file, and every entry point finds it.

The toy method below lives in one file written by the test (as a third party would write it),
registers itself on import, and must then appear in `diffspec generate --help`, the Python API,
`diffspec bench --methods` and the server, with nothing else touched.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest

from diffspec import methods as registry
from diffspec.api import generate
from diffspec.cli import build_parser, main
from diffspec.methods import REGISTRY, Method, get_method, method_names
from diffspec.tasks import load_examples

PROMPT = load_examples("arith", limit=1)[0].prompt

TOY = textwrap.dedent('''
    """A toy method in one file: vanilla's block decoder with 1/divide of the steps (streamed)."""
    from dataclasses import dataclass, replace

    from diffspec.decoding.config import DecodeConfig, WrapsDecodeConfig
    from diffspec.methods import Method, Option, register
    from diffspec.methods.block import build_block_config, run_block


    @dataclass(frozen=True)
    class ToyConfig(WrapsDecodeConfig):
        decode: DecodeConfig
        divide: int = 2

        def replace(self, **kw):
            return replace(self, **kw)

        def to_dict(self):
            return {"divide": self.divide, **self.decode.to_dict()}


    def build(base=None, **options):
        divide = options.pop("divide", None)
        decode = build_block_config("vanilla", base.decode if base else None, **options)
        return ToyConfig(decode, divide or (base.divide if base else 2))


    def run(model, tokenizer, prompts, cfg, *, progress=False, streamer=None, meter=None):
        d = cfg.decode
        res = run_block(model, tokenizer, prompts, d.replace(steps=d.gen_length // cfg.divide), progress=progress,
                        streamer=streamer, meter=meter)
        res.config = cfg  # the result records the toy's options
        return res


    register(Method("toy", "diffusion", "vanilla with fewer steps (a toy)", build=build, config_type=(ToyConfig,),
                    run=run, options={"divide": Option(int, "steps = gen-length / divide (toy)")}, batches=True))
''')


@pytest.fixture
def toy(tmp_path):
    """Import the toy method's one file; take it out of the registry afterwards."""
    path = tmp_path / "toy_method.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_method", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield get_method("toy")
    REGISTRY.pop("toy", None)
    sys.modules.pop("toy_method", None)


def _generate_help() -> str:
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    return " ".join(sub.format_help().split())


def test_a_method_from_one_file_reaches_help_api_bench_and_server(toy, tmp_path, capsys):
    help_text = _generate_help()
    assert "toy: vanilla with fewer steps (a toy)" in help_text and "--divide" in help_text
    res = generate([PROMPT], method="toy", gen_length=16, block_length=8, divide=4)
    want = generate([PROMPT], method="vanilla", gen_length=16, block_length=8, steps=4)
    assert res.token_ids == want.token_ids and res.meter.nfe == want.meter.nfe == 4
    assert generate([PROMPT], method="toy", gen_length=16, block_length=8).meter.nfe == 8  # its own default
    with pytest.raises(ValueError, match="only applies to method 'toy'"):
        generate([PROMPT], method="vanilla", divide=2)
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "toy:divide=4", "--limit", "1", "--out", str(out),
                 "--gen-length", "16", "--block-length", "8"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["toy"] and rows[0]["config"]["divide"] == 4
    _served_equals_api(res.texts[0])


def _served_equals_api(text: str) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from test_serve import Running, streamed_completion

    from diffspec.serve import ServeSettings

    s = Running(ServeSettings(method="vanilla", batch_window=0.0))
    try:
        kw = dict(model="llada-arith", prompt=PROMPT, max_tokens=16,
                  extra_body={"diffspec": {"method": "toy", "divide": 4, "block_length": 8}})
        assert s.client.completions.create(**kw).choices[0].text == text
        assert streamed_completion(s.client, **kw)[0] == text
        chunks = [c for c in s.client.completions.create(stream=True, **kw) if c.choices and c.choices[0].text]
        assert len(chunks) > 1  # its 4 steps commit over 2 blocks: the toy streams through the block decoder
    finally:
        s.stop()


def test_builtins_stay_when_a_method_is_registered_before_the_first_lookup(monkeypatch):
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    monkeypatch.setattr(registry, "REGISTRY", {})
    early = Method("early", "diffusion", "registered first", build=lambda base=None, **o: None, config_type=(),
                   run=lambda *a, **k: None)
    registry.register(early)
    names = registry.method_names()
    assert names[0] == "vanilla" and names[-1] == "early"
    assert set(names) >= {"vanilla", "fast-dllm", "dkv-cache", "dualdiffusion", "psd", "dream", "ar", "ar-spec",
                          "dflash", "d2sd", "llada2", "sdar"}


def test_a_builtin_name_registered_before_the_first_lookup_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    monkeypatch.setattr(registry, "REGISTRY", {})
    registry.register(Method("psd", "diffusion", "", build=lambda base=None, **o: None, config_type=(),
                             run=lambda *a, **k: None))
    with pytest.raises(ValueError, match=r"\['psd'\] registered twice"):
        registry.get_method("vanilla")


def test_every_builtin_module_declares_its_methods():
    declared = [m.name for mod in registry.builtin_modules() for m in getattr(mod, "METHODS", ())]
    assert declared == [n for n in method_names() if n in declared]
    assert len(declared) == len(set(declared)) == 13


@pytest.mark.parametrize("name", ["vanilla", "psd", "dream", "ar", "dualdiffusion", "d2sd", "sdar",
                                  "fast-dllm-v2"])
def test_a_decode_function_refuses_keywords_it_does_not_take(name):
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        get_method(name).run(None, None, ["x"], None, nonsense=1)


def test_model_keywords_follow_the_roles():
    assert get_method("vanilla").model_keywords == ()
    assert get_method("dualdiffusion").model_keywords == ("drafter", "drafter_tokenizer")
    assert get_method("d2sd").model_keywords == ("drafter", "drafter_tokenizer", "vp_drafter")
    with pytest.raises(ValueError, match="unknown role"):
        Method("x", "ar", "", build=lambda base=None, **o: None, config_type=(), run=lambda *a, **k: None,
               roles=("model", "oracle"))


def test_stats_classes_come_from_the_registry():
    from diffspec.methods._stats import _classes

    names = {c.__name__ for c in _classes()}
    assert names == {"SpecStats", "PSDStats", "ARSpecStats", "BlockSpecStats"}
