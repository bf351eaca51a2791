"""Every method streams through the server's one executor, as its own loop makes tokens final.

Per method: the streamed text equals the plain response's and `diffspec.api.generate`'s, and it
arrives in one chunk per commit at which the library's own streamer saw the answer's text grow
(more than one for every method here). `tests/test_methods.py` streams a toy method the same way.
"""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from test_serve import Running  # noqa: E402

from diffspec.api import generate  # noqa: E402
from diffspec.decoding.streamer import Streamer  # noqa: E402
from diffspec.serve import ServeSettings  # noqa: E402
from diffspec.tasks import load_examples  # noqa: E402

Q = load_examples("arith", limit=2)[1].prompt
DIFFUSION = [("vanilla", {}), ("fast-dllm", {}), ("dkv-cache", {"cache": "dkv-decode"}), ("psd", {}),
             ("dualdiffusion", {}), ("dream", {"alg": "maskgit_plus"}), ("llada2", {}), ("sdar", {})]
AR = [("ar", {}), ("ar-spec", {}), ("dflash", {}), ("d2sd", {})]


class TextGrowth(Streamer):
    """How many commits made one row's answer text (cut at EOS) longer."""

    def __init__(self, tokenizer, eos: set[int]):
        self.tokenizer, self.eos = tokenizer, eos
        self.cells: dict[int, int] = {}
        self.text, self.growths = "", 0

    def on_commit(self, row, positions, token_ids):
        self.cells.update(zip(positions, token_ids))
        ids = []
        while len(ids) in self.cells and self.cells[len(ids)] not in self.eos:
            ids.append(self.cells[len(ids)])
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(self.text):
            self.text, self.growths = text, self.growths + 1


def _check(srv: Running, name: str, method: str, opts: dict) -> None:
    model, tok = srv.service.model, srv.service.tokenizer
    eos = set(srv.service.eos_ids)
    growth = TextGrowth(tok, eos)
    ref = generate([Q], model=model, tokenizer=tok, method=method, gen_length=32, streamer=growth, **opts)
    assert ref.texts == generate([Q], model=model, tokenizer=tok, method=method, gen_length=32, **opts).texts
    assert growth.text == ref.texts[0], "the library streamer saw the final text"
    kw = dict(model=name, prompt=Q, max_tokens=32, extra_body={"diffspec": {"method": method, **opts}})
    assert srv.client.completions.create(**kw).choices[0].text == ref.texts[0]
    chunks = [c.choices[0].text for c in srv.client.completions.create(stream=True, **kw)
              if c.choices and c.choices[0].text]
    assert "".join(chunks) == ref.texts[0], method
    # one chunk per commit that made the text longer: nothing held back until the batch ends
    assert len(chunks) == growth.growths > 1, (method, len(chunks), growth.growths)


@pytest.fixture(scope="module")
def diffusion_server():
    s = Running(ServeSettings(method="vanilla", batch_window=0.0))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ar_server():
    s = Running(ServeSettings(method="ar", batch_window=0.0))
    yield s
    s.stop()


@pytest.mark.parametrize("method,opts", DIFFUSION)
def test_a_diffusion_method_streams_what_it_answers(diffusion_server, method, opts):
    _check(diffusion_server, "llada-arith", method, opts)


@pytest.mark.parametrize("method,opts", AR)
def test_an_ar_method_streams_what_it_answers(ar_server, method, opts):
    _check(ar_server, "qwen3-arith", method, opts)


def test_the_engine_has_one_executor_and_no_model_wrapper():
    import diffspec.serve.engine as engine

    assert not hasattr(engine, "ObservedModel") and not hasattr(engine, "_AllDone")
    assert not [n for n in vars(engine.Engine) if n.startswith("_run_") and n != "_run_batch"]
