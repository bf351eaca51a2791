"""Tokenizer IO: any Hugging Face `tokenizer.json`, plus training our own BPE.

Special-token ids (mask, eos) live in the model config, not here, because a
real LLaDA or Dream checkpoint decides them; this wrapper only checks that the
ids it is handed exist in the vocabulary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

MASK_TOKEN = "<|mdm_mask|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, MASK_TOKEN, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the few calls decoders need."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path} (expected a Hugging Face tokenizer.json)")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises bare Exceptions on bad JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def fingerprint(self) -> tuple[int, tuple[tuple[str, int], ...]]:
        """A cheap identity for 'do these two models share a tokenizer?' checks."""
        vocab = self.hf.get_vocab(with_added_tokens=True)
        sample = tuple(sorted(vocab.items(), key=lambda kv: kv[1])[:: max(1, len(vocab) // 64)])
        return len(vocab), sample


def train_bpe(texts: Iterable[str], vocab_size: int = 512, special_tokens: list[str] | None = None) -> Tokenizer:
    """Byte-level BPE with one token per digit.

    Digits are split before BPE so numbers are spelled digit by digit: a tiny
    model learns column arithmetic far more easily than arithmetic on
    arbitrary multi-digit merges.
    """
    specials = list(special_tokens or SPECIAL_TOKENS)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
