"""One choice's text as a decoder finalises it: append-only deltas, stop strings, whole characters.

A decoder hands `TextStream.update` the *final* prefix of a row's answer, i.e. the
token ids that will never change again (for a masked diffusion model: every cell
up to the first still-masked one; for an AR model: the tokens accepted so far).
The stream turns that into text deltas a client can append:

- the answer ends at its first EOS (the canvas after it is padding), exactly as
  `diffspec.api.generate` cuts it, so the concatenated deltas equal its text;
- a stop string ends the answer before it: no text at or past a stop string is
  ever sent, even when the stop string straddles two updates, because a tail
  that could be the start of a stop string is held back until it is decided;
- a character is never split: trailing U+FFFD (an incomplete UTF-8 sequence
  decoded from a byte-level prefix) is held back until its last byte arrives;
- text already sent is never contradicted: an update whose text does not extend
  what was sent waits for a later one (and the final text always agrees for the
  byte-level and SentencePiece-style decoders diffspec's tokenizers use).

`completion_tokens` is the one definition of "tokens generated" that the server's
usage, its cost meter and its /health counters all use: the answer's tokens
through its first EOS, the EOS included (it was generated: `decoding.meter.
answer_length`, which every library meter counts, includes it too), or through
the end of the stop string that ended the answer.
"""
from __future__ import annotations

from typing import Callable, Collection, Sequence

REPLACEMENT = "\ufffd"


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string in `text` (the longest one at a tie), or None."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and i + len(s) > best[1])):
            best = (i, i + len(s))
    return best


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class TextStream:
    """The text of one choice, sent append-only as its token ids become final."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = (),
                 eos_ids: Collection[int] = ()):
        self.decode, self.stops, self.eos_ids = decode, tuple(s for s in stops if s), frozenset(eos_ids)
        self.sent = ""
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
        self.completion_tokens = 0  # set when finished: through the first EOS (included) or stop string
        self.hit_eos = False
        self.mismatch = False  # the final text did not extend what was sent (never seen with our tokenizers)
        self._last: tuple[int, bool] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, ids: Sequence[int], complete: bool = False, text: str | None = None) -> str:
        """Take the final prefix `ids` of the answer; return the text to send now ('' for none).

        complete: the decoder will give this row nothing more (its canvas is full, or it
        stopped); `text`: the decoder's own final text for `ids` (used when complete, so
        the result is character for character the library's)."""
        if self.finished:
            return ""
        ids = list(ids)
        key = (len(ids), complete)
        if key == self._last and text is None:
            return ""  # nothing new became final
        self._last = key
        eos_at = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        if eos_at is not None:
            ids, complete, reason = ids[:eos_at], True, "stop"
            self.hit_eos = True
        else:
            reason = "length" if complete else None
        full = text if (complete and text is not None) else self.decode(ids)
        if not complete:
            full = full.rstrip(REPLACEMENT)
        n_tokens = len(ids) + int(eos_at is not None)  # the EOS was generated: it counts (answer_length)
        hit = first_stop(full, self.stops)
        if hit is not None:
            full, complete, reason = full[: hit[0]], True, "stop"
            n_tokens = self._tokens_through(ids, hit[1])
        elif not complete:
            full = full[: len(full) - stop_prefix_len(full, self.stops)]
        if full.startswith(self.sent):
            delta = full[len(self.sent):]
        else:  # an earlier character changed: never contradict what was sent
            delta = ""
            if complete:
                self.mismatch = True
        self.sent += delta
        if complete:
            self.finish_reason = reason
            self.completion_tokens = n_tokens
        return delta

    def _tokens_through(self, ids: list[int], end: int) -> int:
        """The fewest leading ids whose text reaches character `end` (where a stop string ends)."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.decode(ids[:mid]).rstrip(REPLACEMENT)) >= end:
                hi = mid
            else:
                lo = mid + 1
        return lo
