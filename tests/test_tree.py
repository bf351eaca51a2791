"""Draft-tree pieces of D²SD on hand-built inputs: posterior, top-K, trie, tree mask, acceptance walk."""
from __future__ import annotations

import pytest
import torch

from diffspec.spec.tree import DraftTree, rejection_posterior, top_prefix_lengths


def test_rejection_posterior_matches_the_formula_and_sums_to_one():
    c = torch.tensor([0.9, 0.5, 0.8], dtype=torch.float64)
    r = rejection_posterior(c)
    expected = [1 - 0.9, 0.9 * (1 - 0.5), 0.9 * 0.5 * (1 - 0.8), 0.9 * 0.5 * 0.8]
    assert torch.allclose(r, torch.tensor(expected, dtype=torch.float64))
    batch = rejection_posterior(torch.rand(4, 16, dtype=torch.float64))
    assert batch.shape == (4, 17) and torch.allclose(batch.sum(-1), torch.ones(4, dtype=torch.float64))


def test_rejection_posterior_rejects_non_probabilities():
    with pytest.raises(ValueError, match="probabilities"):
        rejection_posterior(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="at least one"):
        rejection_posterior(torch.zeros(0))


def test_top_prefix_lengths_most_likely_first_ties_to_shorter():
    r = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.1]])
    assert top_prefix_lengths(r, 3) == [[1, 2, 3]]
    assert top_prefix_lengths(r, 10) == [[1, 2, 3, 0, 4]]
    with pytest.raises(ValueError, match="K must be >= 1"):
        top_prefix_lengths(r, 0)


def test_trie_merges_shared_prefixes():
    t = DraftTree.from_branches(7, [[1, 2, 3], [1, 2, 4], [5], [1, 2, 3]])
    assert t.tokens == [7, 1, 2, 3, 4, 5]
    assert t.parent == [-1, 0, 1, 2, 2, 0]
    assert t.depth == [0, 1, 2, 3, 3, 1]
    assert t.positions(10).tolist() == [10, 11, 12, 13, 13, 11]


def test_tree_mask_is_causal_per_branch_and_sees_the_cache():
    t = DraftTree.from_branches(7, [[1, 2], [5]])
    m = t.attention_mask(n_cached=2)
    assert m.shape == (4, 6)
    assert m[:, :2].all()  # committed prefix
    tree = m[:, 2:].int().tolist()
    assert tree == [[1, 0, 0, 0],   # anchor
                    [1, 1, 0, 0],   # 1
                    [1, 1, 1, 0],   # 1 -> 2
                    [1, 0, 0, 1]]   # 5 does not see the other branch


def test_acceptance_walk_follows_the_targets_greedy_tokens():
    t = DraftTree.from_branches(7, [[1, 2, 3], [1, 2, 4], [5]])
    # nodes: 0:7 1:1 2:2 3:3 4:4 5:5 ; target predicts 1 after 7, 2 after 1, 4 after 2, 9 after 4
    pred = [1, 2, 4, 0, 9, 0]
    path, bonus = t.accept(pred)
    assert path == [1, 2, 4] and bonus == 9
    path, bonus = t.accept([6, 0, 0, 0, 0, 0])  # first token rejected: only the bonus
    assert path == [] and bonus == 6
