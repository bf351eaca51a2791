"""One speculative round (propose → score → accept), shared by AR speculative decoding, DFlash and D²SD.

The three methods decode an AR target one row at a time and differ only in where their drafts
come from and how their caches are laid out. A round is the same for all of them:

1. `propose`: the drafters lay out a `DraftTree` under the anchor (the last committed token,
   whose K/V the target has not computed yet): one branch for AR-spec and DFlash, D²SD's
   re-anchored branches merged into a trie; plus the acceptance walk that fits how the drafts
   were made (greedy, or sampled with their q);
2. `score`: ONE target forward over every node of the tree, logits (nodes, V);
3. the walk keeps the longest path the target agrees with and adds the target's own next
   token (the bonus); `commit` makes every cache hold the anchor and that path, nothing else.

`speculate` is the loop around it: the prefill's token first, then rounds until the budget, an
EOS or the streamer ends the row. The counters every method reports (rounds, drafted nodes,
accepted drafts) are kept here, so τ means the same thing in every table.

PSD and DualDiffusion are not built on this: their drafts are cells of a masked-diffusion
canvas checked in place (the canvas is the cache), not a token path appended to a causal K/V
cache, so there is no tree to score and no path to keep (see `speculative.core`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from torch import Tensor

from ..decoding.streamer import Streamer, commit_tail
from .tree import DraftTree

__all__ = ["Acceptance", "Proposal", "Speculator", "RoundCounters", "speculate", "chain", "through_eos"]

Acceptance = Callable[[Tensor], tuple[list[int], int]]  # the target's logits over the tree -> (path, bonus)


@dataclass
class Proposal:
    """One round's drafts: the tree (node 0 = the anchor), how to accept from the target's logits
    over its nodes, and (D²SD) which branch is which, for the stats."""

    tree: DraftTree
    accept: Acceptance
    labels: list[str] = field(default_factory=list)


class Speculator(Protocol):
    """A method's side of a round, on one row whose committed tokens it keeps."""

    def propose(self, remaining: int) -> Proposal:
        """Drafts that fit in `remaining` tokens (a round emits the drafts it keeps plus one)."""

    def score(self, proposal: Proposal) -> Tensor:
        """The target's logits (nodes, V) over the tree, in one forward over the cached prefix."""

    def commit(self, proposal: Proposal, path: list[int], new: list[int]) -> None:
        """Keep the anchor and `path` in every cache and append `new` (the emitted tokens) to the row."""


class RoundCounters(Protocol):
    rounds: int
    drafted: int
    accepted: int


def through_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    """`tokens` up to and including the first EOS (all of them when there is none)."""
    cut = next((i for i, t in enumerate(tokens) if t in eos), None)
    return tokens if cut is None else tokens[:cut + 1]


def speculate(spec: Speculator, first: int, budget: int, *, eos: frozenset[int], stop_at_eos: bool,
              stats: RoundCounters, streamer: Streamer | None = None,
              on_round: Callable[[Proposal, list[int]], Any] | None = None) -> list[int]:
    """Decode one row: `first` (the prefill's token), then rounds until `budget` tokens, an EOS
    (when `stop_at_eos`) or the streamer's stop. Returns the generated ids, EOS included.

    The streamer hears each round's emitted tokens as row 0; `on_round(proposal, path)` lets a
    method keep counters of its own (D²SD's winning branches)."""
    out = [first]
    stop = commit_tail(streamer, 0, out, 1)
    while len(out) < budget and not (stop_at_eos and out[-1] in eos) and not stop:
        proposal = spec.propose(budget - len(out))
        path, bonus = proposal.accept(spec.score(proposal))
        new = [proposal.tree.tokens[n] for n in path] + [bonus]
        if stop_at_eos:
            new = through_eos(new, eos)
        spec.commit(proposal, path, new)
        stats.rounds += 1
        stats.drafted += len(proposal.tree) - 1
        stats.accepted += len(path)
        if on_round is not None:
            on_round(proposal, path)
        out += new
        stop = commit_tail(streamer, 0, out, len(new))
    return out


def chain(anchor: int, drafts: Sequence[int]) -> DraftTree:
    """A one-branch tree: the anchor and the drafts in order (node j = draft j)."""
    return DraftTree.from_branches(anchor, [list(drafts)] if drafts else [])
