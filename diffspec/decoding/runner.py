"""Prompts in, answers out: the outer loop every method shares.

Whatever the inner loop (a masked-diffusion canvas, an AR KV cache, a
speculative draft-and-verify round), a method's caller sees the same thing:
its prompts checked and encoded the same way, decoded in batches (one prompt
at a time for the speculative AR methods, whose rows accept different numbers
of tokens), each answer cut at its first EOS, and tokens, sequences and wall
clock charged to the cost meter by one rule. Keeping that here means a prompt
that is refused by one method is refused by all, with the same words, and a
"token generated" means the same thing in every table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import torch

from ..models.tokenizer import Tokenizer
from .meter import CostMeter, answer_length, progress_bar
from .streamer import OffsetStreamer, Streamer

__all__ = ["GenerationResult", "model_device", "eos_ids", "max_positions", "encode_prompts", "cut_at_eos",
           "run_prompts"]


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # generated ids per prompt, cut before the first EOS
    texts: list[str]
    meter: CostMeter
    config: Any  # DecodeConfig, or a method's own config (anything with to_dict())
    raw_ids: list[list[int]] = field(default_factory=list, repr=False)  # everything the method produced, uncut
    stats: dict[str, Any] = field(default_factory=dict)  # method-specific counts (e.g. speculative acceptance)

    def summary(self) -> dict[str, Any]:
        out = {**self.meter.summary(), "config": self.config.to_dict()}
        if self.stats:
            out["spec"] = self.stats
        return out


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def eos_ids(model: torch.nn.Module) -> frozenset[int]:
    """Every id that ends an answer: a causal config's `eos_token_ids` (SmolLM2 and Qwen3 have
    several), else its single `eos_token_id` (an int or a list in HF configs)."""
    cfg = model.config
    ids = getattr(cfg, "eos_token_ids", None)
    if ids is None:
        eos = getattr(cfg, "eos_token_id", None)
        ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    return frozenset(ids)


def max_positions(model: torch.nn.Module) -> int:
    """How many positions the model can attend over: `max_position_embeddings` (HF causal and Dream
    configs) or LLaDA's `max_sequence_length`."""
    cfg = model.config
    for name in ("max_position_embeddings", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(f"{type(model).__name__}'s config has no max_position_embeddings / max_sequence_length")


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], gen_length: int, vocab_size: int,
                   limit: int) -> list[list[int]]:
    """Prompt ids, refusing prompts that are empty, out of the model's vocabulary, or too long to
    leave `gen_length` positions for the answer. Every prompt is checked before any decoding: a long
    eval must not die at its 400th example."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    encoded = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} must be a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"prompt {i} is empty; give some text to complete")
        ids = tokenizer.encode(p)
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens")
        if max(ids) >= vocab_size:
            raise ValueError(f"prompt {i} has token id {max(ids)} but the model embeds only {vocab_size} tokens; "
                             "the tokenizer does not belong to this model")
        encoded.append(ids)
    too_long = [(i, len(ids)) for i, ids in enumerate(encoded) if len(ids) + gen_length > limit]
    if too_long:
        i, n = max(too_long, key=lambda t: t[1])
        raise ValueError(f"prompt {i} ({n} tokens) + gen_length {gen_length} exceeds the model's "
                         f"{limit} positions (max_position_embeddings / max_sequence_length; {len(too_long)} of "
                         f"{len(encoded)} prompts do not fit); use fewer few-shot examples (--k-shot 0), a shorter "
                         "--gen-length, or a model with a longer context")
    return encoded


def cut_at_eos(ids: list[int], eos: Collection[int]) -> list[int]:
    """`ids` before the first end-of-answer id (all of them when there is none)."""
    stop = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return ids[:stop]


def run_prompts(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    decode: Callable[..., list[list[int]]],
    *,
    gen_length: int,
    batch_size: int,
    meter: CostMeter,
    desc: str,
    progress: bool = False,
    eos: Collection[int] | None = None,
    limit: int | None = None,
    cut: bool = True,
    streamer: Streamer | None = None,
) -> tuple[list[list[int]], list[str], list[list[int]]]:
    """Encode `prompts`, hand them to `decode` `batch_size` at a time (it returns each row's
    generated ids), and charge tokens, sequences and wall clock to `meter`.

    With a `streamer` (`decoding.streamer`), `decode(batch, streamer)` gets it as seen from its
    batch (row 0 is the batch's first prompt); without one, `decode(batch)`. Once the streamer
    says stop, the batches not started yet are not decoded: their rows come back empty.

    eos: the ids that end an answer (default: the model's); limit: positions available (default:
    the model's; a drafter/verifier pair passes the smaller of the two); cut: whether answers stop
    at their first EOS (an AR config's `stop_at_eos`).
    Returns (ids cut at EOS, texts, raw generated ids)."""
    eos = eos_ids(model) if eos is None else frozenset(eos)
    cfg = model.config
    vocab = getattr(cfg, "embedding_size", None) or cfg.vocab_size
    encoded = encode_prompts(tokenizer, prompts, gen_length, vocab, limit or max_positions(model))
    token_ids: list[list[int]] = []
    raw: list[list[int]] = []
    with meter.timed(model_device(model)), progress_bar(meter, len(encoded), desc, progress) as bar:
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            if streamer is not None and streamer.should_stop():
                raw += [[] for _ in batch]
                token_ids += [[] for _ in batch]
                continue
            rows = decode(batch) if streamer is None else decode(batch, OffsetStreamer(streamer, start))
            for row in rows:
                raw.append(row)
                token_ids.append(cut_at_eos(row, eos) if cut else row)
                meter.tokens_generated += answer_length(row, eos)
            meter.sequences += len(batch)
            bar.update(len(batch))
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
    return token_ids, texts, raw
