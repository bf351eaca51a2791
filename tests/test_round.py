"""The speculative round loop that AR-spec, DFlash and D²SD share (`speculative.round`), driven by
a scripted speculator whose 'target' continues 1, 2, 3, … and whose drafter is right for the
first `good` tokens of each draft."""
from __future__ import annotations

import torch

from diffspec.speculative.round import Proposal, chain, speculate, through_eos


class Counting:
    """Target: token after t is t + 1. Drafter: proposes `gamma` tokens, the first `good` right."""

    def __init__(self, gamma: int, good: int, eos_at: int | None = None):
        self.gamma, self.good, self.seq, self.commits, self.proposed = gamma, good, [0], [], []
        self.eos_at = eos_at

    def propose(self, remaining: int) -> Proposal:
        n = min(self.gamma, remaining - 1)
        self.proposed.append(remaining)
        last = self.seq[-1]
        drafts = [last + 1 + j if j < self.good else 99 for j in range(n)]
        tree = chain(last, drafts)

        def accept(logits: torch.Tensor) -> tuple[list[int], int]:
            want = logits.argmax(-1).tolist()  # the target's token after each node
            path = []
            for node in range(1, len(tree)):
                if tree.tokens[node] != want[node - 1]:
                    break
                path.append(node)
            return path, want[len(path)]
        return Proposal(tree, accept)

    def score(self, proposal: Proposal) -> torch.Tensor:
        nxt = [t + 1 for t in proposal.tree.tokens]
        return torch.nn.functional.one_hot(torch.tensor(nxt), 200).float()

    def commit(self, proposal: Proposal, path: list[int], new: list[int]) -> None:
        kept = [proposal.tree.tokens[n] for n in path]  # the path of this round's tree (cut at an EOS)
        assert kept[:len(new)] == new[:len(kept)]
        self.commits.append((list(path), list(new)))
        self.seq += new


class Stats:
    rounds = drafted = accepted = 0


def test_rounds_emit_the_accepted_drafts_and_the_bonus_within_the_budget():
    spec, stats = Counting(gamma=4, good=2), Stats()
    out = speculate(spec, 0, 10, eos=frozenset(), stop_at_eos=False, stats=stats)
    assert out == list(range(10))  # exactly the target's own continuation, no more than the budget
    assert spec.commits[0] == ([1, 2], [1, 2, 3])  # two drafts kept, the target's 3 after them
    assert spec.proposed == [9, 6, 3]  # what was left before each round; the last drafts only 2
    assert (stats.rounds, stats.drafted, stats.accepted) == (3, 4 + 4 + 2, 2 + 2 + 2)


def test_an_eos_ends_the_row_and_cuts_the_round():
    spec, stats = Counting(gamma=4, good=4), Stats()
    out = speculate(spec, 0, 50, eos=frozenset({3}), stop_at_eos=True, stats=stats)
    assert out == [0, 1, 2, 3]
    assert spec.commits == [([1, 2, 3, 4], [1, 2, 3])]  # the row gets the cut tokens; the caches the path


def test_the_streamer_hears_each_round_and_can_stop_it():
    class Stop:
        def __init__(self):
            self.heard = []

        def on_commit(self, row, positions, ids):
            self.heard.append((row, positions, ids))

        def should_stop(self):
            return len(self.heard) >= 2

    s = Stop()
    out = speculate(Counting(gamma=2, good=2), 0, 50, eos=frozenset(), stop_at_eos=False, stats=Stats(), streamer=s)
    assert out == [0, 1, 2, 3]
    assert s.heard == [(0, [0], [0]), (0, [1, 2, 3], [1, 2, 3])]


def test_on_round_hears_each_proposal_and_its_path():
    heard = []
    speculate(Counting(gamma=3, good=1), 0, 7, eos=frozenset(), stop_at_eos=False, stats=Stats(),
              on_round=lambda proposal, path: heard.append((proposal.tree.tokens, path)))
    assert heard == [([0, 1, 99, 99], [1]), ([2, 3, 99, 99], [1]), ([4, 5], [1])]  # 2 left: one draft


def test_through_eos():
    assert through_eos([5, 6, 7], frozenset({9})) == [5, 6, 7]
    assert through_eos([5, 9, 7, 9], frozenset({9})) == [5, 9]
    assert through_eos([], frozenset({9})) == []
