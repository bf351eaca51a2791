"""Draft-tree pieces of D²SD on hand-built inputs: posterior, top-K, trie, tree mask, acceptance walk."""
from __future__ import annotations

import itertools

import pytest
import torch

from diffspec.speculative.tree import DraftTree, rejection_posterior, top_prefix_lengths


def test_rejection_posterior_is_over_true_boundaries_only():
    c = torch.tensor([0.9, 0.5, 0.8], dtype=torch.float64)
    r = rejection_posterior(c)
    expected = [1 - 0.9, 0.9 * (1 - 0.5), 0.9 * 0.5 * (1 - 0.8)]  # boundaries 0..γ−1; no "all accepted" entry
    assert torch.allclose(r, torch.tensor(expected, dtype=torch.float64))
    conf = torch.rand(4, 16, dtype=torch.float64)
    batch = rejection_posterior(conf)
    assert batch.shape == (4, 16)
    assert torch.allclose(batch.sum(-1) + conf.prod(-1), torch.ones(4, dtype=torch.float64))  # + P(all accepted)


def test_rejection_posterior_rejects_non_probabilities():
    with pytest.raises(ValueError, match="probabilities"):
        rejection_posterior(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="at least one"):
        rejection_posterior(torch.zeros(0))


def test_top_boundaries_most_likely_first_ties_to_shorter():
    r = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.1]])
    assert top_prefix_lengths(r, 3) == [[1, 2, 3]]
    assert top_prefix_lengths(r, 5) == [[1, 2, 3, 0, 4]]
    assert top_prefix_lengths(torch.full((1, 4), 0.25), 2) == [[0, 1]]  # all tied: the shortest prefixes


@pytest.mark.parametrize("seed", range(5))
def test_k1_anchors_exactly_the_argmax_boundary(seed):
    conf = torch.rand(3, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = rejection_posterior(conf)
    top = top_prefix_lengths(r, 1)
    assert [len(t) for t in top] == [1, 1, 1]
    assert [t[0] for t in top] == r.argmax(-1).tolist()
    top3 = top_prefix_lengths(r, 3)
    for row, t in zip(r, top3):  # the k most likely, in order
        assert row[t].tolist() == sorted(row.tolist(), reverse=True)[:3]


def test_k_larger_than_the_boundaries_is_clipped():
    r = rejection_posterior(torch.tensor([0.6, 0.9]))  # two drafts: boundaries 0 and 1 only
    assert top_prefix_lengths(r[None], 4) == [[0, 1]]  # each boundary once, never the all-accepted "2"
    assert top_prefix_lengths(rejection_posterior(torch.tensor([0.3]))[None], 8) == [[0]]


def test_all_accepted_is_never_anchored():
    """Confident drafts: "all accepted" (0.97) dwarfs every boundary, but it is not a K slot."""
    conf = torch.tensor([0.99, 0.99, 0.99])
    assert top_prefix_lengths(rejection_posterior(conf)[None], 1) == [[0]]
    assert top_prefix_lengths(rejection_posterior(conf)[None], 3) == [[0, 1, 2]]


@pytest.mark.parametrize("k", [0, -1, True, 1.5])
def test_k_must_be_a_positive_int(k):
    with pytest.raises(ValueError, match="k .*must be an int >= 1"):
        top_prefix_lengths(torch.tensor([[0.5, 0.5]]), k)


def test_trie_merges_shared_prefixes():
    t = DraftTree.from_branches(7, [[1, 2, 3], [1, 2, 4], [5], [1, 2, 3]])
    assert t.tokens == [7, 1, 2, 3, 4, 5]
    assert t.branch_nodes == [[1, 2, 3], [1, 2, 4], [5], [1, 2, 3]]
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


def test_branch_of_credits_the_first_branch_containing_the_path():
    t = DraftTree.from_branches(7, [[1, 2, 3], [1, 2, 4], [5]])
    assert t.branch_of([1, 2]) == 0  # shared prefix: the earlier branch
    assert t.branch_of([1, 2, 4]) == 1 and t.branch_of([5]) == 2
    assert t.branch_of([]) is None


def test_walk_asks_only_along_the_path():
    t = DraftTree.from_branches(7, [[1, 2, 3], [1, 2, 4], [5]])
    asked = []

    def next_token(node: int) -> int:
        asked.append(node)
        return {0: 5, 5: 8}[node]

    assert t.walk(next_token) == ([5], 8)
    assert asked == [0, 5]


def test_walk_emits_exactly_the_draws_at_their_prefixes():
    """Why a sampled walk is exact: every emitted token is the draw made at the node whose
    prefix is the emitted prefix, so P(output) = Π p(x_t | x_<t) whatever the tree."""
    t = DraftTree.from_branches(0, [[1, 2], [2], [3, 1], [1, 3]])
    prefix = {n: [] for n in range(len(t))}
    for n in range(1, len(t)):
        prefix[n] = prefix[t.parent[n]] + [t.tokens[n]]
    for script in itertools.product(range(4), repeat=3):
        drawn, seen = [], []

        def next_token(node: int) -> int:
            seen.append(prefix[node])
            drawn.append(script[len(drawn)])
            return drawn[-1]

        path, bonus = t.walk(next_token)
        emitted = [t.tokens[n] for n in path] + [bonus]
        assert emitted == drawn
        assert seen == [emitted[:i] for i in range(len(emitted))]


def test_one_hot_recursive_rejection_is_one_draw_from_p():
    """The identity `DraftTree.walk` rests on: try children c_1, c_2 with q = one-hot (accept with
    prob. residual(c), else zero c and renormalize), then draw from the rest; P(x) = p(x)."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    for children in ([2], [2, 0], [3, 1, 0], [0, 1, 2, 3]):
        out, residual, reach = torch.zeros(4, dtype=torch.float64), p.clone(), 1.0
        for c in children:
            accept = min(1.0, float(residual[c]) / 1.0)  # q(c) = 1
            out[c] += reach * accept
            reach *= 1 - accept
            residual = (residual - torch.nn.functional.one_hot(torch.tensor(c), 4)).clamp_min(0)
            residual = residual / residual.sum() if residual.sum() > 0 else residual
        out += reach * residual
        assert torch.allclose(out, p)


def test_masks_and_positions_have_their_dtype_and_device():
    """Bool masks and long positions, made on the requested device ("meta": PyTorch's data-free
    device, a stand-in for CUDA that runs on any machine) and on the CPU by default."""
    t = DraftTree.from_branches(7, [[1, 2], [5]])
    default = t.ancestors_mask()
    assert default.dtype == torch.bool and default.device.type == "cpu"
    assert default.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    assert t.attention_mask(2).dtype == torch.bool and t.attention_mask(0).shape == (4, 4)
    for m in (t.ancestors_mask("meta"), t.attention_mask(3, device="meta")):
        assert m.device.type == "meta" and m.dtype == torch.bool
    assert t.attention_mask(3, device="meta").shape == (4, 7)
    pos = t.positions(5, device="meta")
    assert pos.device.type == "meta" and pos.dtype == torch.long
    assert t.positions(5).dtype == torch.long and t.positions(0).tolist() == [0, 1, 2, 1]


def test_rejection_posterior_errors_are_exact():
    with pytest.raises(ValueError, match=r"^need at least one drafted token$"):
        rejection_posterior(torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"^confidences must be probabilities in \[0, 1\]$"):
        rejection_posterior(torch.tensor([0.5, -0.1]))
    assert rejection_posterior(torch.tensor([0.0, 1.0])).tolist() == [1.0, 0.0]  # the edges are probabilities
    assert rejection_posterior(torch.tensor([1.0, 1.0])).tolist() == [0.0, 0.0]


def test_top_boundaries_of_one_row_and_of_long_tied_rows():
    """A 1-D posterior (one block) works like a row; ties stay ordered by prefix length even in rows of
    17+ boundaries, where torch's unstable sort would reorder equal keys."""
    r = rejection_posterior(torch.tensor([0.9, 0.5, 0.8]))
    assert top_prefix_lengths(r, 2) == [1, 0] and top_prefix_lengths(r, 9) == [1, 0, 2]
    flat = torch.full((2, 24), 0.01)
    flat[1, 20] = 0.5
    assert top_prefix_lengths(flat, 3) == [[0, 1, 2], [20, 0, 1]]
    batch = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(0))  # (..., n) with two leading dims
    assert top_prefix_lengths(batch, 5) == batch.argsort(dim=-1, descending=True, stable=True).tolist()


def test_branch_of_a_path_no_branch_contains_is_none():
    t = DraftTree.from_branches(7, [[1, 2, 3], [5]])
    assert t.branch_of([5, 1]) is None and t.branch_of([2]) is None
