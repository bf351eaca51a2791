"""Shared fixtures: a BPE tokenizer trained on a few arith texts and tiny random LLaDA models.

Everything here is CPU-only, seeded and takes well under a second to build.
Session-scoped objects are shared between tests, so tests must not modify them
(copy a model with `copy.deepcopy` before changing its weights).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from diffspec.models.checkpoint import save_model
from diffspec.models.llada import LLaDAConfig, LLaDAModel
from diffspec.models.tokenizer import EOS_TOKEN, MASK_TOKEN, Tokenizer, train_bpe
from diffspec.tasks import arith

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY = dict(
    d_model=64,
    n_heads=4,
    n_kv_heads=4,
    n_layers=2,
    mlp_hidden_size=128,
    vocab_size=300,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_sequence_length=128,
)


@pytest.fixture(scope="session")
def arith_texts() -> list[str]:
    return [f"Question: {p.question}\nAnswer: {p.answer}" for p in arith.generate("train", 200, seed=1)]


@pytest.fixture(scope="session")
def tokenizer(arith_texts: list[str]) -> Tokenizer:
    return train_bpe(arith_texts, vocab_size=300)


@pytest.fixture(scope="session")
def make_config(tokenizer: Tokenizer) -> Callable[..., LLaDAConfig]:
    """Tiny LLaDA config; keyword arguments override the defaults in TINY."""

    def make(**overrides) -> LLaDAConfig:
        kw = {
            **TINY,
            "mask_token_id": tokenizer.token_to_id(MASK_TOKEN),
            "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
            **overrides,
        }
        return LLaDAConfig(**kw)

    return make


@pytest.fixture(scope="session")
def make_model(make_config) -> Callable[..., LLaDAModel]:
    """A seeded tiny random LLaDA model in eval mode."""

    def make(seed: int = 0, **overrides) -> LLaDAModel:
        torch.manual_seed(seed)
        return LLaDAModel(make_config(**overrides)).eval()

    return make


@pytest.fixture(scope="session")
def tiny_model(make_model) -> LLaDAModel:
    return make_model(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tokenizer) -> Path:
    """The tiny model saved in LLaDA / Hugging Face layout (read-only for tests)."""
    return save_model(tiny_model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny")


# One thread: the tests' models are tiny, and on a shared 2-core machine torch's default two
# threads made them 10-15x slower (thread hand-offs cost more than the matmuls).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
