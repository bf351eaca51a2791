"""The bundled AR target and its three drafters, on real `arith` prompts.

The tiny random models of test_d2sd.py exercise the algorithms' corner
cases; these check what a user gets from the committed checkpoints: the
drafters fit the target, and every speculative method reproduces AR greedy
token for token on 50 test problems while actually accepting drafts.
"""
from __future__ import annotations

import pytest

from diffspec.api import generate, load_any
from diffspec.models.checkpoint import DEFAULT_MODEL_DIR, load_tokenizer
from diffspec.models.dflash import load_dflash
from diffspec.speculative.armethods import DEFAULT_DRAFTERS, DEFAULT_TARGET, DEFAULT_VP
from diffspec.tasks import load_examples

BUNDLED = [DEFAULT_TARGET, DEFAULT_VP, *DEFAULT_DRAFTERS.values()]
pytestmark = pytest.mark.skipif(not all((p / "config.json").is_file() for p in BUNDLED),
                                reason="bundled AR target / drafters not trained yet")


@pytest.fixture(scope="module")
def bundled():
    target, tok = load_any(DEFAULT_TARGET)
    return target, tok


def test_bundled_ar_checkpoints_share_the_tokenizer_and_fit_the_target(bundled):
    target, tok = bundled
    assert tok.fingerprint() == load_tokenizer(DEFAULT_MODEL_DIR).fingerprint()
    _, small_tok = load_any(DEFAULT_DRAFTERS["ar-spec"])
    assert small_tok.fingerprint() == tok.fingerprint()
    for path in (DEFAULT_DRAFTERS["dflash"], DEFAULT_VP):
        d = load_dflash(path, target)  # raises on a hidden-size / vocab / layer mismatch
        assert d.config.vocab_size == target.config.vocab_size


@pytest.mark.parametrize("method, options", [
    ("ar-spec", {"gamma": 4}),
    ("dflash", {}),
    ("d2sd", {}),
    ("d2sd", {"k": 2, "gamma2": 24}),
])
def test_bundled_speculative_methods_equal_ar_greedy_on_50_arith_prompts(bundled, method, options):
    target, tok = bundled
    prompts = [e.prompt for e in load_examples("arith", limit=50)]
    greedy = generate(prompts, model=target, tokenizer=tok, method="ar", gen_length=48)
    res = generate(prompts, model=target, tokenizer=tok, method=method, gen_length=48, **options)
    assert res.token_ids == greedy.token_ids
    assert res.stats["accepted"] > 0 and res.meter.tokens_per_forward > 1.5  # the drafts really are used
