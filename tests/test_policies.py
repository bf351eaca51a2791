"""Unmasking policies on hand-built confidences: exact selections, ties, edges, rows without candidates."""
from __future__ import annotations

import math

import pytest
import torch

from diffspec.decoding.policies import (num_transfer_tokens, select_factor, select_local, select_threshold,
                                        select_topk)

NEG = -math.inf


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def cols(sel: torch.Tensor) -> list[list[int]]:
    return [r.nonzero().flatten().tolist() for r in sel]


# ---------------------------------------------------------------- schedule

@pytest.mark.parametrize("n, steps, expected", [(8, 3, [3, 3, 2]), (7, 7, [1] * 7), (2, 4, [1, 1, 0, 0]),
                                                (0, 2, [0, 0]), (10, 1, [10])])
def test_num_transfer_tokens(n, steps, expected):
    assert num_transfer_tokens(n, steps) == expected


# ---------------------------------------------------------------- top-k

def test_topk_picks_the_k_most_confident_per_row():
    conf = t([0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.6, 0.4])
    assert cols(select_topk(conf, 2)) == [[1, 3], [0, 2]]
    assert cols(select_topk(conf, 0)) == [[], []]
    assert cols(select_topk(conf, 4)) == [[0, 1, 2, 3]] * 2


def test_topk_takes_a_k_per_row():
    conf = t([0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.6, 0.4], [0.3, 0.1, 0.2, 0.4])
    assert cols(select_topk(conf, torch.tensor([1, 3, 0]))) == [[1], [0, 2, 3], []]


def test_topk_never_selects_a_non_candidate():
    conf = t([NEG, 0.2, NEG, 0.1], [NEG] * 4)
    assert cols(select_topk(conf, 3)) == [[1, 3], []]  # fewer candidates than k: all of them, nothing else


def test_topk_ties_go_to_the_lower_column_even_in_long_rows():
    """torch's unstable sort reorders equal keys from 17 elements on; the policy must not."""
    conf = torch.full((2, 40), 0.5, dtype=torch.float64)
    conf[1, 7] = 0.9
    assert cols(select_topk(conf, 5)) == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 7]]
    conf = torch.tensor([[0.5, 0.25] * 20], dtype=torch.float64)
    assert cols(select_topk(conf, 22)) == [sorted(list(range(0, 40, 2)) + [1, 3])]


# ---------------------------------------------------------------- threshold

def test_threshold_selects_at_and_above_tau_and_at_least_the_best():
    conf = t([0.5, 0.9, 0.95, 0.89], [0.3, 0.6, NEG, 0.6], [NEG, NEG, NEG, NEG])
    assert cols(select_threshold(conf, 0.9)) == [[1, 2], [1], []]  # 0.9 itself passes; row 1: only the best
    assert cols(select_threshold(conf, 1.0)) == [[2], [1], []]


# ---------------------------------------------------------------- factor

def test_factor_rule_by_hand():
    """Commit the top n while (n + 1)(1 - c_n) < factor (c_n the n-th best), at least one.
    Row 0 sorted: 0.9, 0.8, 0.7, 0.2: 2·0.1 = 0.2 < 1, 3·0.2 = 0.6 < 1, 4·0.3 = 1.2 -> 2 cells.
    Row 1: 2·0.5 = 1.0, not < 1 -> only the best.  Row 2: a -inf cell ends the run."""
    conf = t([0.7, 0.9, 0.2, 0.8], [0.5, 0.1, 0.05, 0.01], [0.99, NEG, 0.98, 0.97])
    assert cols(select_factor(conf, 1.0)) == [[1, 3], [0], [0, 2, 3]]
    assert cols(select_factor(conf, 1.2000001)) == [[0, 1, 3], [0], [0, 2, 3]]
    assert cols(select_factor(conf, 0.1)) == [[1], [0], [0, 2]]  # 2·0.01 = 0.02 < 0.1, 3·0.02 = 0.06 < 0.1
    assert cols(select_factor(t([NEG, NEG]), 1.0)) == [[]]


def test_factor_rule_is_strict_at_equality():
    """Sorted 0.875, 0.75, 0.1 with factor 0.75: 2·0.125 = 0.25 passes, 3·0.25 = 0.75 equals the
    factor (exactly, in binary) and fails: one cell, not two."""
    assert cols(select_factor(t([0.75, 0.1, 0.875]), 0.75)) == [[2]]
    assert cols(select_factor(t([0.75, 0.1, 0.875]), 0.7500001)) == [[0, 2]]


def test_factor_is_order_free_and_at_least_one():
    """The rule reads the sorted confidences, wherever the cells sit: sorted 0.95, 0.9, 0.6, 0.1 with
    factor 0.5: 2·0.05 = 0.1, 3·0.1 = 0.3 pass, 4·0.4 = 1.6 fails -> the two best cells."""
    assert cols(select_factor(t([0.95, 0.6, 0.9, 0.1]), 0.5)) == [[0, 2]]
    assert cols(select_factor(t([0.6, 0.1, 0.95, 0.9]), 0.5)) == [[2, 3]]
    assert cols(select_factor(t([0.3, 0.2]), 0.01)) == [[0]]  # nothing passes: the best alone


# ---------------------------------------------------------------- local

def test_local_anchor_neighbours_and_the_relaxed_bar():
    conf = t([0.95, 0.7, 0.69, 0.8, NEG, 0.75, 0.92, 0.75])
    # anchors 0 and 6 (>= 0.9); neighbours within 1: 1 (0.7 >= 0.7 passes), 5 and 7 (0.75); 3 is not next to one
    assert cols(select_local(conf, 0.9, 0.7, 1)) == [[0, 1, 5, 6, 7]]
    # radius 2 reaches 2 (0.69 < 0.7: no) and 4 (not a candidate)
    assert cols(select_local(conf, 0.9, 0.7, 2)) == [[0, 1, 5, 6, 7]]
    # radius 3 reaches 3 from 0 and 6
    assert cols(select_local(conf, 0.9, 0.7, 3)) == [[0, 1, 3, 5, 6, 7]]
    assert cols(select_local(conf, 0.9, 0.69, 2)) == [[0, 1, 2, 5, 6, 7]]


def test_local_without_an_anchor_commits_only_the_best():
    conf = t([0.5, 0.85, 0.8, NEG], [NEG, NEG, NEG, NEG])
    assert cols(select_local(conf, 0.9, 0.7, 1)) == [[1], []]
    assert cols(select_local(conf, 0.85, 0.7, 1)) == [[1, 2], []]  # 0.85 = τ is an anchor, 0.8 its neighbour


def test_local_never_selects_a_non_candidate_next_to_an_anchor():
    conf = t([NEG, 0.95, NEG])
    assert cols(select_local(conf, 0.9, 0.0001, 1)) == [[1]]


def test_every_policy_stays_on_the_device_of_its_input():
    """Index tensors are made on `conf.device`: on PyTorch's data-free "meta" device (a stand-in for
    CUDA that runs on any machine) a CPU-made helper tensor would be an error."""
    conf = torch.rand(2, 5, dtype=torch.float64, device="meta")
    for sel in (select_topk(conf, 2), select_topk(conf, torch.tensor([1, 2], device="meta")),
                select_threshold(conf, 0.5), select_factor(conf, 1.0), select_local(conf, 0.9, 0.7, 1)):
        assert sel.device.type == "meta" and sel.dtype == torch.bool and sel.shape == (2, 5)
