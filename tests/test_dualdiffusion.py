"""DualDiffusion: the speculative core, every verification rule, the loop, its cost, API/CLI/bench wiring.

Rules are tested on hand-built logits; the loop end to end on tiny random
LLaDA models (CPU, fractions of a second each).
"""
from __future__ import annotations

import copy
import math
import signal

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
from diffspec.spec.core import Draft, Verdict, apply_verdict, verifier_views
from diffspec.spec.dualdiffusion import (DualConfig, SpecStats, build_dual_config, check_compatible,
                                         dualdiffusion_generate)
from diffspec.spec.rules import RULES, VerifyInput, make_rule, resolve_threshold

PROMPTS = [
    "Question: Tom has 5 pens.\nAnswer:",
    "Question: Ana has 31 cups. Ana doubles them. How many cups does Ana have now?\nAnswer:",
    "Question: Leo has 9 eggs. How many?\nAnswer:",
]
SHAPE = dict(gen_length=16, block_length=8, steps=16)


@pytest.fixture(autouse=True)
def _deadline():
    """A loop that never terminates fails the test instead of hanging the suite."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def boom(*_):
        raise TimeoutError("test ran over 30 s: does the DualDiffusion loop terminate?")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(30)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


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
    return build_dual_config(None, **{**SHAPE, **kw})


# ================================================================ rules on hand-built logits

def logits_from(probs: list[list[float]]) -> torch.Tensor:
    """(1, L, V) logits whose softmax is `probs` (zeros become -inf)."""
    p = torch.tensor([probs], dtype=torch.float32)
    return torch.where(p > 0, p.log(), torch.tensor(-math.inf))


# Verifier distributions over V = 4 tokens at L = 4 cells:
#   cell 0: confident 0   cell 1: confident 1   cell 2: unsure (0.4 on 2)   cell 3: confident 3
VPROBS = [[0.95, 0.03, 0.01, 0.01], [0.02, 0.96, 0.01, 0.01], [0.3, 0.3, 0.4, 0.0], [0.0, 0.0, 0.05, 0.95]]


def vin(tokens, drafted, probs=VPROBS, dprobs=None, may=None) -> VerifyInput:
    drafted_t = torch.tensor([drafted])
    lp = None
    if dprobs is not None:
        lp = logits_from(dprobs)[0][drafted_t[0]]
    return VerifyInput(torch.tensor([tokens]), drafted_t, logits_from(probs), lp,
                       torch.tensor([may]) if may is not None else None)


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


def test_disagreement_with_confidence_needs_both():
    # cell 0 disagrees (draft 1), verifier confident; cell 2 disagrees, verifier unsure; cell 3 agrees
    v = vin([1, 1, 0, 3], [True, True, True, True])
    assert make_rule("disagreement_with_confidence", 0.9)(v).remask.tolist() == [[True, False, False, False]]
    assert make_rule("disagreement_with_confidence", 0.35)(v).remask.tolist() == [[True, False, True, False]]
    assert make_rule("disagreement_with_confidence", 0.99)(v).remask.tolist() == [[False] * 4]


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


def test_trust_verifier_writes_argmax_over_every_draft():
    out = make_rule("trust_verifier")(vin([1, 1, 0, 2], [True, True, True, False]))
    assert out.commit.tolist() == [[True, False, True, False]]  # cell 1 agrees, cell 3 not drafted
    assert out.tokens[0, [0, 2]].tolist() == [0, 2]
    assert not out.remask.any()


def test_no_verification_does_nothing_and_skips_the_verifier():
    out = make_rule("no_verification")(vin([1, 1, 0, 2], [True] * 4))
    assert not out.remask.any() and not out.commit.any()
    assert not RULES["no_verification"].needs_verifier


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
        cache.begin_block(P, P + 8)
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
    the very canvas it was drafted from, so exact_match accepts everything."""
    cfg = dual(rule="exact_match", drafter_cache="none", drafter_policy="schedule", num_drafter_steps=n_steps,
               verifier_view="stepwise")
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
    """Accept-all setting of the test above: the drafter's steps go 1, 2, 4, 8, then the last one,
    so 5 verifier forwards instead of 16, and the output is still the drafter's alone."""
    cfg = dual(rule="exact_match", drafter_cache="none", drafter_policy="schedule", num_drafter_steps=1,
               verifier_view="stepwise", adaptive_drafter_steps=True)
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
    cfg = dual(rule="exact_match", num_drafter_steps=2)
    res = dualdiffusion_generate(Echo(model.config), tokenizer, PROMPTS, cfg, drafter_model=model)
    assert res.stats["remasked"] == 0
    assert res.raw_ids == diffusion_generate(model, tokenizer, PROMPTS, cfg.decode).raw_ids


@pytest.mark.parametrize("rule, thr", [("exact_match", None), ("confidence_threshold", 0.5),
                                       ("disagreement_with_confidence", 0.3), ("kl_divergence", 0.5),
                                       ("unmask_confidence", 0.01), ("trust_verifier", None)])
@pytest.mark.parametrize("view", ["drafted", "stepwise"])
def test_every_rule_decodes_a_batch_of_different_lengths(model, small, tokenizer, rule, thr, view):
    assert len({len(tokenizer.encode(p)) for p in PROMPTS}) == len(PROMPTS)
    cfg = dual(rule=rule, rule_threshold=thr, num_drafter_steps=2, verifier_view=view)
    res = dualdiffusion_generate(model, tokenizer, PROMPTS, cfg, drafter_model=small, drafter_tokenizer=tokenizer)
    mask = model.config.mask_token_id
    assert len(res.raw_ids) == 3 and all(len(r) == 16 and mask not in r for r in res.raw_ids)
    s, m = res.stats, res.meter
    assert m.primary == "verifier" and m.sequences == 3 and m.tokens_generated == 48
    assert m.models["drafter"].nfe == s["drafter_steps"]
    assert 1 <= m.models["verifier"].nfe <= s["iterations"] * cfg.num_verifier_steps + (s["finish_filled"] > 0)
    assert m.nfe == m.models["drafter"].nfe + m.models["verifier"].nfe  # the paper's steps
    assert m.flops == pytest.approx(m.models["drafter"].flops + m.models["verifier"].flops)
    assert m.tokens_per_forward == pytest.approx(48 / m.models["verifier"].sequence_forwards)
    assert res.summary()["spec"] == s and res.summary()["config"]["rule"] == rule
    if rule == "unmask_confidence":
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
    """trust_verifier re-reads its own replacements: it goes on while they change the canvas."""
    one = dualdiffusion_generate(model, tokenizer, PROMPTS, dual(rule="trust_verifier"), drafter_model=small)
    three = dualdiffusion_generate(model, tokenizer, PROMPTS, dual(rule="trust_verifier", num_verifier_steps=3),
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
    from diffspec.spec import core

    starts = []
    orig = core.DiffusionDrafter.rollback

    def spy(self, start):
        starts.append(start.clone())
        valid_before = self.decoder.cache.store.valid.clone()
        orig(self, start)
        cols = torch.arange(valid_before.shape[1])
        assert torch.equal(self.decoder.cache.store.valid, valid_before & (cols[None] < start[:, None]))

    monkeypatch.setattr(core.DiffusionDrafter, "rollback", spy)
    res = dualdiffusion_generate(model, tokenizer, PROMPTS, dual(rule="trust_verifier", num_drafter_steps=2))
    assert res.stats["replaced"] > 0 and starts
    T = len(res.raw_ids[0]) + max(len(tokenizer.encode(p)) for p in PROMPTS)
    assert all(((s >= 0) & (s <= T)).all() for s in starts)


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
