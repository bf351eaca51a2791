"""DualDiffusion's verification rules at their edges: thresholds met exactly, what each rule computes,
and the exact error messages. (tests/test_dualdiffusion.py covers the rules on typical inputs.)

Exact ties come from logits 0 / 0 / -inf: their softmax is exactly 0.5 / 0.5 / 0 in float32.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from diffspec.speculative import rules
from diffspec.speculative.rules import RULES, VerifyInput, make_rule, resolve_threshold, resolve_verifier_unmask

NEG = -math.inf
# one cell, V = 3: tokens 0 and 1 each exactly 0.5 (argmax: 0, the first), token 2 impossible
HALF = torch.tensor([[[0.0, 0.0, NEG]]])


def one_cell(token: int, drafted: bool = True, cand: bool = False, may: bool | None = None,
             logits: torch.Tensor = HALF, drafter_logprobs: torch.Tensor | None = None) -> VerifyInput:
    return VerifyInput(torch.tensor([[token]]), torch.tensor([[drafted]]), logits, drafter_logprobs,
                       None if may is None else torch.tensor([[may]]), torch.tensor([[cand]]))


def test_the_exact_tie_is_exactly_one_half():
    p = one_cell(0).verifier_probs()
    assert p[0, 0].tolist() == [0.5, 0.5, 0.0]


# ---------------------------------------------------------------- thresholds met exactly

def test_confidence_rules_keep_a_draft_whose_probability_equals_tau():
    """'p_v(d) < τ re-masks': p_v(d) = τ = 0.5 stays."""
    for name in ("confidence_threshold", "disagreement_with_confidence"):
        rule = make_rule(name, 0.5, 0)
        assert not rule(one_cell(0)).remask.any(), name  # agrees, p = τ
        assert rule(one_cell(2)).remask.all(), name  # p = 0 < τ
    # disagreement_with_confidence still re-masks a disagreeing draft at p = τ (the OR)
    assert make_rule("disagreement_with_confidence", 0.5, 0)(one_cell(1)).remask.all()
    assert not make_rule("confidence_threshold", 0.5, 0)(one_cell(1)).remask.any()


def test_confidence_rules_commit_a_candidate_whose_probability_equals_tau():
    for name in ("confidence_threshold", "disagreement_with_confidence"):
        out = make_rule(name, 0.5)(one_cell(99, drafted=False, cand=True))
        assert out.commit.tolist() == [[True]] and out.tokens.tolist() == [[0]], name
        assert not make_rule(name, 0.51)(one_cell(99, drafted=False, cand=True)).commit.any(), name


def test_disagreement_and_confidence_rejects_when_the_verifier_is_exactly_tau_sure():
    """'c_v ≥ τ': a disagreeing draft (1, argmax 0) with c_v = τ = 0.5 is re-masked."""
    assert make_rule("disagreement_and_confidence", 0.5)(one_cell(1)).remask.all()
    assert not make_rule("disagreement_and_confidence", 0.51)(one_cell(1)).remask.any()
    assert not make_rule("disagreement_and_confidence", 0.5)(one_cell(0)).remask.any()  # agrees


def test_unmask_confidence_is_sure_at_exactly_tau():
    """c_v = τ counts as sure: the disagreeing draft is replaced, the allowed masked cell committed."""
    out = make_rule("unmask_confidence", 0.5)(one_cell(1))
    assert out.commit.tolist() == [[True]] and out.tokens.tolist() == [[0]] and not out.remask.any()
    out = make_rule("unmask_confidence", 0.5)(one_cell(99, drafted=False, may=True))
    assert out.commit.tolist() == [[True]] and out.tokens.tolist() == [[0]]
    out = make_rule("unmask_confidence", 0.51)(one_cell(1))
    assert out.remask.tolist() == [[True]] and not out.commit.any()


def test_kl_divergence_rejects_only_above_tau():
    """'KL > τ re-masks': identical distributions have KL exactly 0, kept at τ = 0 (the function itself;
    make_rule refuses τ = 0) and re-masked once the drafter differs."""
    logits = torch.tensor([[[1.0, 0.5, NEG], [0.0, 2.0, NEG]]])
    lp = F.log_softmax(logits[0].float(), dim=-1)
    v = VerifyInput(torch.tensor([[0, 1]]), torch.tensor([[True, True]]), logits, lp)
    assert rules.kl_divergence(v, 0.0).remask.tolist() == [[False, False]]
    v.drafter_logprobs = lp.flip(0)  # each cell gets the other cell's distribution
    p, q = lp.exp().tolist(), lp.flip(0).exp().tolist()
    kl = [sum(a * math.log(a / b) for a, b in zip(q[c], p[c]) if a > 0) for c in range(2)]  # KL(drafter ‖ verifier)
    assert min(kl) > 0.1
    assert rules.kl_divergence(v, 0.1).remask.tolist() == [[True, True]]
    assert rules.kl_divergence(v, max(kl) + 1e-3).remask.tolist() == [[False, False]]


def test_kl_divergence_is_per_cell_over_the_vocabulary():
    """Row 0's drafts: cell 0 identical (KL 0), cell 2 far off; the KL is summed over each cell's
    vocabulary, never across cells, and an undrafted cell is not judged."""
    logits = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]])
    lq = F.log_softmax(logits[0], dim=-1)
    drafted = torch.tensor([[True, False, True]])
    lp = torch.stack([lq[0], lq[0]])  # cell 2's drafter is sure of token 0, the verifier of token 2
    v = VerifyInput(torch.tensor([[0, 1, 0]]), drafted, logits, lp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an implicit softmax dimension
        out = make_rule("kl_divergence", 1.0)(v)
    assert out.remask.tolist() == [[False, False, True]]


def test_kl_divergence_errors_are_exact():
    v = one_cell(0)
    with pytest.raises(ValueError, match=r"^rule 'kl_divergence' needs the drafter's log-probs at the drafted cells$"):
        make_rule("kl_divergence")(v)
    v.drafter_logprobs = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^drafter log-probs \(2, 3\) do not match the drafted cells \(1, 3\)$"):
        make_rule("kl_divergence")(v)
    v.drafted = torch.tensor([[False]])  # nothing drafted: nothing to compare, no error
    assert not make_rule("kl_divergence")(v).remask.any()


# ---------------------------------------------------------------- what each rule computes

@pytest.mark.parametrize("name", ["exact_match", "trust_verifier", "kl_divergence", "verifier_overwrite"])
def test_argmax_rules_never_take_the_vocabulary_softmax(name, monkeypatch):
    """These rules need only the verifier's argmax; a softmax over a 126k vocabulary per cell is
    what they must not pay for (kl_divergence takes a log-softmax of the drafted cells only)."""
    def no_softmax(self):
        raise AssertionError(f"{name} computed the verifier's probabilities")

    monkeypatch.setattr(VerifyInput, "verifier_probs", no_softmax)
    v = one_cell(1, drafter_logprobs=F.log_softmax(HALF[0], dim=-1))
    make_rule(name, None if RULES[name].threshold_kind is None else 1.0)(v)


def test_exact_match_and_overwrite_on_a_row_of_cells():
    logits = torch.tensor([[[2.0, 0.0, NEG], [0.0, 2.0, NEG], [2.0, 0.0, NEG], [0.0, 2.0, NEG]]])
    v = VerifyInput(torch.tensor([[0, 0, 1, 99]]), torch.tensor([[True, True, False, False]]), logits,
                    candidates=torch.tensor([[False, False, False, True]]))
    out = make_rule("exact_match")(v)
    assert out.remask.tolist() == [[False, True, False, False]]  # cell 2 disagrees but is not drafted
    assert out.commit.tolist() == [[False, False, False, True]] and out.tokens[0, 3] == 1
    out = make_rule("verifier_overwrite")(v)
    assert out.commit.tolist() == [[False, True, False, True]] and out.tokens[0, :2].tolist() == [0, 1]
    assert not out.remask.any()
    out = make_rule("trust_verifier")(v)
    assert not out.remask.any() and out.commit.tolist() == [[False, False, False, True]]


def test_a_rule_never_commits_what_it_remasks():
    """Rule.__call__ drops commits that are also re-masked (a rule may mark both)."""
    def both(v, threshold):
        out = rules.Verdict.nothing(v.tokens)
        out.remask = torch.ones_like(v.drafted)
        out.commit = torch.ones_like(v.drafted)
        return out

    rule = rules.Rule("both", None, rules.RuleSpec(both, None))
    out = rule(one_cell(0))
    assert out.remask.all() and not out.commit.any()


# ---------------------------------------------------------------- names, defaults, messages

def test_make_rule_binds_name_threshold_and_k():
    r = make_rule("confidence_threshold", 0.7, 2)
    assert (r.name, r.threshold, r.verifier_unmask, r.spec) == ("confidence_threshold", 0.7, 2,
                                                                 RULES["confidence_threshold"])
    r = make_rule("kl_divergence")
    assert (r.name, r.threshold, r.verifier_unmask) == ("kl_divergence", 1.0, 0)


def test_unknown_rule_message_lists_every_rule():
    with pytest.raises(ValueError) as e:
        make_rule("magic")
    assert str(e.value) == "unknown rule 'magic'; choose one of " + ", ".join(RULES)


def test_verifier_unmask_refusals_say_why():
    with pytest.raises(ValueError) as e:
        resolve_verifier_unmask("no_verification", 1)
    assert str(e.value) == "rule 'no_verification' takes no verifier_unmask (the verifier is not run); leave it unset"
    with pytest.raises(ValueError) as e:
        resolve_verifier_unmask("unmask_confidence", 2)
    assert str(e.value) == ("rule 'unmask_confidence' takes no verifier_unmask (it decodes the confident masked "
                            "cells of the drafter's block itself); leave it unset")
    assert resolve_verifier_unmask("unmask_confidence", 0) == 0
    assert resolve_verifier_unmask("exact_match", None) == 1 and resolve_verifier_unmask("exact_match", 0) == 0


@pytest.mark.parametrize("name, given, expected", [
    ("confidence_threshold", 1.0, 1.0),  # (0, 1]: 1 is allowed
    ("kl_divergence", 1e-9, 1e-9),
    ("exact_match", None, None),
    ("kl_divergence", None, 1.0),
])
def test_threshold_edges(name, given, expected):
    assert resolve_threshold(name, given) == expected


@pytest.mark.parametrize("name, bad", [("confidence_threshold", 0.0), ("confidence_threshold", 1.0000001),
                                       ("kl_divergence", 0.0), ("kl_divergence", math.inf)])
def test_threshold_out_of_range_edges(name, bad):
    with pytest.raises(ValueError, match=f"rule '{name}'"):
        resolve_threshold(name, bad)
