"""The method registry is the one place a method is declared: every entry point reads it."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from diffspec.api import generate
from diffspec.bench.runner import parse_spec
from diffspec.cli import build_parser, main
from diffspec.methods import REGISTRY, Method, Option, get_method, method_names, register
from diffspec.speculative.armethods import DEFAULT_TARGET
from diffspec.tasks import load_examples

PROMPT = load_examples("arith", limit=1)[0].prompt


def _model_for(name: str) -> list[str]:
    return ["--model", str(DEFAULT_TARGET)] if get_method(name).family == "ar" else []


@pytest.mark.parametrize("name", method_names())
def test_every_method_runs_through_api_cli_and_bench(name, tmp_path, capsys):
    m = get_method(name)
    res = generate([PROMPT], method=name, model=DEFAULT_TARGET if m.family == "ar" else None, gen_length=16,
                   **({"block_length": 8} if m.takes_block_options else {}))
    assert len(res.token_ids) == 1 and res.meter.nfe > 0 and res.meter.tokens_generated > 0
    lengths = ["--gen-length", "16"] + (["--block-length", "8"] if m.takes_block_options else [])
    assert main(["generate", "--prompt", PROMPT, "--template", "raw", "--method", name,
                 *lengths, *_model_for(name)]) == 0
    assert capsys.readouterr().out == res.texts[0] + "\n"  # the CLI prints exactly the API's text
    out = tmp_path / "bench"
    assert main(["bench", "--methods", name, "--limit", "2", "--out", str(out), *lengths, *_model_for(name)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == [name]


@dataclass(frozen=True)
class _Echo:
    """A toy config for a toy method."""

    repeat: int = 1

    def to_dict(self) -> dict:
        return {"repeat": self.repeat}


def test_a_registered_method_appears_everywhere_without_touching_them(monkeypatch):
    def build(base=None, **options):
        given = {k: v for k, v in options.items() if v is not None}
        return _Echo(**{k: v for k, v in given.items() if k == "repeat"})

    def run(model, tokenizer, prompts, cfg, *, progress=False, streamer=None, meter=None):
        return generate(prompts, model=model, tokenizer=tokenizer, method="vanilla", gen_length=16, block_length=8)

    toy = Method("toy", "diffusion", "a toy method for this test", build=build, config_type=(_Echo,), run=run,
                 options={"repeat": Option(int, "how often to repeat (toy)")})
    monkeypatch.setitem(REGISTRY, "toy", toy)
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["generate"].format_help().split())
    assert "toy: a toy method for this test" in help_text and "--repeat" in help_text
    assert parse_spec("toy:repeat=3") == ("toy", {"repeat": 3})
    res = generate([PROMPT], method="toy", repeat=2)
    assert res.token_ids
    with pytest.raises(ValueError, match="only applies to method 'toy'"):
        generate([PROMPT], method="vanilla", repeat=2)


def test_registering_a_name_twice_or_an_unknown_family_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register(get_method("vanilla"))
    with pytest.raises(ValueError, match="family must be one of"):
        Method("x", "quantum", "", build=lambda b=None, **o: None, config_type=(), run=lambda *a, **k: None)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from diffspec.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_convert_refuses_what_it_cannot_convert(tmp_path, capsys):
    assert main(["convert", "safetensors", str(tmp_path / "x"), str(tmp_path / "out")]) == 2
    assert "unknown conversion 'safetensors'; diffspec converts: gguf" in capsys.readouterr().err
    assert main(["convert", "gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "diffspec: error:" in capsys.readouterr().err
