"""Verification rules: which drafted cells survive the verifier.

Every rule sees a `VerifyInput` over the generation region (B, L):
`tokens` (the canvas), `drafted` (cells drafted this round and still under
review), the verifier's logits (mask token at -inf) and, for `kl_divergence`,
the drafter's log-probs at the drafted cells. Writing p_v for the verifier's
softmax at a cell, v = argmax p_v, c_v = max p_v and d for the drafted token:

| rule                         | re-mask (drafted cells)     | write v into                      | τ: range, default |
|------------------------------|-----------------------------|-----------------------------------|-------------------|
| exact_match                  | v ≠ d                       | —                                 | none              |
| confidence_threshold         | p_v(d) < τ                  | —                                 | (0, 1], 0.9       |
| disagreement_with_confidence | v ≠ d and c_v ≥ τ           | —                                 | (0, 1], 0.9       |
| kl_divergence                | KL(p_drafter ‖ p_v) > τ     | —                                 | > 0 nats, 1.0     |
| unmask_confidence            | v ≠ d and c_v < τ           | drafts with v ≠ d and c_v ≥ τ;    | (0, 1], 0.9       |
|                              |                             | allowed masked cells with c_v ≥ τ |                   |
| trust_verifier               | —                           | every draft (where v ≠ d)         | none              |
| no_verification              | —                           | — (the verifier is not even run)  | none              |

`unmask_confidence` is exact_match in which the verifier also decodes: a
disagreeing draft is replaced by the verifier's token when the verifier is
confident (c_v ≥ τ), else re-masked; and every masked cell the loop lets the
verifier unmask (`may_unmask`: DualDiffusion passes the masked cells of the
drafter's current block, never ahead of it) is committed with v when c_v ≥ τ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .core import Verdict


@dataclass
class VerifyInput:
    tokens: Tensor  # long (B, L): the canvas's generation region
    drafted: Tensor  # bool (B, L): drafts under review
    verifier_logits: Tensor  # (B, L, V), mask token at -inf
    drafter_logprobs: Tensor | None = None  # (n, V) at drafted.nonzero(), only for kl_divergence
    may_unmask: Tensor | None = None  # bool (B, L): masked cells the verifier may commit (unmask_confidence)

    def verifier_probs(self) -> Tensor:
        return F.softmax(self.verifier_logits.float(), dim=-1)


def _argmax_conf(v: VerifyInput) -> tuple[Tensor, Tensor, Tensor]:
    p = v.verifier_probs()
    conf, best = p.max(dim=-1)
    return p, best, conf


def exact_match(v: VerifyInput, threshold: float | None) -> Verdict:
    best = v.verifier_logits.argmax(dim=-1)
    out = Verdict.nothing(v.tokens)
    out.remask = v.drafted & (best != v.tokens)
    return out


def confidence_threshold(v: VerifyInput, threshold: float) -> Verdict:
    p = v.verifier_probs()
    p_draft = torch.gather(p, -1, v.tokens[..., None]).squeeze(-1)
    out = Verdict.nothing(v.tokens)
    out.remask = v.drafted & (p_draft < threshold)
    return out


def disagreement_with_confidence(v: VerifyInput, threshold: float) -> Verdict:
    _, best, conf = _argmax_conf(v)
    out = Verdict.nothing(v.tokens)
    out.remask = v.drafted & (best != v.tokens) & (conf >= threshold)
    return out


def kl_divergence(v: VerifyInput, threshold: float) -> Verdict:
    out = Verdict.nothing(v.tokens)
    if not v.drafted.any():
        return out
    if v.drafter_logprobs is None:
        raise ValueError("rule 'kl_divergence' needs the drafter's log-probs at the drafted cells")
    lq = F.log_softmax(v.verifier_logits[v.drafted].float(), dim=-1)
    lp = v.drafter_logprobs.float()
    if lp.shape != lq.shape:
        raise ValueError(f"drafter log-probs {tuple(lp.shape)} do not match the drafted cells {tuple(lq.shape)}")
    # KL(p‖q) = Σ p (log p − log q); cells where p = 0 contribute nothing (also where q = 0 there).
    terms = torch.where(lp > -math.inf, lp.exp() * (lp - lq), torch.zeros_like(lp))
    kl = terms.sum(-1)
    out.remask[v.drafted] = kl > threshold
    return out


def unmask_confidence(v: VerifyInput, threshold: float) -> Verdict:
    _, best, conf = _argmax_conf(v)
    sure = conf >= threshold
    disagree = v.drafted & (best != v.tokens)
    may = v.may_unmask if v.may_unmask is not None else torch.zeros_like(v.drafted)
    out = Verdict.nothing(v.tokens)
    out.commit = (disagree | (may & ~v.drafted)) & sure
    out.remask = disagree & ~sure
    out.tokens = best
    return out


def trust_verifier(v: VerifyInput, threshold: float | None) -> Verdict:
    best = v.verifier_logits.argmax(dim=-1)
    out = Verdict.nothing(v.tokens)
    out.commit = v.drafted & (best != v.tokens)
    out.tokens = best
    return out


def no_verification(v: VerifyInput, threshold: float | None) -> Verdict:
    return Verdict.nothing(v.tokens)


@dataclass(frozen=True)
class RuleSpec:
    fn: Callable[[VerifyInput, float | None], Verdict]
    threshold_kind: str | None  # "probability" (0, 1], "positive" (0, inf), or None (takes no threshold)
    default: float | None = None
    needs_verifier: bool = True
    needs_drafter_logprobs: bool = False
    unmasks: bool = False  # reads the verifier at masked cells


RULES: dict[str, RuleSpec] = {
    "exact_match": RuleSpec(exact_match, None),
    "confidence_threshold": RuleSpec(confidence_threshold, "probability", 0.9),
    "disagreement_with_confidence": RuleSpec(disagreement_with_confidence, "probability", 0.9),
    "kl_divergence": RuleSpec(kl_divergence, "positive", 1.0, needs_drafter_logprobs=True),
    "unmask_confidence": RuleSpec(unmask_confidence, "probability", 0.9, unmasks=True),
    "trust_verifier": RuleSpec(trust_verifier, None),
    "no_verification": RuleSpec(no_verification, None, needs_verifier=False),
}


@dataclass(frozen=True)
class Rule:
    """A verification rule bound to its threshold; call it on a `VerifyInput`."""

    name: str
    threshold: float | None
    spec: RuleSpec

    def __call__(self, v: VerifyInput) -> Verdict:
        out = self.spec.fn(v, self.threshold)
        out.commit &= ~out.remask
        return out


def resolve_threshold(name: str, threshold: float | None) -> float | None:
    """The rule's threshold after defaults; ValueError for unknown rules and out-of-range values."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
    spec = RULES[name]
    if spec.threshold_kind is None:
        if threshold is not None:
            raise ValueError(f"rule {name!r} takes no threshold (got rule_threshold={threshold}); leave it unset")
        return None
    if threshold is None:
        return spec.default
    t = float(threshold)
    if spec.threshold_kind == "probability" and not 0 < t <= 1:
        raise ValueError(f"rule {name!r} compares probabilities: rule_threshold must be in (0, 1], got {threshold}")
    if spec.threshold_kind == "positive" and not (0 < t < math.inf):
        raise ValueError(f"rule {name!r} thresholds a KL divergence in nats: "
                         f"rule_threshold must be > 0, got {threshold}")
    return t


def make_rule(name: str, threshold: float | None = None) -> Rule:
    return Rule(name, resolve_threshold(name, threshold), RULES[name])
