"""Verification rules: which drafted cells survive the verifier, and what the verifier writes.

Every rule sees a `VerifyInput` over the generation region (B, L):
`tokens` (the canvas), `drafted` (cells drafted this round and still under
review), the verifier's logits (mask token at -inf), optionally
`candidates` (masked cells the verifier decodes itself this forward, see
below) and, for `kl_divergence`, the drafter's log-probs at the drafted
cells. Logit i scores token i. Writing p_v for the verifier's softmax at a
cell, v = argmax p_v, c_v = max p_v, t for the cell's token (the draft d
at a drafted cell, v at a candidate):

| rule                          | re-mask a draft / drop a candidate when | also writes                        | τ: range, default | candidates (k) |
|-------------------------------|-----------------------------------------|------------------------------------|-------------------|----------------|
| exact_match                   | v ≠ t                                   | —                                  | none              | 1              |
| confidence_threshold          | p_v(t) < τ                              | —                                  | (0, 1], 0.9       | 1              |
| disagreement_with_confidence  | v ≠ t or p_v(t) < τ                     | —                                  | (0, 1], 0.9       | 1              |
| trust_verifier                | never                                   | —                                  | none              | 1              |
| no_verification               | never (the verifier is not even run)    | —                                  | none              | —              |
| kl_divergence                 | KL(p_drafter ‖ p_v) > τ (drafts only)   | —                                  | > 0 nats, 1.0     | 0              |
| disagreement_and_confidence   | v ≠ t and c_v ≥ τ                       | —                                  | (0, 1], 0.9       | 0              |
| verifier_overwrite            | never                                   | v into every draft with v ≠ d      | none              | 0              |
| unmask_confidence             | v ≠ d and c_v < τ                       | v into drafts with v ≠ d, c_v ≥ τ; | (0, 1], 0.9       | —              |
|                               |                                         | allowed masked cells with c_v ≥ τ  |                   |                |

Where they come from. The first five are the public DualDiffusion loop's
rules (Satgoy152/DualDiffusion, `verification_algos.py`:
`exact_match_verification`, `confidence_threshold_verification`,
`disagreement_with_confidence_verification`, `trust_verifier`,
`no_verification`). There, each rule except `no_verification` returns the
*verifier's output* canvas: the drafts it was shown, unchanged (an MDM step
never rewrites a visible token), plus the cells the verifier decoded itself
(`LLaDA/generate.py:generate_per_step`: k = 1 masked cell per verifier step,
the most confident one within block_length of the first mask), minus the
cells the rule re-masks; the rule judges the verifier's own tokens like the
drafts. Here those are the `candidates`: each verifier forward proposes its
k most confident masked cells (`verifier_unmask`, default 1 for these rules,
0 = judge drafts only), and a candidate is committed unless the rule would
re-mask it. As there, `disagreement_with_confidence` re-masks the union of
exact_match's and confidence_threshold's cells (its `disagreement_threshold`
argument is unused there); for τ > 0.5 that is confidence_threshold, since
p_v(d) ≥ τ > 0.5 makes d the argmax. Thresholds compare strictly (p < τ
re-masks), default 0.9 (the functions' default; the reference's eval wrapper
leaks its drafter threshold 0.95 into confidence_threshold through **kwargs).

Not reproduced: the reference's verifier logits are misaligned by one
position (here logit i scores token i); its verifier, as its loop wires it
(`eval/models/DualDiffusion.py:llada_generate_fn`), sees only the drafted
prefix up to the first mask (later drafts are masked for it and dropped
unless it re-decodes them) and its logits start at that mask, so drafts
before it are never judged; here every draft of the iteration is judged,
on the view `verifier_view` picks. Its `no_verification` still runs (and
pays for) the verifier; here it is skipped.

The rest are ours. `kl_divergence` and `unmask_confidence` are named in
DESIGN.md's rule list but exist in no commit of the reference. The two
variants `disagreement_and_confidence` (re-mask on disagreement *and* a
confident verifier) and `verifier_overwrite` (write the verifier's argmax
over every disagreeing draft) are what this module used to call
`disagreement_with_confidence` and `trust_verifier`.
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
    candidates: Tensor | None = None  # bool (B, L): masked cells the verifier decodes with v, judged like drafts

    def verifier_probs(self) -> Tensor:
        return F.softmax(self.verifier_logits.float(), dim=-1)


@dataclass
class _Scores:
    best: Tensor  # v, the verifier's argmax
    tok: Tensor  # t: the canvas token, v at candidates
    cand: Tensor  # bool candidates (never drafted)
    conf: Tensor | None = None  # c_v  (with probs=True)
    p_tok: Tensor | None = None  # p_v(t) at drafts and candidates  (with probs=True)


def _scores(v: VerifyInput, probs: bool = True) -> _Scores:
    """v, t and the candidates; with `probs` also c_v and p_v(t) (a softmax over the whole vocabulary)."""
    cand = v.candidates & ~v.drafted if v.candidates is not None else torch.zeros_like(v.drafted)
    if not probs:
        best = v.verifier_logits.argmax(dim=-1)
        return _Scores(best, torch.where(cand, best, v.tokens), cand)
    p = v.verifier_probs()
    conf, best = p.max(dim=-1)
    tok = torch.where(cand, best, v.tokens)
    judged = torch.where(v.drafted | cand, tok, best)  # masked cells hold the mask id: read p_v(v) there
    p_tok = torch.gather(p, -1, judged[..., None]).squeeze(-1)
    return _Scores(best, tok, cand, conf, p_tok)


def _judge(v: VerifyInput, s: _Scores, reject: Tensor) -> Verdict:
    """Re-mask rejected drafts; commit the verifier's token at candidates it does not reject."""
    out = Verdict.nothing(v.tokens)
    out.remask = v.drafted & reject
    out.commit = s.cand & ~reject
    out.tokens = s.best
    return out


# ---------------------------------------------------------------- the reference's rules

def exact_match(v: VerifyInput, threshold: float | None) -> Verdict:
    s = _scores(v, probs=False)
    return _judge(v, s, s.best != s.tok)


def confidence_threshold(v: VerifyInput, threshold: float) -> Verdict:
    s = _scores(v)
    return _judge(v, s, s.p_tok < threshold)


def disagreement_with_confidence(v: VerifyInput, threshold: float) -> Verdict:
    s = _scores(v)
    return _judge(v, s, (s.best != s.tok) | (s.p_tok < threshold))


def trust_verifier(v: VerifyInput, threshold: float | None) -> Verdict:
    s = _scores(v, probs=False)
    return _judge(v, s, torch.zeros_like(v.drafted))


def no_verification(v: VerifyInput, threshold: float | None) -> Verdict:
    return Verdict.nothing(v.tokens)


# ---------------------------------------------------------------- ours

def kl_divergence(v: VerifyInput, threshold: float) -> Verdict:
    s = _scores(v, probs=False)
    reject = torch.zeros_like(v.drafted)  # candidates have no drafter distribution: never rejected
    if v.drafted.any():
        if v.drafter_logprobs is None:
            raise ValueError("rule 'kl_divergence' needs the drafter's log-probs at the drafted cells")
        lq = F.log_softmax(v.verifier_logits[v.drafted].float(), dim=-1)
        lp = v.drafter_logprobs.float()
        if lp.shape != lq.shape:
            raise ValueError(f"drafter log-probs {tuple(lp.shape)} do not match the drafted cells {tuple(lq.shape)}")
        # KL(p‖q) = Σ p (log p − log q); cells where p = 0 contribute nothing (also where q = 0 there).
        terms = torch.where(lp > -math.inf, lp.exp() * (lp - lq), torch.zeros_like(lp))
        reject[v.drafted] = terms.sum(-1) > threshold
    return _judge(v, s, reject)


def disagreement_and_confidence(v: VerifyInput, threshold: float) -> Verdict:
    s = _scores(v)
    return _judge(v, s, (s.best != s.tok) & (s.conf >= threshold))


def verifier_overwrite(v: VerifyInput, threshold: float | None) -> Verdict:
    s = _scores(v, probs=False)
    out = Verdict.nothing(v.tokens)
    out.commit = (v.drafted & (s.best != v.tokens)) | s.cand
    out.tokens = s.best
    return out


def unmask_confidence(v: VerifyInput, threshold: float) -> Verdict:
    s = _scores(v)
    sure = s.conf >= threshold
    disagree = v.drafted & (s.best != v.tokens)
    may = v.may_unmask if v.may_unmask is not None else torch.zeros_like(v.drafted)
    out = Verdict.nothing(v.tokens)
    out.commit = (disagree | (may & ~v.drafted)) & sure
    out.remask = disagree & ~sure
    out.tokens = s.best
    return out


@dataclass(frozen=True)
class RuleSpec:
    fn: Callable[[VerifyInput, float | None], Verdict]
    threshold_kind: str | None  # "probability" (0, 1], "positive" (0, inf), or None (takes no threshold)
    default: float | None = None
    needs_verifier: bool = True
    needs_drafter_logprobs: bool = False
    unmasks: bool = False  # reads the verifier at the masked cells of `may_unmask` (an extra plain view)
    # Masked cells the verifier decodes itself per forward (the reference's k), when the
    # user does not say; None: the rule takes no candidates (verifier_unmask must stay unset or 0).
    verifier_unmask: int | None = 0
    origin: str = "ours"


_REF = "Satgoy152/DualDiffusion verification_algos.py:"
RULES: dict[str, RuleSpec] = {
    "exact_match": RuleSpec(exact_match, None, verifier_unmask=1, origin=_REF + "exact_match_verification"),
    "confidence_threshold": RuleSpec(confidence_threshold, "probability", 0.9, verifier_unmask=1,
                                     origin=_REF + "confidence_threshold_verification"),
    "disagreement_with_confidence": RuleSpec(disagreement_with_confidence, "probability", 0.9, verifier_unmask=1,
                                             origin=_REF + "disagreement_with_confidence_verification"),
    "trust_verifier": RuleSpec(trust_verifier, None, verifier_unmask=1, origin=_REF + "trust_verifier"),
    "no_verification": RuleSpec(no_verification, None, needs_verifier=False, verifier_unmask=None,
                                origin=_REF + "no_verification"),
    "kl_divergence": RuleSpec(kl_divergence, "positive", 1.0, needs_drafter_logprobs=True),
    "disagreement_and_confidence": RuleSpec(disagreement_and_confidence, "probability", 0.9),
    "verifier_overwrite": RuleSpec(verifier_overwrite, None),
    "unmask_confidence": RuleSpec(unmask_confidence, "probability", 0.9, unmasks=True, verifier_unmask=None),
}


@dataclass(frozen=True)
class Rule:
    """A verification rule bound to its threshold and candidate count; call it on a `VerifyInput`."""

    name: str
    threshold: float | None
    spec: RuleSpec
    verifier_unmask: int = 0  # masked cells the verifier decodes itself per forward

    def __call__(self, v: VerifyInput) -> Verdict:
        out = self.spec.fn(v, self.threshold)
        out.commit &= ~out.remask
        return out


def _check_name(name: str) -> RuleSpec:
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
    return RULES[name]


def resolve_threshold(name: str, threshold: float | None) -> float | None:
    """The rule's threshold after defaults; ValueError for unknown rules and out-of-range values."""
    spec = _check_name(name)
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


def resolve_verifier_unmask(name: str, k: int | None) -> int:
    """Masked cells the verifier decodes per forward under rule `name` (None: the rule's default)."""
    spec = _check_name(name)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ValueError(f"verifier_unmask must be an int >= 0 (masked cells the verifier decodes per forward), "
                         f"got {k!r}")
    if spec.verifier_unmask is None:
        if k:
            why = ("the verifier is not run" if not spec.needs_verifier
                   else "it decodes the confident masked cells of the drafter's block itself")
            raise ValueError(f"rule {name!r} takes no verifier_unmask ({why}); leave it unset")
        return 0
    return spec.verifier_unmask if k is None else k


def make_rule(name: str, threshold: float | None = None, verifier_unmask: int | None = None) -> Rule:
    return Rule(name, resolve_threshold(name, threshold), RULES[name], resolve_verifier_unmask(name, verifier_unmask))
