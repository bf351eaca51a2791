"""DualDiffusion: the speculative core, every verification rule, the loop, its cost, API/CLI/bench wiring.

Rules are tested on hand-built logits; the loop end to end on tiny random
LLaDA models (CPU, fractions of a second each).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffspec.api import build_config, generate
from diffspec.bench.runner import label_of, options_for, parse_spec, run_bench
from diffspec.cli import main
from diffspec.decoding.cache import make_cache
from diffspec.decoding.config import DecodeConfig
from diffspec.decoding.diffusion import BlockDecoder, decode_canvas, diffusion_generate
from diffspec.decoding.meter import CostMeter, MeteredModel
from diffspec.decoding.state import Canvas
from diffspec.models.checkpoint import save_model
from diffspec.models.llada import ModelOutput
from diffspec.models.tokenizer import train_bpe
from diffspec.speculative.core import Draft, Verdict, apply_verdict, verifier_views
from diffspec.speculative.dualdiffusion import (DualConfig, SpecStats, build_dual_config, check_compatible,
                                         dualdiffusion_generate)
from diffspec.speculative.rules import RULES, VerifyInput, make_rule, resolve_threshold

PROMPTS = [
    "Question: Tom has 5 pens.\nAnswer:",
    "Question: Ana has 31 cups. Ana doubles them. How many cups does Ana have now?\nAnswer:",
    "Question: Leo has 9 eggs. How many?\nAnswer:",
]
SHAPE = dict(gen_length=16, block_length=8, steps=16)


def sharpen(m: nn.Module, factor: float = 5.0) -> nn.Module:
    """Scale weights so predictions are context-dependent and far from ties."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name and "ln_f" not in name:
                p.mul_(factor)
    return m


@pytest.fixture(scope="module")
def model(make_model):
    return sharpen(make_model(seed=0))


@pytest.fixture(scope="module")
def small(make_model):
    """A smaller drafter with the same tokenizer and special ids."""
    return sharpen(make_model(seed=1, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, mlp_hidden_size=64))


def dual(**kw) -> DualConfig:
    """Tests here exercise the paper's loop unless they name another view (the default is 'masked')."""
    return build_dual_config(None, **{**SHAPE, "verifier_view": "drafted", **kw})


# ================================================================ rules on hand-built logits

def logits_from(probs: list[list[float]]) -> torch.Tensor:
    """(1, L, V) logits whose softmax is `probs` (zeros become -inf)."""
    p = torch.tensor([probs], dtype=torch.float32)
    return torch.where(p > 0, p.log(), torch.tensor(-math.inf))


# Verifier distributions over V = 4 tokens at L = 4 cells:
#   cell 0: confident 0   cell 1: confident 1   cell 2: unsure (0.4 on 2)   cell 3: confident 3
VPROBS = [[0.95, 0.03, 0.01, 0.01], [0.02, 0.96, 0.01, 0.01], [0.3, 0.3, 0.4, 0.0], [0.0, 0.0, 0.05, 0.95]]


def vin(tokens, drafted, probs=VPROBS, dprobs=None, may=None, cand=None) -> VerifyInput:
    drafted_t = torch.tensor([drafted])
    lp = None
    if dprobs is not None:
        lp = logits_from(dprobs)[0][drafted_t[0]]
    return VerifyInput(torch.tensor([tokens]), drafted_t, logits_from(probs), lp,
                       torch.tensor([may]) if may is not None else None,
                       torch.tensor([cand]) if cand is not None else None)


def test_exact_match_remasks_disagreeing_drafts_only():
    # drafts 0 (agree), 2 (verifier says 1), 0 (argmax 2), 3 (agree); cell 1 disagrees but was not drafted
    out = make_rule("exact_match")(vin([0, 2, 0, 3], [True, False, True, True]))
    assert out.remask.tolist() == [[False, False, True, False]]
    assert not out.commit.any()


def test_confidence_threshold_uses_the_verifier_prob_of_the_drafted_token():
    v = vin([0, 1, 2, 3], [True, True, True, True])  # p_v(d) = .95, .96, .4, .95
    assert make_rule("confidence_threshold", 0.9)(v).remask.tolist() == [[False, False, True, False]]
    assert make_rule("confidence_threshold", 0.4)(v).remask.tolist() == [[False, False, False, False]]  # >= τ stays
    assert make_rule("confidence_threshold", 0.96)(v).remask.tolist() == [[True, False, True, True]]
    # a draft the verifier finds unlikely is re-masked even when it is the draft's own argmax elsewhere
    assert make_rule("confidence_threshold", 0.5)(vin([1, 1, 2, 3], [True] * 4)).remask[0, 0]


def test_disagreement_with_confidence_is_disagreement_or_low_confidence():
    """The reference's rule (verification_algos.py:disagreement_with_confidence_verification) re-masks
    the union of exact_match's and confidence_threshold's cells."""
    # cell 0: disagrees (draft 1), verifier confident; cell 1: agrees, p_v(d) = .96;
    # cell 2: disagrees (argmax 2), unsure; cell 3: agrees, p_v(d) = .95
    v = vin([1, 1, 0, 3], [True, True, True, True])
    assert make_rule("disagreement_with_confidence", 0.9)(v).remask.tolist() == [[True, False, True, False]]
    # a draft the verifier agrees with but is unsure of is re-masked too (confidence part) ...
    unsure = vin([0, 1, 2, 3], [True] * 4)  # cell 2: argmax 2 = draft, p_v = .4
    assert make_rule("disagreement_with_confidence", 0.9)(unsure).remask.tolist() == [[False, False, True, False]]
    # ... and a confident enough disagreement is still re-masked at a low τ (disagreement part)
    assert make_rule("disagreement_with_confidence", 0.01)(v).remask.tolist() == [[True, False, True, False]]
    assert make_rule("disagreement_with_confidence", 0.99)(v).remask.tolist() == [[True, True, True, True]]
    # for τ > 0.5 it is confidence_threshold (p_v(d) >= τ > 0.5 makes d the argmax)
    for toks in ([1, 1, 0, 3], [0, 1, 2, 3], [0, 0, 1, 2]):
        w = vin(toks, [True] * 4)
        assert torch.equal(make_rule("disagreement_with_confidence", 0.6)(w).remask,
                           make_rule("confidence_threshold", 0.6)(w).remask)
    assert resolve_threshold("disagreement_with_confidence", None) == 0.9


def test_disagreement_and_confidence_needs_both():
    """Ours (what disagreement_with_confidence meant here before): disagreement AND a confident verifier."""
    # cell 0 disagrees (draft 1), verifier confident; cell 2 disagrees, verifier unsure; cell 3 agrees
    v = vin([1, 1, 0, 3], [True, True, True, True])
    assert make_rule("disagreement_and_confidence", 0.9)(v).remask.tolist() == [[True, False, False, False]]
    assert make_rule("disagreement_and_confidence", 0.35)(v).remask.tolist() == [[True, False, True, False]]
    assert make_rule("disagreement_and_confidence", 0.99)(v).remask.tolist() == [[False] * 4]
    assert resolve_threshold("disagreement_and_confidence", None) == 0.9


def test_kl_divergence_against_the_drafters_distribution():
    dprobs = [VPROBS[0], [0.5, 0.5, 0.0, 0.0], VPROBS[2], [0.0, 0.0, 1.0, 0.0]]
    v = vin([0, 1, 2, 2], [True, True, True, True], dprobs=dprobs)
    kl1 = sum(p * math.log(p / q) for p, q in zip(dprobs[1], VPROBS[1]) if p > 0)  # ≈ 1.26 nats
    kl3 = math.log(1 / 0.05)  # ≈ 3.0 nats
    assert make_rule("kl_divergence", 1.0)(v).remask.tolist() == [[False, True, False, True]]
    assert make_rule("kl_divergence", (kl1 + kl3) / 2)(v).remask.tolist() == [[False, False, False, True]]
    assert make_rule("kl_divergence", kl3 + 0.1)(v).remask.tolist() == [[False] * 4]  # identical dists: KL 0
    # drafter mass where the verifier has none: infinite KL, always re-masked
    inf = vin([0, 1, 2, 3], [False, False, False, True], dprobs=[VPROBS[0]] * 3 + [[0.5, 0.0, 0.0, 0.5]])
    assert make_rule("kl_divergence", 1e6)(inf).remask.tolist() == [[False, False, False, True]]
    # only drafted cells are judged, and their log-probs must be given
    part = vin([0, 1, 2, 2], [False, True, False, False], dprobs=dprobs)
    assert make_rule("kl_divergence", 1.0)(part).remask.tolist() == [[False, True, False, False]]
    with pytest.raises(ValueError, match="log-probs"):
        make_rule("kl_divergence", 1.0)(vin([0, 1, 2, 2], [True] * 4))


def test_unmask_confidence_replaces_when_sure_remasks_when_not_and_unmasks_allowed_cells():
    M = 99  # a masked cell's token id does not matter to the rule
    # cell 0: draft 1 vs confident 0 -> replaced by 0; cell 1: masked, allowed, confident -> committed 1
    # cell 2: draft 0 vs unsure 2 -> re-masked; cell 3: masked but not allowed -> untouched
    v = vin([1, M, 0, M], [True, False, True, False], may=[False, True, False, False])
    out = make_rule("unmask_confidence", 0.9)(v)
    assert out.remask.tolist() == [[False, False, True, False]]
    assert out.commit.tolist() == [[True, True, False, False]]
    assert out.tokens[0, :2].tolist() == [0, 1]
    # a drafted cell the verifier agrees with is left alone
    assert not make_rule("unmask_confidence", 0.9)(vin([0, M, 2, M], [True, False, True, False])).commit.any()


def test_trust_verifier_keeps_every_draft_and_writes_the_verifiers_candidates():
    """The reference's trust_verifier returns the verifier's output: the drafts it was shown, untouched
    (an MDM step never rewrites a visible token), plus the masked cells it decoded itself."""
    M = 99
    out = make_rule("trust_verifier")(vin([1, 1, 0, 2], [True, True, True, False]))
    assert not out.remask.any() and not out.commit.any()  # no candidates: the drafts stand, even wrong ones
    # cell 3 is masked and a candidate: written with the verifier's argmax (3), unsure or not
    out = make_rule("trust_verifier")(vin([1, 1, 0, M], [True, True, True, False], cand=[False, False, False, True]))
    assert not out.remask.any()
    assert out.commit.tolist() == [[False, False, False, True]] and out.tokens[0, 3] == 3
    out = make_rule("trust_verifier")(vin([1, 1, M, 3], [True, True, False, True], cand=[False, False, True, False]))
    assert out.commit.tolist() == [[False, False, True, False]] and out.tokens[0, 2] == 2  # c_v = .4


def test_verifier_overwrite_writes_argmax_over_every_draft():
    """Ours (what trust_verifier meant here before): the verifier's argmax replaces every disagreeing draft."""
    out = make_rule("verifier_overwrite")(vin([1, 1, 0, 2], [True, True, True, False]))
    assert out.commit.tolist() == [[True, False, True, False]]  # cell 1 agrees, cell 3 not drafted
    assert out.tokens[0, [0, 2]].tolist() == [0, 2]
    assert not out.remask.any()


def test_no_verification_does_nothing_and_skips_the_verifier():
    out = make_rule("no_verification")(vin([1, 1, 0, 2], [True] * 4))
    assert not out.remask.any() and not out.commit.any()
    assert not RULES["no_verification"].needs_verifier


def test_every_rule_judges_the_verifiers_own_candidates_like_drafts():
    """The reference's rules all start from the verifier's output, which includes the masked cells it
    decoded itself; each rule then treats those tokens like drafts. Candidates are masked cells, never
    re-masked (nothing to re-mask): a rejected candidate is simply not written."""
    M = 99
    toks, drafted = [0, M, M, M], [True, False, False, False]
    cand = [False, True, True, True]  # v = 1 (c .96), 2 (c .4), 3 (c .95)
    expect = {  # rule (τ) -> candidates written
        ("exact_match", None): [1, 2, 3],  # a candidate is the argmax: never a disagreement
        ("trust_verifier", None): [1, 2, 3],
        ("confidence_threshold", 0.9): [1, 3],  # p_v(v) = .4 < .9 at cell 2
        ("confidence_threshold", 0.4): [1, 2, 3],  # p_v >= τ stays
        ("disagreement_with_confidence", 0.9): [1, 3],
        ("kl_divergence", 1.0): [1, 2, 3],  # no drafter distribution at a candidate
        ("disagreement_and_confidence", 0.9): [1, 2, 3],
        ("verifier_overwrite", None): [1, 2, 3],
    }
    assert [c for c in range(4) if make_rule("confidence_threshold", 0.955)(vin(toks, drafted, cand=cand)).commit[0, c]] \
        == [1]  # .95 at cell 3 is below .955 (the draft at cell 0, p .95, is re-masked there too)
    for (name, thr), cells in expect.items():
        dprobs = [VPROBS[0]] if name == "kl_divergence" else None
        v = vin(toks, drafted, cand=cand)
        if dprobs is not None:
            v.drafter_logprobs = logits_from(dprobs)[0]
        out = make_rule(name, thr)(v)
        assert [c for c in range(4) if out.commit[0, c]] == cells, name
        assert all(out.tokens[0, c] == c for c in cells), name
        assert not out.remask.any(), name  # the draft at cell 0 agrees and is sure
    # unmask_confidence and no_verification take no candidates
    for name in ("unmask_confidence", "no_verification"):
        with pytest.raises(ValueError, match="takes no verifier_unmask"):
            make_rule(name, None, 1)
        assert make_rule(name, None, 0).verifier_unmask == 0


def test_verifier_unmask_defaults_and_errors():
    for name in ("exact_match", "confidence_threshold", "disagreement_with_confidence", "trust_verifier"):
        assert make_rule(name).verifier_unmask == 1  # the reference's k = 1 cell per verifier step
        assert dual(rule=name).verifier_unmask == 1
    for name in ("kl_divergence", "disagreement_and_confidence", "verifier_overwrite", "unmask_confidence",
                 "no_verification"):
        assert make_rule(name).verifier_unmask == 0
    assert dual(rule="exact_match", verifier_unmask=0).verifier_unmask == 0
    assert dual(rule="kl_divergence", verifier_unmask=3).verifier_unmask == 3
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="verifier_unmask must be an int >= 0"):
            dual(verifier_unmask=bad)
    with pytest.raises(ValueError, match="takes no verifier_unmask"):
        dual(rule="unmask_confidence", verifier_unmask=2)
    # a new rule starts from its own default
    cfg = dual(rule="kl_divergence", verifier_unmask=2)
    assert cfg.replace(rule="unmask_confidence").verifier_unmask == 0
    assert cfg.replace(rule="exact_match").verifier_unmask == 1
    assert build_dual_config(cfg, rule="trust_verifier").verifier_unmask == 1
    assert build_dual_config(cfg, num_drafter_steps=2).verifier_unmask == 2


def test_verifier_candidates_are_the_k_most_confident_masks_near_the_first_mask():
    from diffspec.speculative.dualdiffusion import _verifier_candidates

    M = 7
    c = Canvas.from_prompts([[5, 6], [5, 6]], 6, mask_id=M, pad_id=0, max_positions=16)
    c.x[:, 2:] = torch.tensor([[1, M, 2, M, M, M], [M, M, M, M, M, M]])
    conf = torch.tensor([[.9, .5, .9, .6, .8, .99], [.2, .3, .9, .4, .95, .99]])
    # logits whose max softmax prob is conf (V = 8: the argmax 0 takes conf, the rest share 1 - conf)
    p = torch.cat([conf[..., None], ((1 - conf) / 7)[..., None].expand(-1, -1, 7)], -1)
    logits = p.log()
    # window = block_length 4 from the first mask: row 0 cells 1..4, row 1 cells 0..3
    assert _verifier_candidates(c, logits, 1, 4).tolist() == [[False, False, False, False, True, False],
                                                              [False, False, True, False, False, False]]
    assert _verifier_candidates(c, logits, 2, 4).tolist() == [[False, False, False, True, True, False],
                                                              [False, False, True, True, False, False]]
    # k larger than the window: every masked cell in it, never a decoded one or one beyond
    assert _verifier_candidates(c, logits, 9, 4).tolist() == [[False, True, False, True, True, False],
                                                              [True, True, True, True, False, False]]
    c.x[1, 2:] = torch.tensor([1, 2, 3, 4, 5, 6])  # a row with nothing masked has no candidates
    assert not _verifier_candidates(c, logits, 2, 4)[1].any()


def test_apply_verdict_only_touches_the_generation_region():
    c = Canvas.from_prompts([[5, 6]], 4, mask_id=1, pad_id=0, max_positions=16)
    c.x[0, 2:] = torch.tensor([7, 8, 9, 10])
    v = Verdict.nothing(c.x[:, 2:])
    v.remask[0, 1] = True
    v.commit[0, 3] = True
    v.tokens[0, 3] = 42
    changed = apply_verdict(c, v)
    assert c.x.tolist() == [[5, 6, 7, 1, 9, 42]]
    assert changed.tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("rule, bad, match", [
    ("confidence_threshold", 0.0, r"\(0, 1\]"),
    ("confidence_threshold", 1.5, r"\(0, 1\]"),
    ("disagreement_with_confidence", -0.1, r"\(0, 1\]"),
    ("unmask_confidence", 2.0, r"\(0, 1\]"),
    ("kl_divergence", 0.0, "> 0"),
    ("kl_divergence", -1.0, "> 0"),
    ("kl_divergence", math.inf, "> 0"),
    ("exact_match", 0.5, "takes no threshold"),
    ("trust_verifier", 0.5, "takes no threshold"),
    ("no_verification", 0.5, "takes no threshold"),
])
def test_threshold_out_of_range(rule, bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_threshold(rule, bad)
    with pytest.raises(ValueError, match=match):
        dual(rule=rule, rule_threshold=bad)


def test_threshold_defaults_and_ranges_accept_edges():
    assert resolve_threshold("confidence_threshold", None) == 0.9
    assert resolve_threshold("confidence_threshold", 1.0) == 1.0
    assert resolve_threshold("kl_divergence", None) == 1.0
    assert resolve_threshold("kl_divergence", 50.0) == 50.0
    assert resolve_threshold("exact_match", None) is None


# ================================================================ core pieces

def test_draft_logprobs_follow_row_major_cell_order():
    cells = torch.tensor([[False, True, True], [True, False, True]])
    lp = torch.arange(4.0)[:, None].expand(4, 2)  # row i of logprobs holds value i
    d = Draft(cells, torch.zeros_like(cells, dtype=torch.long), lp)
    sub = torch.tensor([[False, False, True], [True, False, False]])
    assert d.logprobs_at(sub)[:, 0].tolist() == [1.0, 2.0]
    assert d.logprobs_at(cells)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_stepwise_views_hide_each_draft_and_everything_drafted_after_it():
    drafted = torch.tensor([[True, True, False, True]])
    step = torch.tensor([[0, 2, -1, 1]])
    hide, pick = verifier_views("stepwise", drafted, step, with_plain=True)
    assert hide.shape == (4, 1, 4)
    assert hide[:, 0].tolist() == [[True, True, False, True], [False, True, False, True],
                                   [False, True, False, False], [False, False, False, False]]
    assert pick.tolist() == [[0, 2, 3, 1]]  # each draft reads its own step's view; others the plain canvas
    hide, pick = verifier_views("masked", drafted, step, with_plain=False)
    assert hide.tolist() == [drafted.tolist()] and pick.tolist() == [[0, 0, 0, 0]]
    hide, _ = verifier_views("drafted", drafted, step, with_plain=True)
    assert hide.shape[0] == 1 and not hide.any()


def test_leftward_views_score_each_draft_with_the_drafts_left_of_it_filled():
    drafted = torch.tensor([[True, False, True, True], [False, True, False, False]])
    step = torch.tensor([[0, -1, 0, 1], [-1, 0, -1, -1]])
    hide, pick = verifier_views("leftward", drafted, step, with_plain=False)
    assert hide.shape == (3, 2, 4)  # as many views as the row with the most drafts has drafts
    assert hide[:, 0].tolist() == [[True, False, True, True], [False, False, True, True],
                                   [False, False, False, True]]
    assert hide[:, 1].tolist() == [[False, True, False, False], [False, False, False, False],
                                   [False, False, False, False]]
    assert pick[drafted].tolist() == [0, 1, 2, 0]  # draft k (left to right) reads view k
    none = torch.zeros_like(drafted)
    hide, pick = verifier_views("leftward", none, step, with_plain=True)
    assert hide.shape[0] == 2 and pick.tolist() == [[1] * 4] * 2  # undrafted cells read the plain view


def test_leftward_view_on_the_bundled_model_accepts_most_drafts_and_answers_right():
    from diffspec.models.checkpoint import load_model
    from diffspec.tasks import arith_examples, score

    m, tok = load_model()
    ex = arith_examples("test", 8, seed=0)
    cfg = build_dual_config(DecodeConfig(gen_length=48, block_length=16, steps=48, batch_size=8),
                            rule="exact_match", verifier_view="leftward", num_drafter_steps=2)
    res = dualdiffusion_generate(m, tok, [e.prompt for e in ex], cfg)
    assert all(score(e, t)["correct"] for e, t in zip(ex, res.texts))
    assert res.stats["remasked"] < 0.1 * res.stats["drafted"]
    assert res.meter.summary()["nfe_per_sequence"] < 16


def test_block_decoder_steps_reproduce_decode_canvas(model, tokenizer):
    mc = model.config
    for cfg in (DecodeConfig(**SHAPE), DecodeConfig(**SHAPE, cache="dual", policy="threshold", threshold=0.3)):
        ps = [tokenizer.encode(p) for p in PROMPTS]
        a = Canvas.from_prompts(ps, 16, mc.mask_token_id, mc.pad_token_id, mc.max_sequence_length)
        b = copy.deepcopy(a)
        with torch.inference_mode():
            decode_canvas(MeteredModel(model, CostMeter()), a, cfg, torch.Generator().manual_seed(0))
            dec = BlockDecoder(MeteredModel(model, CostMeter()), b, cfg, torch.Generator().manual_seed(0))
            n = 0
            while True:
                before = b.x.clone()
                out = dec.step()
                if out is None:
                    break
                n += 1
                changed = (b.x != before)[:, out.s : out.e]
                assert torch.equal(changed, out.chosen) and out.chosen.any()
                assert torch.isinf(out.logits[..., mc.mask_token_id]).all()
        assert torch.equal(a.x, b.x) and n >= 2
        assert dec.step() is None


def test_cache_invalidate_from_drops_cells_per_row(model, tokenizer):
    mc = model.config
    ps = [tokenizer.encode(p) for p in PROMPTS[:2]]
    canvas = Canvas.from_prompts(ps, 16, mc.mask_token_id, mc.pad_token_id, mc.max_sequence_length)
    cache = make_cache(DecodeConfig(**SHAPE, cache="dual"), MeteredModel(model, CostMeter()), canvas)
    P = canvas.prompt_len
    with torch.inference_mode():
        cache.begin_block(canvas.block(0, 8))
        cache.block_logits(0)
    assert cache.store.valid[:, :P].all()
    before = cache.store.valid.clone()
    cache.invalidate_from(torch.tensor([P + 3, canvas.length]))
    assert cache.store.valid[0, :P].all() and not cache.store.valid[0, P + 3 :].any()
    assert torch.equal(cache.store.valid[1], before[1])  # start = length: the row keeps everything


# ================================================================ the loop end to end

@pytest.mark.parametrize("drafter_cache, drafter_policy", [("dual", "threshold"), ("prefix", "schedule"),
                                                           ("dkv-decode", "factor"), ("none", "schedule")])
def test_no_verification_equals_the_drafter_alone(model, tokenizer, drafter_cache, drafter_policy):
    cfg = dual(rule="no_verification", drafter_cache=drafter_cache, drafter_policy=drafter_policy,
               drafter_threshold=0.3, num_drafter_steps=3)
    res = dualdiffusion_generate(model, tokenizer, PROMPTS, cfg)
    alone = diffusion_generate(model, tokenizer, PROMPTS, cfg.decode)
    assert res.raw_ids == alone.raw_ids and res.texts == alone.texts
    assert res.meter.models["drafter"].nfe == alone.meter.nfe
    assert res.meter.models.get("verifier") is None  # the verifier is never run
    assert res.stats["remasked"] == res.stats["replaced"] == res.stats["finish_filled"] == 0


@pytest.mark.parametrize("n_steps", [1, 3, 16])
def test_identical_verifier_with_exact_match_changes_nothing(model, tokenizer, n_steps):
    """Drafter = the verifier's model without a cache: the stepwise view scores every draft on
    the very canvas it was drafted from, so exact_match accepts everything. verifier_unmask=0: the
    reference's exact_match also lets the verifier decode a masked cell per forward, which would
    (rightly) make the output differ from the drafter's alone."""
    cfg = dual(rule="exact_match", drafter_cache="none", drafter_policy="schedule", num_drafter_steps=n_steps,
               verifier_view="stepwise", verifier_unmask=0)
    res = dualdiffusion_generate(model, tokenizer, PROMPTS, cfg)
    alone = diffusion_generate(model, tokenizer, PROMPTS, cfg.decode)
    assert res.raw_ids == alone.raw_ids
    assert res.stats["remasked"] == 0 and res.stats["guard_fills"] == 0 and res.stats["acceptance_rate"] == 1.0
    d, v = res.meter.models["drafter"], res.meter.models["verifier"]
    assert d.nfe == 16  # the drafter's 16 steps, as alone
    assert v.nfe == math.ceil(16 / n_steps)  # one (batched) verifier forward per iteration
    assert v.sequence_forwards == v.nfe * len(PROMPTS)  # a batched verification advances each prompt once
    assert v.tokens_processed == d.tokens_processed  # ... but computes one full view per drafter step
    assert res.stats["iterations"] == v.nfe
    # so does the masked view when each iteration drafts one step (it is then the same canvas)
    if n_steps == 1:
        again = dualdiffusion_generate(model, tokenizer, PROMPTS, cfg.replace(verifier_view="masked"))
        assert again.raw_ids == alone.raw_ids and again.stats["remasked"] == 0


def test_adaptive_drafter_steps_double_while_everything_is_accepted(model, tokenizer):
    """Accept-all setting of the test above (verifier_unmask=0 for the same reason): the drafter's
    steps go 1, 2, 4, 8, then the last one, so 5 verifier forwards instead of 16, and the output is
    still the drafter's alone."""
    cfg = dual(rule="exact_match", drafter_cache="none", drafter_policy="schedule", num_drafter_steps=1,
               verifier_view="stepwise", adaptive_drafter_steps=True, verifier_unmask=0)
    res = dualdiffusion_generate(model, tokenizer, PROMPTS, cfg)
    assert res.raw_ids == diffusion_generate(model, tokenizer, PROMPTS, cfg.decode).raw_ids
    assert res.stats["iterations"] == res.meter.models["verifier"].nfe == 5
    assert res.meter.models["drafter"].nfe == 16


def test_adaptive_drafter_steps_halve_after_rejections(model, tokenizer):
    """τ = 1 rejects every draft: N goes 4, 2, then 1 for the rest, instead of drafting 4 steps a time."""
    kw = dict(rule="confidence_threshold", rule_threshold=1.0, num_drafter_steps=4)
    fixed = dualdiffusion_generate(model, tokenizer, PROMPTS[:1], dual(**kw))
    res = dualdiffusion_generate(model, tokenizer, PROMPTS[:1], dual(**kw, adaptive_drafter_steps=True))
    assert res.stats["iterations"] == fixed.stats["iterations"] == 16  # the guard still fills one cell each
    assert fixed.stats["drafter_steps"] == 4 * 13 + 3 + 2 + 1  # min(4, cells still masked) each time
    assert res.stats["drafter_steps"] == 4 + 2 + 14


def test_adaptive_drafter_steps_option_parses():
    method, opts = parse_spec("dualdiffusion:adaptive_drafter_steps=true,num_drafter_steps=2")
    assert build_dual_config(**opts).adaptive_drafter_steps is True
    with pytest.raises(ValueError, match="bool"):
        parse_spec("dualdiffusion:adaptive_drafter_steps=sometimes")


def test_kl_of_identical_models_is_zero_at_every_draft(model, tokenizer):
    """Checks the drafter's kept distributions line up cell by cell with the verifier's."""
    cfg = dual(rule="kl_divergence", rule_threshold=1e-4, drafter_cache="none", drafter_policy="schedule",
               num_drafter_steps=4, verifier_view="stepwise")
    res = dualdiffusion_generate(model, tokenizer, PROMPTS, cfg)
    assert res.stats["remasked"] == 0
    assert res.raw_ids == diffusion_generate(model, tokenizer, PROMPTS, cfg.decode).raw_ids


class Echo(nn.Module):
    """A verifier whose logit i is one-hot on input token i: it agrees with any visible draft.
    Under an off-by-one logits shift it would disagree almost everywhere."""

    logits_shifted = False

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.w = nn.Parameter(torch.zeros(1))

    def forward_flops(self, n_query: int, n_keys: int) -> float:
        return float(n_query)

    def forward(self, input_ids, attention_mask=None, **kw):
        return ModelOutput(logits=F.one_hot(input_ids, self.config.embedding_size).float() * 20.0)


def test_logits_are_aligned_not_shifted(model, tokenizer):
    # verifier_unmask=0: Echo's own choice at a masked cell is uniform noise; only drafts are judged here
    cfg = dual(rule="exact_match", num_drafter_steps=2, verifier_unmask=0)
    res = dualdiffusion_generate(Echo(model.config), tokenizer, PROMPTS, cfg, drafter_model=model)
    assert res.stats["remasked"] == 0
    assert res.raw_ids == diffusion_generate(model, tokenizer, PROMPTS, cfg.decode).raw_ids


@pytest.mark.parametrize("rule, thr", [("exact_match", None), ("confidence_threshold", 0.5),
                                       ("disagreement_with_confidence", 0.3), ("kl_divergence", 0.5),
                                       ("unmask_confidence", 0.01), ("trust_verifier", None),
                                       ("disagreement_and_confidence", 0.3), ("verifier_overwrite", None)])
@pytest.mark.parametrize("view", ["drafted", "stepwise", "leftward"])
def test_every_rule_decodes_a_batch_of_different_lengths(model, small, tokenizer, rule, thr, view):
    assert len({len(tokenizer.encode(p)) for p in PROMPTS}) == len(PROMPTS)
    cfg = dual(rule=rule, rule_threshold=thr, num_drafter_steps=2, verifier_view=view)
    res = dualdiffusion_generate(model, tokenizer, PROMPTS, cfg, drafter_model=small, drafter_tokenizer=tokenizer)
    mask = model.config.mask_token_id
    assert len(res.raw_ids) == 3 and all(len(r) == 16 and mask not in r for r in res.raw_ids)
    s, m = res.stats, res.meter
    eos = model.config.eos_token_id
    answers = sum(next((i + 1 for i, t in enumerate(r) if t == eos), len(r)) for r in res.raw_ids)
    assert m.primary == "verifier" and m.sequences == 3 and m.tokens_generated == answers
    assert m.models["drafter"].nfe == s["drafter_steps"]
    assert 1 <= m.models["verifier"].nfe <= s["iterations"] * cfg.num_verifier_steps + (s["finish_filled"] > 0)
    assert m.nfe == m.models["drafter"].nfe + m.models["verifier"].nfe  # the paper's steps
    assert m.flops == pytest.approx(m.models["drafter"].flops + m.models["verifier"].flops)
    assert m.tokens_per_forward == pytest.approx(answers / m.models["verifier"].sequence_forwards)
    assert res.summary()["spec"] == s and res.summary()["config"]["rule"] == rule
    if rule in ("unmask_confidence", "trust_verifier"):  # trust_verifier writes the verifier's candidates
        assert s["verifier_unmasked"] > 0


def test_a_small_drafter_is_cheaper_per_step(model, small, tokenizer):
    res = dualdiffusion_generate(model, tokenizer, PROMPTS[:1], dual(rule="exact_match"), drafter_model=small)
    d, v = res.meter.models["drafter"], res.meter.models["verifier"]
    assert d.flops / d.nfe < v.flops / v.nfe / 2


def test_single_prompt_batches_are_independent_of_batch_size_when_all_is_accepted(model, tokenizer):
    cfg = dual(rule="exact_match", drafter_cache="none", drafter_policy="schedule", verifier_view="stepwise")
    batched = dualdiffusion_generate(model, tokenizer, PROMPTS, cfg)
    for i, p in enumerate(PROMPTS):
        assert dualdiffusion_generate(model, tokenizer, [p], cfg).raw_ids[0] == batched.raw_ids[i]
    split = dualdiffusion_generate(model, tokenizer, PROMPTS, cfg.replace(decode=cfg.decode.replace(batch_size=2)))
    assert split.raw_ids == batched.raw_ids and split.meter.models["verifier"].max_batch == 2 * 4


def test_more_verifier_steps_stop_once_nothing_changes(model, small, tokenizer):
    """verifier_overwrite (formerly trust_verifier, which now keeps drafts as the reference's does)
    re-reads its own replacements: it goes on while they change the canvas. rollback=keep: with
    discard the rolled-back cells would count as changes too."""
    kw = dict(rule="verifier_overwrite", rollback="keep")
    one = dualdiffusion_generate(model, tokenizer, PROMPTS, dual(**kw), drafter_model=small)
    three = dualdiffusion_generate(model, tokenizer, PROMPTS, dual(**kw, num_verifier_steps=3),
                                   drafter_model=small)
    assert one.meter.models["verifier"].nfe == one.stats["iterations"]
    n, it = three.meter.models["verifier"].nfe, three.stats["iterations"]
    assert it < n <= 3 * it
    assert three.stats["replaced"] > one.stats["replaced"]


def test_max_iterations_then_the_verifier_fills_the_rest(model, tokenizer):
    """τ = 1 re-masks every draft; without the guard nothing is ever accepted, so after
    max_iterations one more verifier forward fills all 16 cells with its argmax."""
    cfg = dual(rule="confidence_threshold", rule_threshold=1.0, max_iterations=3, progress_guard=False)
    res = dualdiffusion_generate(model, tokenizer, PROMPTS[:1], cfg)
    assert res.stats["iterations"] == 3 and res.stats["finish_filled"] == 16
    assert res.meter.models["verifier"].nfe == 3 + 1
    # the fill is the verifier's argmax on the all-masked canvas (nothing was accepted before it)
    mc = model.config
    ids = tokenizer.encode(PROMPTS[0])
    x = torch.tensor([ids + [mc.mask_token_id] * 16])
    with torch.no_grad():
        logits = model(x).logits[0, len(ids):]
    logits[:, mc.mask_token_id] = -torch.inf
    assert res.raw_ids[0] == logits.argmax(-1).tolist()


def test_progress_guard_decodes_one_token_per_iteration_at_worst(model, tokenizer):
    cfg = dual(rule="confidence_threshold", rule_threshold=1.0)
    res = dualdiffusion_generate(model, tokenizer, PROMPTS[:1], cfg)
    assert res.stats["finish_filled"] == 0
    assert res.stats["guard_fills"] == res.stats["iterations"] == 16  # exactly one per iteration
    assert model.config.mask_token_id not in res.raw_ids[0]


def test_rollback_truncates_the_drafters_cache(model, tokenizer, monkeypatch):
    from diffspec.speculative import core

    starts = []
    orig = core.DiffusionDrafter.rollback

    def spy(self, start):
        starts.append(start.clone())
        valid_before = self.decoder.cache.store.valid.clone()
        orig(self, start)
        cols = torch.arange(valid_before.shape[1])
        assert torch.equal(self.decoder.cache.store.valid, valid_before & (cols[None] < start[:, None]))

    monkeypatch.setattr(core.DiffusionDrafter, "rollback", spy)
    # verifier_overwrite: the rule that overwrites drafts (trust_verifier no longer does)
    res = dualdiffusion_generate(model, tokenizer, PROMPTS, dual(rule="verifier_overwrite", num_drafter_steps=2))
    assert res.stats["replaced"] > 0 and starts
    T = len(res.raw_ids[0]) + max(len(tokenizer.encode(p)) for p in PROMPTS)
    assert all(((s >= 0) & (s <= T)).all() for s in starts)


# ---------------------------------------------------------------- rollback: discard vs keep

class ScriptedDrafter:
    """Drafts fixed tokens into fixed generation cells (one step per iteration); records rollbacks."""

    def __init__(self, canvas: Canvas, script):
        self.canvas, self.script, self.starts = canvas, list(script), []

    def draft(self, n_steps: int) -> Draft:
        c, P = self.canvas, self.canvas.prompt_len
        cells = torch.zeros_like(c.x, dtype=torch.bool)
        cols, toks = self.script.pop(0) if self.script else ([], [])
        for col, t in zip(cols, toks):
            if c.x[0, P + col] == c.mask_id:
                c.x[0, P + col] = t
                cells[0, P + col] = True
        return Draft(cells, torch.where(cells, 0, -1), None, 1)

    def rollback(self, start: torch.Tensor) -> None:
        self.starts.append(start.clone())


def one_hot_probs(tokens, confs, V=8, mask=7):
    """Per cell: `conf` on the token, the rest spread over the other non-mask tokens."""
    rows = []
    for t, c in zip(tokens, confs):
        rest = (1 - c) / (V - 2)
        rows.append([0.0 if j == mask else (c if j == t else rest) for j in range(V)])
    return rows


class FixedVerifier:
    """Fixed logits on its first call (the verification); argmax 6 everywhere afterwards (the finish fill),
    so the final canvas shows which cells the iteration left masked."""

    def __init__(self, probs, fill=6):
        self.first = logits_from(probs)
        self.after = logits_from(one_hot_probs([fill] * len(probs), [0.9] * len(probs)))
        self.calls = 0

    def score(self, canvas: Canvas, hide: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        lg = self.first if self.calls == 1 else self.after
        return lg.expand(hide.shape[0], -1, -1, -1).clone()


def run_scripted(rule: str, rollback: str, k: int | None = 0):
    """Prompt [5, 6], 6 generation cells, mask 7. One iteration drafts cells 0-4 = [1, 2, 3, 4, 5];
    the verifier's argmax is [1, 2, 0, 4, 5, 6] (cell 2 disagrees; cell 5, never drafted, is its
    most confident mask). The finish fill then writes 6 into whatever the iteration left masked."""
    from diffspec.speculative.dualdiffusion import dual_decode_canvas

    M = 7
    c = Canvas.from_prompts([[5, 6]], 6, mask_id=M, pad_id=0, max_positions=16)
    drafter = ScriptedDrafter(c, [([0, 1, 2, 3, 4], [1, 2, 3, 4, 5])])
    verifier = FixedVerifier(one_hot_probs([1, 2, 0, 4, 5, 6], [0.95, 0.95, 0.95, 0.95, 0.95, 0.97]))
    cfg = build_dual_config(None, rule=rule, rollback=rollback, verifier_unmask=k, max_iterations=1,
                            gen_length=6, block_length=3, steps=6)
    stats = dual_decode_canvas(drafter, verifier, make_rule(rule, None, k), c, cfg)
    return c.x[0, 2:].tolist(), stats, drafter.starts


def test_rollback_discard_masks_everything_drafted_after_the_first_rejection():
    # keep (the old behaviour): the accepted drafts 4, 5 after the rejected cell 2 stay
    x, s, starts = run_scripted("exact_match", "keep")
    assert x == [1, 2, 6, 4, 5, 6] and (s.remasked, s.discarded, s.finish_filled) == (1, 0, 2)
    # discard: cells 3, 4 are drafted after the first rejection, so they go too
    x, s, starts = run_scripted("exact_match", "discard")
    assert x == [1, 2, 6, 6, 6, 6] and (s.remasked, s.discarded, s.finish_filled) == (1, 2, 4)
    assert starts[0].tolist() == [2 + 2]  # the drafter's cache is cut at the first masked cell
    assert s.summary()["acceptance_rate"] == pytest.approx(2 / 5)


def test_rollback_discard_also_drops_the_verifiers_own_cells_after_the_cut():
    # the verifier decodes cell 5 (its most confident mask); keep leaves it, discard drops it
    x, s, _ = run_scripted("exact_match", "keep", k=1)
    assert x == [1, 2, 6, 4, 5, 6] and s.verifier_unmasked == 1 and s.finish_filled == 1
    x, s, _ = run_scripted("exact_match", "discard", k=1)
    assert x == [1, 2, 6, 6, 6, 6] and s.verifier_unmasked == 0 and s.discarded == 2 and s.finish_filled == 4


def test_rollback_discard_keeps_the_verifiers_correction_at_the_cut():
    """verifier_overwrite replaces the first disagreeing draft: that token stays (AR speculative
    decoding's correction token), the drafts after it go."""
    x, s, _ = run_scripted("verifier_overwrite", "keep")
    assert x == [1, 2, 0, 4, 5, 6] and (s.replaced, s.discarded) == (1, 0)
    x, s, _ = run_scripted("verifier_overwrite", "discard")
    assert x == [1, 2, 0, 6, 6, 6] and (s.replaced, s.discarded) == (1, 2)


def test_rollback_without_a_rejection_changes_nothing():
    x, s, starts = run_scripted("trust_verifier", "discard", k=1)
    assert x == [1, 2, 3, 4, 5, 6] and s.discarded == 0 and s.verifier_unmasked == 1 and s.finish_filled == 0


def _drafted_cells_left_after_a_rejection(model, tokenizer, monkeypatch, rollback: str) -> int:
    """Run a configuration that accepts some drafts and rejects others (the self-drafter with its dual
    cache against the masked view), and count, over all iterations, cells drafted in an iteration that
    are still on the canvas at the next one although they lie after that row's first rejected draft."""
    from diffspec.speculative import core

    orig = core.DiffusionDrafter.draft
    seen = {}
    left = []

    def spy(self, n):
        c = self.canvas
        if seen:
            cells, x = seen["cells"], seen["x"]
            cut = torch.where(cells & (c.x != x), torch.arange(c.length), c.length).min(1).values
            after = torch.arange(c.length)[None, :] > cut[:, None]
            left.append(int((cells & after & (c.x != c.mask_id)).sum()))
        d = orig(self, n)
        seen.update(cells=d.cells.clone(), x=c.x.clone())
        return d

    monkeypatch.setattr(core.DiffusionDrafter, "draft", spy)
    cfg = dual(rule="exact_match", verifier_view="masked", num_drafter_steps=4, rollback=rollback)
    res = dualdiffusion_generate(model, tokenizer, PROMPTS, cfg)
    assert 0 < res.stats["remasked"] < res.stats["drafted"] and len(left) > 3
    return sum(left)


def test_discard_leaves_nothing_after_the_first_rejection(model, tokenizer, monkeypatch):
    assert _drafted_cells_left_after_a_rejection(model, tokenizer, monkeypatch, "discard") == 0


def test_keep_leaves_accepted_drafts_after_a_rejection(model, tokenizer, monkeypatch):
    """The check above has teeth: with rollback=keep the same run leaves such cells on the canvas."""
    assert _drafted_cells_left_after_a_rejection(model, tokenizer, monkeypatch, "keep") > 0


def test_rollback_option_parses_validates_and_counts(model, tokenizer):
    assert dual().rollback == "discard"
    with pytest.raises(ValueError, match="unknown rollback 'undo'.*discard, keep"):
        dual(rollback="undo")
    method, opts = parse_spec("dualdiffusion:rollback=keep,verifier_unmask=0")
    assert opts == dict(rollback="keep", verifier_unmask=0)
    cfg = build_config("dualdiffusion", **opts)
    assert cfg.rollback == "keep" and cfg.verifier_unmask == 0 and cfg.to_dict()["rollback"] == "keep"
    kw = dict(rule="exact_match", verifier_view="masked", num_drafter_steps=4)
    keep = generate(PROMPTS, model=model, tokenizer=tokenizer, method="dualdiffusion", rollback="keep", **SHAPE, **kw)
    disc = generate(PROMPTS, model=model, tokenizer=tokenizer, method="dualdiffusion", **SHAPE, **kw)
    assert keep.stats["discarded"] == 0 and disc.stats["discarded"] > 0
    assert disc.config.rollback == "discard" and keep.config.rollback == "keep"


def _cli_knows(flag: str) -> bool:
    from diffspec.cli import build_parser

    _, unknown = build_parser().parse_known_args(["generate", "--prompt", "x", flag, "1"])
    return flag not in unknown


@pytest.mark.skipif(not (_cli_knows("--rollback") and _cli_knows("--verifier-unmask")),
                    reason="diffspec/cli.py does not declare --rollback / --verifier-unmask yet")
def test_cli_generate_takes_rollback_and_verifier_unmask(tiny_checkpoint, capsys):
    base = ["generate", "--prompt", "Tom has 5 pens.", "--model", str(tiny_checkpoint), "--method", "dualdiffusion",
            "--gen-length", "16", "--block-length", "8"]
    assert main(base + ["--rollback", "keep", "--verifier-unmask", "0"]) == 0
    capsys.readouterr()
    assert main(base + ["--rollback", "undo"]) == 2
    assert "unknown rollback" in capsys.readouterr().err


# ================================================================ errors

def test_incompatible_drafters_are_rejected(make_model, model, tokenizer, arith_texts):
    with pytest.raises(ValueError, match="vocabularies differ"):
        check_compatible(make_model(vocab_size=280), model)
    with pytest.raises(ValueError, match="mask_token_id"):
        check_compatible(make_model(mask_token_id=5), model)
    with pytest.raises(ValueError, match="eos_token_id"):
        check_compatible(make_model(eos_token_id=7), model)
    other_tok = train_bpe([t.upper() for t in arith_texts], vocab_size=300)
    assert other_tok.vocab_size == tokenizer.vocab_size
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_compatible(model, model, other_tok, tokenizer)
    shifted = make_model()
    shifted.logits_shifted = True
    with pytest.raises(ValueError, match="shifts its logits"):
        dualdiffusion_generate(model, tokenizer, PROMPTS[:1], dual(), drafter_model=shifted)


@pytest.mark.parametrize("kw, match", [
    (dict(num_drafter_steps=0), "num_drafter_steps must be >= 1"),
    (dict(num_verifier_steps=0), "num_verifier_steps must be >= 1"),
    (dict(max_iterations=0), "max_iterations must be >= 1"),
    (dict(rule="majority"), "unknown rule 'majority'.*exact_match"),
    (dict(verifier_view="sideways"), "unknown verifier_view"),
    (dict(cache="dual"), "drafter_cache"),
    (dict(policy="threshold", threshold=0.5), "drafter_policy, drafter_threshold"),
    (dict(drafter_cache="paged"), "unknown cache 'paged'"),
    (dict(bogus=1), "unknown dualdiffusion option"),
    (dict(drafter=" "), "drafter must be"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        dual(**kw)


def test_dual_options_are_refused_by_other_methods():
    with pytest.raises(ValueError, match="only appl(y|ies) to method 'dualdiffusion'"):
        build_config("vanilla", rule="exact_match")
    with pytest.raises(ValueError, match="drafter= only applies"):
        generate(["x"], method="fast-dllm", drafter="self")


# ================================================================ API, bench and CLI

def test_build_config_presets_and_overrides():
    cfg = build_config("dualdiffusion")
    assert isinstance(cfg, DualConfig)
    assert (cfg.decode.cache, cfg.decode.policy, cfg.decode.threshold) == ("dual", "threshold", 0.9)
    assert cfg.drafter == "self" and cfg.rule == "exact_match" and cfg.num_verifier_steps == 1
    cfg = build_config("dualdiffusion", drafter_cache="dkv-decode", drafter_policy="schedule", gen_length=32,
                       block_length=8, steps=32, rule="confidence_threshold", num_drafter_steps=6)
    assert (cfg.decode.cache, cfg.decode.policy, cfg.decode.gen_length) == ("dkv-decode", "schedule", 32)
    assert cfg.rule_threshold == 0.9 and cfg.num_drafter_steps == 6 and cfg.iterations == 32
    # a base DualConfig keeps its options; a new rule starts from its own default threshold
    again = build_config("dualdiffusion", cfg, rule="kl_divergence")
    assert again.rule_threshold == 1.0 and again.decode.cache == "dkv-decode" and again.num_drafter_steps == 6
    assert build_config("dualdiffusion", cfg, rule="exact_match").rule_threshold is None
    assert cfg.replace(rule="exact_match").rule_threshold is None
    d = cfg.to_dict()
    assert d["decode"]["cache"] == "dkv-decode" and d["rule"] == "confidence_threshold"


def test_api_generate_with_self_object_and_path_drafters(model, small, tokenizer, tmp_path):
    kw = dict(method="dualdiffusion", rule="exact_match", num_drafter_steps=2, **SHAPE)
    a = generate(PROMPTS[:2], model=model, tokenizer=tokenizer, **kw)
    assert a.config.drafter == "self" and set(a.meter.models) == {"drafter", "verifier"}
    b = generate(PROMPTS[:2], model=model, tokenizer=tokenizer, drafter=small, **kw)
    assert b.config.drafter == "<LLaDAModel object>"
    path = save_model(small, tokenizer, tmp_path / "drafter")
    c = generate(PROMPTS[:2], model=model, tokenizer=tokenizer, drafter=path, **kw)
    assert c.config.drafter == str(path) and c.raw_ids == b.raw_ids


def test_bench_specs_parse_label_and_run(tiny_checkpoint, tmp_path, capsys):
    method, opts = parse_spec("dualdiffusion:rule=kl_divergence,rule_threshold=0.5,num_drafter_steps=4,"
                              "drafter=self,drafter_cache=prefix,progress_guard=false")
    assert method == "dualdiffusion"
    assert opts == dict(rule="kl_divergence", rule_threshold=0.5, num_drafter_steps=4, drafter="self",
                        drafter_cache="prefix", progress_guard=False)
    assert label_of(method, opts) == ("dualdiffusion kl_divergence τ=0.5 N=4 drafter=self drafter_cache=prefix "
                                      "progress_guard=False")
    assert label_of("dualdiffusion", {"drafter": "/x/assets/llada-arith-drafter"}) == \
        "dualdiffusion exact_match drafter=llada-arith-drafter"
    for bad, match in [("dualdiffusion:num_drafter_steps=two", "needs a int"),
                       ("dualdiffusion:progress_guard=maybe", "needs a bool"),
                       ("vanilla:rule=exact_match", "bad option")]:
        with pytest.raises(ValueError, match=match):
            parse_spec(bad)
    assert options_for("vanilla", {"rule": "x", "gen_length": 16}) == {"gen_length": 16}
    from diffspec.models.checkpoint import load_model
    m, tok = load_model(tiny_checkpoint)
    r = run_bench(m, tok, ["vanilla:steps=16", "dualdiffusion:rule=exact_match,num_drafter_steps=4"], limit=2,
                  out_dir=tmp_path, overrides={"gen_length": 16, "block_length": 8, "num_verifier_steps": 1})
    rows = r["rows"]
    assert rows[1]["label"] == "dualdiffusion exact_match N=4" and rows[1]["spec"]["iterations"] > 0
    assert set(rows[1]["models"]) == {"drafter", "verifier"} and rows[1]["config"]["num_verifier_steps"] == 1
    assert (tmp_path / "table.md").is_file()
    capsys.readouterr()


def test_cli_generate_dualdiffusion(tiny_checkpoint, small, tokenizer, tmp_path, capsys):
    base = ["generate", "--prompt", "Tom has 5 pens.", "--model", str(tiny_checkpoint), "--method", "dualdiffusion",
            "--gen-length", "16", "--block-length", "8"]
    assert main(base + ["--drafter", "self", "--rule", "confidence_threshold", "--rule-threshold", "0.5",
                        "--num-drafter-steps", "3", "--num-verifier-steps", "2", "--max-iterations", "8",
                        "--drafter-cache", "prefix", "--drafter-policy", "threshold", "--drafter-threshold", "0.5",
                        "--verifier-view", "stepwise", "--no-progress-guard"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "[dualdiffusion] forwards" in err and "drafter" in err and "verifier" in err
    path = save_model(small, tokenizer, tmp_path / "drafter")
    assert main(base + ["--drafter", str(path), "--rule", "exact_match"]) == 0
    capsys.readouterr()


def test_cli_verifier_names_the_model(tiny_checkpoint, tmp_path, capsys):
    base = ["generate", "--prompt", "Tom has 5 pens.", "--gen-length", "16", "--block-length", "8"]
    assert main(base + ["--method", "dualdiffusion", "--verifier", str(tiny_checkpoint)]) == 0
    via_verifier = capsys.readouterr().out
    assert main(base + ["--method", "dualdiffusion", "--model", str(tiny_checkpoint)]) == 0
    assert capsys.readouterr().out == via_verifier
    for extra, match in ((["--method", "vanilla", "--verifier", str(tiny_checkpoint)], "dualdiffusion option"),
                         (["--method", "dualdiffusion", "--verifier", str(tiny_checkpoint), "--model",
                           str(tmp_path / "other")], "name different models")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("diffspec: error: ") and err.count("\n") == 1 and match in err, err


@pytest.mark.parametrize("extra, match", [
    (["--rule", "bogus"], "unknown rule 'bogus'"),
    (["--num-drafter-steps", "0"], "num_drafter_steps must be >= 1"),
    (["--num-verifier-steps", "0"], "num_verifier_steps must be >= 1"),
    (["--max-iterations", "0"], "max_iterations must be >= 1"),
    (["--rule", "confidence_threshold", "--rule-threshold", "1.5"], r"\(0, 1\]"),
    (["--rule", "exact_match", "--rule-threshold", "0.5"], "takes no threshold"),
    (["--threshold", "0.5"], "drafter_threshold"),
    (["--drafter", "/nonexistent/drafter"], "does not exist"),
])
def test_cli_errors_are_one_line_exit_2(tiny_checkpoint, capsys, extra, match):
    rc = main(["generate", "--prompt", "Tom has 5 pens.", "--model", str(tiny_checkpoint), "--method",
               "dualdiffusion", "--gen-length", "16", "--block-length", "8", *extra])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith("diffspec: error: ") and err.count("\n") == 1, err
    assert pytest.importorskip("re").search(match, err)


def test_cli_rejects_a_drafter_with_another_tokenizer(tiny_checkpoint, make_model, arith_texts, tmp_path, capsys):
    other_tok = train_bpe([t.upper() for t in arith_texts], vocab_size=300)
    path = save_model(make_model(seed=3), other_tok, tmp_path / "other")
    rc = main(["generate", "--prompt", "Tom has 5 pens.", "--model", str(tiny_checkpoint), "--method",
               "dualdiffusion", "--drafter", str(path), "--gen-length", "16", "--block-length", "8"])
    _, err = capsys.readouterr()
    assert rc == 2 and "tokenizers differ" in err and err.count("\n") == 1


def test_spec_stats_add_and_summarise():
    a, b = SpecStats(iterations=2, drafted=10, remasked=2, replaced=1), SpecStats(iterations=1, drafted=5)
    a.add(b)
    s = a.summary()
    assert s["iterations"] == 3 and s["drafted"] == 15
    assert s["acceptance_rate"] == pytest.approx(12 / 15) and s["accepted_per_iteration"] == pytest.approx(4.0)
    assert SpecStats().summary()["acceptance_rate"] == 0.0


def test_bench_suites_parse_and_dual_suite_has_both_drafter_kinds():
    from diffspec.bench.runner import parse_spec, suite
    from diffspec.models.checkpoint import DEFAULT_DRAFTER_DIR

    for name in ("steps", "cache", "dual", "psd", "d2sd"):
        for spec in suite(name, "arith"):
            parse_spec(spec)
    drafters = {parse_spec(s)[1].get("drafter") for s in suite("dual", "arith") if s.startswith("dualdiffusion")}
    assert "self" in drafters
    assert (str(DEFAULT_DRAFTER_DIR) in drafters) == (DEFAULT_DRAFTER_DIR / "config.json").is_file()
    with pytest.raises(ValueError, match="unknown suite"):
        suite("fastest", "arith")
