"""Tokenizer IO: any Hugging Face `tokenizer.json`, plus training our own BPE.

Special-token ids (mask, eos) live in the model config, not here, because a
real LLaDA or Dream checkpoint decides them; this wrapper only checks that the
ids it is handed exist in the vocabulary.
"""
from __future__ import annotations

import hashlib
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

    def id_to_token(self) -> dict[int, str]:
        """The full id -> token map, added tokens included."""
        return {i: t for t, i in self.hf.get_vocab(with_added_tokens=True).items()}

    def special_tokens(self) -> list[tuple[int, str]]:
        """(id, text) of the special added tokens (EOS, mask, chat markers...), by id."""
        return sorted((i, t.content) for i, t in self.hf.get_added_tokens_decoder().items() if t.special)

    def fingerprint(self) -> tuple[int, str]:
        """Identity for 'do these two models read and write the same ids?': the vocabulary size and a
        SHA-256 of the whole id -> token map and the special tokens. Every entry counts: two
        tokenizers of one size that swap two ids decode each other's output into garbage.
        Remembered per object (hashing 49 k entries takes ~0.1 s, and every speculative run checks its
        drafter's tokenizer): loaded ids never move, an added token changes the size, and the
        special tokens (a few dozen, read every call) are part of the key."""
        key = (self.vocab_size, repr(self.special_tokens()))
        memo = self.__dict__.get("_fingerprint")
        if memo is not None and memo[0] == key:
            return memo[1]
        h = hashlib.sha256()
        for i, tok in sorted(self.id_to_token().items()):
            h.update(f"{i}\t{tok}\n".encode("utf-8", "surrogatepass"))
        h.update(key[1].encode("utf-8", "surrogatepass"))
        self._fingerprint = (key, (key[0], h.hexdigest()))
        return self._fingerprint[1]


def vocab_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """None when `a` and `b` have the same fingerprint, else their first difference in words
    (for error messages that say what to fix, not just that something differs)."""
    if a.fingerprint() == b.fingerprint():
        return None
    va, vb = a.id_to_token(), b.id_to_token()
    if len(va) != len(vb):
        return f"{len(va)} tokens against {len(vb)}"
    for i in sorted(set(va) | set(vb)):
        if va.get(i) != vb.get(i):
            return f"id {i} is {va.get(i)!r} in one and {vb.get(i)!r} in the other"
    return f"special tokens differ: {a.special_tokens()} against {b.special_tokens()}"


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, a_name: str, b_name: str) -> None:
    """ValueError unless `a` and `b` map every id to the same token (see `Tokenizer.fingerprint`)."""
    diff = vocab_difference(a, b)
    if diff is not None:
        raise ValueError(f"{a_name} and {b_name} use different tokenizers ({diff}); models that exchange "
                         "token ids must share one tokenizer (train them with tokenizer_from)")


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
