"""A drafter's draft vocabulary: the target ids its LM head may propose.

With a 49k vocabulary the LM head is most of a small drafter's cost (SmolLM2's
tied head is 28 M weights; a two-layer AR drafter has 5 M of its own, a DFlash
window spends about 83 % of its FLOPs there). EAGLE-3 and DFlash keep only the
target's most frequent output tokens: the head multiplies those rows, and every
other id gets logit −inf, so the drafter never proposes it. The target still
verifies over its whole vocabulary, so greedy output stays AR greedy's, and a
sampled draft's probability is the one the drafter really used (exact rejection
sampling). One module for every drafter family (`DFlashDrafter`, and the causal
`TransformerLM` used as an AR drafter), so the file format, the checks and the
gathered head are one implementation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .matmul import linear

__all__ = ["DRAFT_VOCAB_FILE", "ascending", "check_draft_vocab", "compact_logits", "draft_logits", "read_draft_vocab",
           "write_draft_vocab"]

DRAFT_VOCAB_FILE = "draft_vocab.json"  # beside a drafter's weights: {"ids": [...]}, most frequent first


def check_draft_vocab(ids: Any, vocab_size: int, device: torch.device) -> Tensor:
    """`ids` as a long tensor on `device`, refused unless they are distinct ids of the vocabulary."""
    t = torch.as_tensor(ids, dtype=torch.long, device=device).flatten().clone()  # the caller's list stays theirs
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= vocab_size:
        raise ValueError(f"a draft vocabulary needs ids in 0..{vocab_size - 1}; got {t.numel()} ids "
                         f"from {int(t.min()) if t.numel() else None} to {int(t.max()) if t.numel() else None}")
    if len(set(t.tolist())) != t.numel():
        raise ValueError("the draft vocabulary repeats ids")
    return t


def _gathered_head(owner: nn.Module, head: Tensor, ids: Tensor, slot: str = "") -> Tensor:
    """The head's draft-vocabulary rows, gathered once per (head, vocabulary, weights) rather than a
    Vd × H copy on every call; kept in `owner`'s __dict__ so it is not a buffer or a parameter. The
    entry holds the `ids` tensor itself (compared by identity): a freed vocabulary's address reused
    by a new one cannot hit it. `slot` keeps a second gathering (another order of the ids) apart."""
    key = (head.data_ptr(), head._version, head.dtype, head.device)
    cached = owner.__dict__.get("_draft_head_cache" + slot)
    if cached is None or cached[0] != key or cached[1] is not ids or torch.is_grad_enabled():
        # Made outside inference mode even when called inside it: an inference tensor has no
        # version counter, so `matmul.linear` would refuse it its packed (oneDNN) copy and run the
        # BLAS's slow path for a few rows (benchmarks/round-profile-cpu: 2.7 ms of a 7.8 ms DFlash
        # call on SmolLM2, for a product the packed kernel does in a fraction of that).
        with torch.inference_mode(False):
            rows = head[ids.clone() if ids.is_inference() else ids]
        cached = (key, ids, rows)
        owner.__dict__["_draft_head_cache" + slot] = cached
    return cached[2]


def _on_head_device(owner: nn.Module, head: Tensor, ids: Tensor) -> Tensor:
    """`ids` on the head's device: the module was moved after set_draft_vocab, so follow it, once."""
    if ids.device != head.device:
        ids = ids.to(head.device)
        owner.draft_vocab = ids
    return ids


def draft_logits(owner: nn.Module, h: Tensor, head: Tensor, ids: Tensor, full: bool = True) -> Tensor:
    """Logits of the normed hidden states `h` over the draft vocabulary `ids` only: (..., V) with −inf
    outside it, or (..., Vd) in draft-vocabulary order when not `full`."""
    ids = _on_head_device(owner, head, ids)
    small = linear(h, _gathered_head(owner, head, ids))
    if not full:
        return small
    out = small.new_full((*small.shape[:-1], head.shape[0]), float("-inf"))
    return out.index_copy_(-1, ids, small)


def ascending(owner: nn.Module, ids: Tensor) -> Tensor:
    """The draft vocabulary `ids` in ascending id order, made once per vocabulary (kept in `owner`'s
    __dict__ beside the vocabulary it sorts)."""
    cached = owner.__dict__.get("_draft_vocab_ascending")
    if cached is None or cached[0] is not ids:
        cached = (ids, ids.sort().values)
        owner.__dict__["_draft_vocab_ascending"] = cached
    return cached[1]


def compact_logits(owner: nn.Module, h: Tensor, head: Tensor, ids: Tensor) -> Tensor:
    """Logits of `h` over the draft vocabulary only, (..., Vd), its columns in ascending id order
    (`ascending`). For a caller that only takes an argmax or a softmax of the proposals: the −inf
    columns of the full (..., V) form cost a 49 k-wide fill and reduction per cell on SmolLM2
    (0.5 ms of a 4.8 ms DFlash call, benchmarks/round-profile-cpu), and in id order an argmax breaks
    a tie as it would over the whole vocabulary (the lowest id), so the drafts are the same."""
    sorted_ids = ascending(owner, _on_head_device(owner, head, ids))
    return linear(h, _gathered_head(owner, head, sorted_ids, slot="_ascending"))


def read_draft_vocab(file: Path, vocab_size: int | None = None) -> list[int]:
    """The ids of a drafter's `draft_vocab.json` ({"ids": [...]}), checked to be a list of distinct ints
    (in 0..vocab_size − 1 when given), or a CheckpointError naming the file."""
    from .checkpoint import CheckpointError  # checkpoint imports the models, which import this module

    try:
        ids = json.loads(Path(file).read_text())["ids"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file} is not a draft vocabulary ({{\"ids\": [...]}}): {e}") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{file}: 'ids' must be a list of token ids")
    if vocab_size is not None:
        try:
            check_draft_vocab(ids, vocab_size, torch.device("cpu"))
        except ValueError as e:
            raise CheckpointError(f"{file}: {e}; rewrite it with `diffspec draft-vocab`") from None
    return ids


def write_draft_vocab(drafter_dir: str | Path, counts: dict[int, int], size: int, always: Any = ()) -> list[int]:
    """Write the `size` most frequent ids of `counts` (plus `always`, e.g. the EOS ids) as the drafter's
    draft vocabulary; returns them, most frequent first."""
    if size < 1:
        raise ValueError(f"a draft vocabulary needs size >= 1, got {size}")
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    ids = list(dict.fromkeys([*ranked[:size], *always]))
    Path(drafter_dir, DRAFT_VOCAB_FILE).write_text(json.dumps({"ids": ids}) + "\n")
    return ids
