"""Every method's defaults work: a user who types only `--method X` gets that method's good
configuration, not a variant that collapses (as DualDiffusion's paper view did: 0 % here).

Measured against the family's plain decoder on the same problems, so the test follows the bundled
model rather than numbers copied from a benchmark table.
"""
from __future__ import annotations

import pytest

from diffspec.api import generate
from diffspec.methods import get_method, method_names
from diffspec.speculative.armethods import DEFAULT_TARGET
from diffspec.tasks import load_examples, score

N = 16
MARGIN = 0.25  # at most this far below the family's plain decoder (a collapse is 0.5-0.8 below)


@pytest.fixture(scope="module")
def examples():
    return load_examples("arith", limit=N)


def accuracy(examples, method: str) -> float:
    ar = get_method(method).family == "ar"
    res = generate([e.prompt for e in examples], method=method, model=DEFAULT_TARGET if ar else None)
    return sum(score(e, t)["correct"] for e, t in zip(examples, res.texts)) / len(examples)


@pytest.fixture(scope="module")
def plain(examples):
    return {"diffusion": accuracy(examples, "vanilla"), "ar": accuracy(examples, "ar")}


@pytest.mark.parametrize("method", [m for m in method_names() if m not in ("vanilla", "ar", "dream")])
def test_default_options_are_not_far_below_the_plain_decoder(examples, plain, method):
    base = plain[get_method(method).family]
    assert base >= 0.5, "the bundled model should solve most of these problems"
    assert accuracy(examples, method) >= base - MARGIN
