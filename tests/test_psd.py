"""PSD: policies, nested drafts, hierarchical / greedy-chain acceptance, the loop, caches, wiring.

Pure pieces are tested on hand-built confidences and verifier outputs; the
loop on tiny random LLaDA models; the lossless variant against vanilla greedy
on a tiny model (batch of different prompt lengths) and on 50 `arith` prompts
with the bundled model.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from diffspec.api import build_config, generate
from diffspec.bench.runner import label_of, parse_spec, run_bench, suite
from diffspec.cli import main
from diffspec.decoding.config import DecodeConfig
from diffspec.decoding.diffusion import decode_canvas, diffusion_generate
from diffspec.decoding.meter import CostMeter, MeteredModel
from diffspec.decoding.policies import select_local
from diffspec.decoding.state import Canvas
from diffspec.speculative.psd import (PSDConfig, ViewScorer, build_psd_config, greedy_chain_accept, hierarchical_accept,
                                     leftmost_first, nested_drafts, psd_decode_canvas, psd_generate)

NEG = -math.inf
PROMPTS = ["Tom has 5 pens.", "Ana has 12 cards. Ana gets 3 more. How many cards does Ana have now?", "Sam"]


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(seed=3)


# ================================================================ pure pieces

def test_local_policy_relaxes_only_next_to_an_anchor():
    conf = torch.tensor([[0.95, 0.8, 0.75, 0.8, NEG, 0.6],
                         [0.5, 0.6, 0.4, NEG, 0.3, 0.2]], dtype=torch.float64)
    sel = select_local(conf, threshold=0.9, local_threshold=0.7, radius=1)
    # row 0: anchor at 0; its neighbour 1 (0.8) passes the relaxed bar; 3 (0.8) is not next to an anchor
    assert sel[0].tolist() == [True, True, False, False, False, False]
    # row 1: no anchor, so only the single best cell
    assert sel[1].tolist() == [False, True, False, False, False, False]
    wide = select_local(conf[:1], threshold=0.9, local_threshold=0.7, radius=2)
    assert wide[0].tolist() == [True, True, True, False, False, False]


def test_nested_drafts_follow_one_ranking_and_nest():
    conf = torch.tensor([[0.5, NEG, 0.9, 0.7, 0.6],
                         [0.3, 0.3, NEG, NEG, NEG]], dtype=torch.float64)
    d = nested_drafts(conf, [1, 3])
    assert d.shape == (2, 2, 5)
    assert d[0, 0].tolist() == [False, False, True, False, False]
    assert d[1, 0].tolist() == [False, False, True, True, True]
    assert d[0, 1].tolist() == [True, False, False, False, False]  # tie goes to the lower column
    assert d[1, 1].tolist() == [True, True, False, False, False]  # capped at the 2 candidates
    assert bool((d[1] >= d[0]).all())


def test_nested_draft_ties_go_to_the_lower_column_even_in_long_rows():
    """torch's unstable sort reorders equal keys from 17 elements on; the drafts must not."""
    conf = torch.full((1, 40), 0.5, dtype=torch.float64)
    conf[0, 30] = 0.9
    d = nested_drafts(conf, [1, 4])
    assert d[0, 0].nonzero().flatten().tolist() == [30]
    assert d[1, 0].nonzero().flatten().tolist() == [0, 1, 2, 30]


def test_hierarchical_acceptance_keeps_the_deepest_consistent_draft():
    drafts = torch.tensor([[[0, 1, 0, 0, 0]], [[0, 1, 1, 1, 0]], [[1, 1, 1, 1, 1]]], dtype=torch.bool)
    tokens = torch.tensor([[10, 11, 12, 13, 14]])

    def pred(*rows):
        return torch.tensor([[r] for r in rows])

    ok = [10, 11, 12, 13, 14]
    assert hierarchical_accept(drafts, tokens, pred(ok, ok, ok)).tolist() == [3]
    # view 1 predicts something else at cell 3, which draft 2 adds: stop at draft 1
    assert hierarchical_accept(drafts, tokens, pred(ok, [10, 11, 12, 99, 14], ok)).tolist() == [1]
    # view 0 disagrees with draft 1's only cell: nothing is kept
    assert hierarchical_accept(drafts, tokens, pred([10, 99, 12, 13, 14], ok, ok)).tolist() == [0]
    # a disagreement at a cell the next draft does not add is irrelevant
    assert hierarchical_accept(drafts, tokens, pred([99, 11, 99, 99, 99], [99, 11, 12, 13, 99], ok)).tolist() == [3]
    # a capped draft that adds nothing is not deeper
    capped = torch.stack([drafts[0], drafts[1], drafts[1]])
    assert hierarchical_accept(capped, tokens, pred(ok, ok, ok)).tolist() == [2]


def test_acceptance_with_a_confidence_requirement_stops_at_an_unsure_cell():
    drafts = torch.tensor([[[0, 1, 0, 0, 0]], [[0, 1, 1, 1, 0]], [[1, 1, 1, 1, 1]]], dtype=torch.bool)
    tokens = torch.tensor([[10, 11, 12, 13, 14]])
    ok = torch.tensor([[[10, 11, 12, 13, 14]]] * 3)
    sure = torch.ones(3, 1, 5, dtype=torch.bool)
    assert hierarchical_accept(drafts, tokens, ok, sure).tolist() == [3]
    unsure = sure.clone()
    unsure[1, 0, 3] = False  # view 1 agrees at cell 3 (added by draft 2) but is not confident there
    assert hierarchical_accept(drafts, tokens, ok, unsure).tolist() == [1]
    unsure = sure.clone()
    unsure[1, 0, 0] = False  # an unsure cell that draft 2 does not add does not matter
    assert hierarchical_accept(drafts, tokens, ok, unsure).tolist() == [3]


def test_accept_threshold_accepts_fewer_drafts_on_the_bundled_model():
    from diffspec.models.checkpoint import load_model
    from diffspec.tasks import arith_examples

    m, tok = load_model()
    prompts = [e.prompt for e in arith_examples("test", 4, seed=0)]
    base = build_psd_config(gen_length=48, block_length=16, threshold=1.0, batch_size=4)
    plain = psd_generate(m, tok, prompts, base)
    tiny = psd_generate(m, tok, prompts, base.replace(accept_threshold=1e-12))
    strict = psd_generate(m, tok, prompts, base.replace(accept_threshold=0.99))
    never = psd_generate(m, tok, prompts, base.replace(accept_threshold=1.0))
    assert tiny.raw_ids == plain.raw_ids and tiny.stats == plain.stats  # argmax already has p > 0
    assert never.stats["accepted"] <= strict.stats["accepted"] < plain.stats["accepted"]
    assert strict.meter.nfe > plain.meter.nfe


def test_position_order_drafts_the_leftmost_draftable_cells():
    conf = torch.tensor([[0.9, -math.inf, 0.2, 0.95, 0.1, -math.inf]])
    drafts = nested_drafts(leftmost_first(conf), (1, 2, 3))
    assert drafts.int().tolist() == [[[1, 0, 0, 0, 0, 0]], [[1, 0, 1, 0, 0, 0]], [[1, 0, 1, 1, 0, 0]]]
    # the confidence order of the same cells, for contrast
    assert nested_drafts(conf, (1,)).int().tolist() == [[[0, 0, 0, 1, 0, 0]]]


def test_position_order_on_the_bundled_model_checks_drafts_left_to_right():
    """With tau = 1 only the top cell is committed unverified; every other cell is a left-to-right
    draft that the next view must predict. On 8 problems that decodes every answer correctly, with
    far fewer forwards than the 48 of one-token decoding, and drafts other cells than PSD's order."""
    from diffspec.models.checkpoint import load_model
    from diffspec.tasks import arith_examples, score

    m, tok = load_model()
    ex = arith_examples("test", 8, seed=0)
    base = build_psd_config(gen_length=48, block_length=16, threshold=1.0, batch_size=8, depths=tuple(range(1, 9)))
    pos = psd_generate(m, tok, [e.prompt for e in ex], base.replace(draft_order="position"))
    conf = psd_generate(m, tok, [e.prompt for e in ex], base)
    assert pos.stats["accepted"] != conf.stats["accepted"]  # the order changed what was drafted
    assert all(score(e, t)["correct"] for e, t in zip(ex, pos.texts))
    assert pos.stats["acceptance_rate"] > 0.8 and pos.meter.summary()["nfe_per_sequence"] < 16


def test_drafts_and_acceptance_stay_on_the_device_of_their_inputs():
    """Helper tensors are made on the inputs' device: on PyTorch's data-free "meta" device (a
    stand-in for CUDA that runs on any machine) a CPU-made one would be an error."""
    conf = torch.rand(2, 6, dtype=torch.float64, device="meta")
    drafts = nested_drafts(conf, [1, 3])
    assert drafts.device.type == "meta" and drafts.dtype == torch.bool and drafts.shape == (2, 2, 6)
    tokens = torch.zeros(2, 6, dtype=torch.long, device="meta")
    best = hierarchical_accept(drafts, tokens, torch.zeros(3, 2, 6, dtype=torch.long, device="meta"))
    assert best.device.type == "meta" and best.dtype == torch.long and best.shape == (2,)
    best = greedy_chain_accept(drafts, tokens, torch.zeros(3, 2, 6, 10, device="meta"),
                               torch.ones(2, 6, dtype=torch.bool, device="meta"))
    assert best.device.type == "meta" and best.dtype == torch.long and best.shape == (2,)


def _logits_for(best_cells: list[int], tokens: list[int], L: int = 4, V: int = 6) -> torch.Tensor:
    """(L, V) logits whose greedy choice is cell best_cells[0] with tokens[cell] (others less confident)."""
    out = torch.zeros(L, V)
    for c in range(L):
        out[c, tokens[c]] = 1.0
    out[best_cells[0], tokens[best_cells[0]]] = 5.0
    return out


def test_greedy_chain_accepts_only_exact_greedy_steps():
    tokens = torch.tensor([[1, 2, 3, 4]])
    drafts = torch.tensor([[[0, 0, 1, 0]], [[0, 1, 1, 0]]], dtype=torch.bool)  # adds cell 2, then cell 1
    cand = torch.ones(1, 4, dtype=torch.bool)
    good = torch.stack([_logits_for([2], [1, 2, 3, 4]), _logits_for([1], [1, 2, 3, 4]),
                        _logits_for([0], [1, 2, 3, 4])])[:, None]
    assert greedy_chain_accept(drafts, tokens, good, cand).tolist() == [2]
    # view 1 would pick cell 3 next, not cell 1: only draft 1 survives
    wrong_cell = good.clone()
    wrong_cell[1, 0] = _logits_for([3], [1, 2, 3, 4])
    assert greedy_chain_accept(drafts, tokens, wrong_cell, cand).tolist() == [1]
    # view 0 picks cell 2 but with another token: nothing survives
    wrong_token = good.clone()
    wrong_token[0, 0] = _logits_for([2], [1, 2, 5, 4])
    assert greedy_chain_accept(drafts, tokens, wrong_token, cand).tolist() == [0]


def test_greedy_chain_is_per_row():
    """Row 0: both greedy steps match. Row 1: view 0 picks cell 2 with another token. Row 2: view 1
    picks cell 3, not draft 2's cell 1."""
    tokens = torch.tensor([[1, 2, 3, 4]] * 3)
    drafts = torch.tensor([[[0, 0, 1, 0]] * 3, [[0, 1, 1, 0]] * 3], dtype=torch.bool)
    good = [_logits_for([2], [1, 2, 3, 4]), _logits_for([1], [1, 2, 3, 4]), _logits_for([0], [1, 2, 3, 4])]
    rows = [good, [_logits_for([2], [1, 2, 5, 4])] + good[1:], [good[0], _logits_for([3], [1, 2, 3, 4]), good[2]]]
    logits = torch.stack([torch.stack([rows[b][j] for b in range(3)]) for j in range(3)])  # (J+1, B, L, V)
    assert greedy_chain_accept(drafts, tokens, logits, torch.ones(3, 4, dtype=torch.bool)).tolist() == [2, 0, 1]


def test_greedy_chain_ignores_cells_greedy_cannot_pick():
    """Greedy decoding on view j-1 picks among the cells still masked there: never a non-candidate
    (cell 0, decoded before this iteration) nor a cell an earlier draft filled, however confident."""
    tokens = torch.tensor([[1, 2, 3, 4]])
    drafts = torch.tensor([[[0, 0, 1, 0]], [[0, 1, 1, 0]]], dtype=torch.bool)  # adds cell 2, then cell 1
    cand = torch.tensor([[False, True, True, True]])

    def view(scores: dict[int, float]) -> torch.Tensor:
        out = torch.zeros(4, 6)
        for c in range(4):
            out[c, int(tokens[0, c])] = scores.get(c, 1.0)
        return out

    logits = torch.stack([view({0: 9.0, 2: 5.0}), view({2: 9.0, 1: 5.0}), view({})])[:, None]
    assert greedy_chain_accept(drafts, tokens, logits, cand).tolist() == [2]


# ================================================================ the loop on a hand-built model: exact counts

V_ORACLE, MASK_ORACLE, PAD_ORACLE, WRONG = 16, 15, 0, 14


class _Oracle(torch.nn.Module):
    """A model whose predictions are written by hand, so every PSD count is known exactly.

    At generation column p it predicts `targets[row][p]` with logit 3 - 0.1·p (every other token
    0): confidences fall with the column (0.6 down to 0.24, below the 0.9 threshold: the policy commits
    one cell per iteration) and greedy order is left to right. `depends[row] = (q, r)`: while
    column r is still masked, column q predicts WRONG instead, with the same confidence, so a
    draft made before r is filled is wrong at q and the verification of a view that fills r
    rejects it.
    """

    def __init__(self, prompt_len: int, targets: list[list[int]], depends: list[tuple[int, int] | None]):
        super().__init__()
        self.config = SimpleNamespace(n_layers=1, mask_token_id=MASK_ORACLE, eos_token_id=PAD_ORACLE,
                                      pad_token_id=PAD_ORACLE)
        self.P, self.targets, self.depends = prompt_len, targets, depends

    def forward_flops(self, n_query: int, n_keys: int) -> int:
        return 0

    def forward(self, input_ids, attention_mask=None, kv_cache=None, positions=None):
        n, T = input_ids.shape  # n = views x rows, row-major in the views
        cols = positions.tolist() if positions is not None else list(range(T))
        logits = torch.zeros(n, T, V_ORACLE)
        for i in range(n):
            row = i % len(self.targets)
            for j, c in enumerate(cols):
                p = c - self.P
                if p < 0:
                    continue
                tok = self.targets[row][p]
                dep = self.depends[row]
                if dep is not None and p == dep[0]:
                    r = cols.index(dep[1] + self.P)  # the verifier must see column r
                    if input_ids[i, r] == MASK_ORACLE:
                        tok = WRONG
                logits[i, j, tok] = 3.0 - 0.1 * p
        return SimpleNamespace(logits=logits)


def _oracle_run(cfg: PSDConfig):
    targets = [[(3 * row + p) % 13 + 1 for p in range(16)] for row in range(2)]
    oracle = _Oracle(2, targets, [(5, 3), None])  # row 0: column 5 is right only once column 3 is filled
    canvas = Canvas.from_prompts([[3, 4], [5, 6]], 16, MASK_ORACLE, PAD_ORACLE, 64)
    greedy = Canvas.from_prompts([[3, 4], [5, 6]], 16, MASK_ORACLE, PAD_ORACLE, 64)
    meter = CostMeter()
    with torch.inference_mode():
        stats = psd_decode_canvas(MeteredModel(oracle, meter), canvas, cfg)
        decode_canvas(MeteredModel(oracle, CostMeter()), greedy, DecodeConfig(gen_length=16, block_length=8, steps=16),
                      None)
    assert canvas.x[:, 2:].tolist() == greedy.x[:, 2:].tolist() == targets  # one-token greedy writes the targets
    return stats, meter.models["model"]


@pytest.mark.parametrize("cache, seeds", [("none", 1), ("prefix", 2), ("dual", 2)])
def test_psd_loop_keeps_the_deepest_consistent_draft_on_a_hand_built_model(cache, seeds):
    """gen 16, block 8, depths 1..6, threshold 0.9 (one commit per iteration). Block 0:
    it 1 commits column 0 in both rows and drafts columns 1-6; row 1 keeps all 6, row 0 only
    depth 4 (view 4 fills column 3, so it predicts the right token at column 5 where draft 5
    put WRONG). It 2 commits column 5 (row 0) / 7 (row 1); row 0 keeps its 2 remaining drafts,
    row 1 has none. Block 1: it 1 commits column 8 and keeps 6 drafts per row; it 2 commits
    column 15 and, with nothing left to draft, needs no verification."""
    cfg = PSDConfig(decode=DecodeConfig(gen_length=16, block_length=8, steps=16, policy="threshold",
                                        threshold=0.9, cache=cache), depths=(1, 2, 3, 4, 5, 6))
    stats, calls = _oracle_run(cfg)
    assert (stats.iterations, stats.committed, stats.accepted, stats.drafted, stats.seed_forwards) == \
        (6, 8, 4 + 6 + 2 + 12, 12 + 2 + 12, seeds)
    assert calls.nfe == seeds + 3  # vanilla greedy needs 16
    assert calls.max_batch == 7 * 2  # view 0 + six drafts per row


def test_lossless_psd_on_a_hand_built_model_stops_where_greedy_would_differ():
    """Lossless, depths 1..7. Block 0: row 0 keeps depths 1-4 (greedy on view 4 writes the
    right token at column 5, not draft 5's WRONG), row 1 all 7; then row 0 commits column 5
    and keeps 2 more. Block 1: both rows commit column 8 and keep all 7 drafts."""
    stats, calls = _oracle_run(build_psd_config(gen_length=16, block_length=8, lossless=True))
    assert (stats.iterations, stats.committed, stats.accepted, stats.drafted, stats.seed_forwards) == \
        (5, 5, 4 + 7 + 2 + 14, 14 + 2 + 14, 1)
    assert calls.nfe == 4


def test_hierarchical_acceptance_is_per_row():
    drafts = torch.tensor([[[1, 0, 0, 0], [0, 0, 1, 0]],
                           [[1, 1, 0, 0], [0, 1, 1, 0]],
                           [[1, 1, 1, 0], [1, 1, 1, 1]]], dtype=torch.bool)  # (J=3, B=2, L=4)
    tokens = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    ok, bad2, bad3 = [5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 9]
    # view 2 of row 0 predicts 9 at cell 2, which draft 3 adds: row 0 keeps depth 2, row 1 all 3
    pred = torch.tensor([[ok, ok], [ok, ok], [bad2, ok], [ok, ok]])
    assert hierarchical_accept(drafts, tokens, pred).tolist() == [2, 3]
    # view 0 of row 0 disagrees with draft 1; view 2 of row 1 disagrees at cell 3 (draft 3 adds cells 0 and 3)
    pred = torch.tensor([[[9, 6, 7, 8], ok], [ok, ok], [ok, bad3], [ok, ok]])
    assert hierarchical_accept(drafts, tokens, pred).tolist() == [0, 2]
    # row 1 has a single candidate, so its deeper drafts add nothing: it stops at depth 1 while row 0 goes on
    capped = drafts.clone()
    capped[:, 1] = torch.tensor([0, 0, 1, 0], dtype=torch.bool)
    pred = torch.tensor([[ok, ok]] * 4)
    assert hierarchical_accept(capped, tokens, pred).tolist() == [3, 1]


# ================================================================ the loop

def _vanilla_greedy(model, tokenizer, prompts, **kw):
    cfg = DecodeConfig(**{"gen_length": 16, "block_length": 8, "steps": 16, **kw})
    return diffusion_generate(model, tokenizer, prompts, cfg)


def test_lossless_equals_vanilla_greedy_on_a_batch(model, tokenizer):
    van = _vanilla_greedy(model, tokenizer, PROMPTS)
    for depths in [(1,), (1, 2, 3), (1, 2, 3, 4, 5, 6, 7)]:
        res = psd_generate(model, tokenizer, PROMPTS, build_psd_config(
            gen_length=16, block_length=8, lossless=True, depths=depths))
        assert res.raw_ids == van.raw_ids
        assert res.meter.nfe <= van.meter.nfe
    one = psd_generate(model, tokenizer, PROMPTS[1:2], build_psd_config(gen_length=16, block_length=8, lossless=True))
    assert one.raw_ids == van.raw_ids[1:2]


def _lossless_on_arith(n: int, depths: tuple[int, ...]) -> None:
    from diffspec.models.checkpoint import load_model
    from diffspec.tasks import arith_examples

    m, tok = load_model()
    prompts = [e.prompt for e in arith_examples("test", n, seed=0)]
    van = diffusion_generate(m, tok, prompts, DecodeConfig(gen_length=48, block_length=16, steps=48, batch_size=n))
    res = psd_generate(m, tok, prompts, build_psd_config(gen_length=48, block_length=16, lossless=True,
                                                         depths=depths, batch_size=n))
    assert res.raw_ids == van.raw_ids
    assert res.meter.models["model"].sequence_forwards < van.meter.models["model"].sequence_forwards
    s = res.stats
    assert s["accepted"] > 0 and s["committed"] + s["accepted"] == 48 * n
    assert res.meter.models["model"].sequence_forwards == s["iterations"] + s["seed_forwards"] * n


def test_lossless_equals_vanilla_greedy_on_arith_prompts():
    _lossless_on_arith(12, (1, 2, 3))


def test_psd_drafts_do_most_of_the_work_on_the_bundled_model():
    """τ = 1 commits one cell per iteration, so every further cell is an accepted draft: the
    trained model's verification agrees with most drafts (0.92 of drafted cells on 4 prompts),
    and PSD needs far fewer forwards than the 48 per sequence of one-token greedy decoding."""
    from diffspec.models.checkpoint import load_model
    from diffspec.tasks import arith_examples

    m, tok = load_model()
    prompts = [e.prompt for e in arith_examples("test", 4, seed=0)]
    res = psd_generate(m, tok, prompts, build_psd_config(gen_length=48, block_length=16, threshold=1.0,
                                                         batch_size=4))
    s = res.stats
    assert s["committed"] + s["accepted"] == 48 * 4
    assert s["accepted"] > s["committed"] and s["acceptance_rate"] > 0.5
    assert res.meter.models["model"].sequence_forwards < 48 * 4 / 2


@pytest.mark.slow
def test_lossless_equals_vanilla_greedy_on_50_arith_prompts():
    """The issue's bar (≥ 50 prompts, default depths 1..7); minutes on 2 CPU cores, so marked slow."""
    _lossless_on_arith(50, tuple(range(1, 8)))


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("policy", ["threshold", "factor", "local"])
def test_psd_decodes_every_cell_with_every_cache_and_policy(model, tokenizer, cache, policy):
    cfg = build_psd_config(gen_length=16, block_length=8, cache=cache, policy=policy, depths=(1, 3, 5))
    res = psd_generate(model, tokenizer, PROMPTS, cfg)
    assert all(model.config.mask_token_id not in r for r in res.raw_ids)
    assert len(res.raw_ids[0]) == 16
    s = res.stats
    assert s["committed"] + s["accepted"] == 16 * len(PROMPTS)
    assert s["accepted"] > 0  # the tiny model's verifications agree with some drafts
    assert res.meter.models["model"].max_batch == 4 * len(PROMPTS)  # view 0 + three drafts per prompt
    again = psd_generate(model, tokenizer, PROMPTS, cfg)
    assert again.raw_ids == res.raw_ids  # deterministic


def test_threshold_one_with_depth_one_is_greedy_at_one_token_per_view(model, tokenizer):
    """τ = 1 commits one cell per iteration and depth 1 drafts one more, so an iteration fills
    one or two cells: every cell is committed or an accepted draft, and accepted drafts are
    what saves forwards against one-token greedy decoding (16 per sequence)."""
    res = psd_generate(model, tokenizer, PROMPTS, build_psd_config(gen_length=16, block_length=8, threshold=1.0,
                                                                   depths=(1,)))
    s = res.stats
    assert s["committed"] + s["accepted"] == 16 * len(PROMPTS)
    assert s["accepted"] > 0 and s["accepted"] <= s["iterations"] == s["drafted"]  # at most one draft per iteration
    forwards = res.meter.models["model"].sequence_forwards
    assert forwards == s["iterations"] + len(PROMPTS) * s["seed_forwards"] < 16 * len(PROMPTS)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_shared_kv_views_equal_full_forwards_on_an_unchanged_canvas(model, tokenizer, cache):
    """With the canvas unchanged since the seed, every stored K/V is what a full
    forward computes, so cached views must reproduce full-forward logits."""
    ids = [tokenizer.encode(p) for p in PROMPTS]
    canvas = Canvas.from_prompts(ids, 16, model.config.mask_token_id, model.config.pad_token_id, 128)
    P = canvas.prompt_len
    canvas.x[:, P : P + 3] = torch.tensor([5, 6, 7])  # something decoded before the block
    meter = CostMeter()
    scorer = ViewScorer(MeteredModel(model, meter), canvas, cache)
    s, e = canvas.block_bounds(1, 8)
    scorer.seed(s, e, working=3)
    views = canvas.x[None].repeat(2, 1, 1)
    logits, n = scorer.verify(views, working=3)
    full = model(canvas.x, attention_mask=canvas.attention_mask).logits[:, s : s + n]
    full = full.index_fill(-1, torch.tensor([canvas.mask_id]), -torch.inf)
    for k in range(2):
        assert torch.allclose(logits[k], full, atol=1e-5, equal_nan=True)
    assert n == (canvas.length - s if cache == "prefix" else 8)
    assert meter.models["model"].nfe == 2 and meter.models["model"].max_batch == 6


def test_batched_verification_counts_one_forward_per_call(model, tokenizer):
    res = psd_generate(model, tokenizer, PROMPTS[:1], build_psd_config(gen_length=16, block_length=8,
                                                                      depths=(1, 3)))
    c = res.meter.models["model"]
    assert c.nfe == res.stats["iterations"] + res.stats["seed_forwards"]
    assert c.sequence_forwards == c.nfe  # one prompt: each call advances it once
    assert res.meter.tokens_per_forward == pytest.approx(16 / c.nfe)


# ================================================================ options and errors

@pytest.mark.parametrize("kw, match", [
    (dict(depths=()), "depths is empty"),
    (dict(depths=(3, 1)), "strictly increasing"),
    (dict(depths=(1, 1)), "strictly increasing"),
    (dict(depths=(0, 2)), ">= 1"),
    (dict(depths=(1, 16)), "does not fit a block of 16"),
    (dict(depths="1,x"), "comma-separated integers"),
    (dict(threshold=1.5), r"threshold must be in \(0, 1\]"),
    (dict(threshold=0.0), r"threshold must be in \(0, 1\]"),
    (dict(policy="local", local_threshold=0.95), "local_threshold"),
    (dict(policy="schedule"), "adaptive policy"),
    (dict(cache="dkv-decode"), "supports caches"),
    (dict(temperature=0.5), "temperature 0"),
    (dict(remasking="random"), "low_confidence"),
    (dict(lossless=True, cache="dual"), "needs cache 'none'"),
    (dict(lossless=True, depths=(1, 3)), "depths must be 1..D"),
    (dict(lossless=True, policy="threshold"), "does not take policy"),
    (dict(speed="max"), "unknown psd option"),
    (dict(accept_threshold=1.5), r"accept_threshold must be in \[0, 1\]"),
    (dict(accept_threshold=float("nan")), "accept_threshold"),
    (dict(lossless=True, accept_threshold=0.5), "does not take accept_threshold"),
    (dict(draft_order="random"), "draft_order must be one of"),
    (dict(lossless=True, draft_order="position"), "greedy order"),
])
def test_psd_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        build_psd_config(**kw)


def test_psd_options_and_presets():
    cfg = build_config("psd")
    assert isinstance(cfg, PSDConfig) and cfg.depths == (1, 3, 5, 7) and cfg.decode.policy == "threshold"
    loss = build_config("psd", lossless=True, gen_length=32)
    assert loss.depths == tuple(range(1, 8)) and loss.decode.steps == 32
    assert build_config("psd", base=cfg, depths="2,4").depths == (2, 4)
    with pytest.raises(ValueError, match="only applies to method 'psd'"):
        build_config("fast-dllm", depths=(1, 2))
    with pytest.raises(ValueError, match="only applies to method 'dualdiffusion'"):
        build_config("psd", rule="exact_match")
    with pytest.raises(ValueError, match="cannot start from a PSDConfig"):
        build_config("vanilla", base=cfg)
    d = cfg.to_dict()
    assert d["depths"] == [1, 3, 5, 7] and d["decode"]["threshold"] == 0.9


def test_bench_psd_specs_parse_and_run(tiny_checkpoint, tmp_path, capsys):
    method, opts = parse_spec("psd:policy=local,depths=1;3;5,lossless=false")
    assert method == "psd" and opts == {"policy": "local", "depths": (1, 3, 5), "lossless": False}
    assert label_of(method, opts) == "psd policy=local depths=1,3,5 lossless=False"
    assert any(s.startswith("psd:lossless") for s in suite("psd", "arith"))
    from diffspec.models.checkpoint import load_model

    m, tok = load_model(tiny_checkpoint)
    r = run_bench(m, tok, ["vanilla:steps=16", "psd:lossless=true", "psd:depths=1;3"], limit=3, out_dir=tmp_path,
                  overrides={"gen_length": 16, "block_length": 8})
    rows = r["rows"]
    assert rows[1]["bench_spec"] == "psd:lossless=true" and rows[1]["accuracy"] == rows[0]["accuracy"]
    assert rows[1]["same_ids_as_baseline"] == 1.0 and 0.0 <= rows[2]["same_ids_as_baseline"] <= 1.0
    assert rows[2]["spec"]["iterations"] > 0 and rows[2]["config"]["depths"] == [1, 3]  # the stats survive
    capsys.readouterr()


def test_cli_generate_psd(tiny_checkpoint, capsys):
    base = ["generate", "--prompt", "Tom has 5 pens.", "--model", str(tiny_checkpoint), "--gen-length", "16",
            "--block-length", "8"]
    assert main(base + ["--method", "vanilla"]) == 0
    greedy = capsys.readouterr().out
    assert main(base + ["--method", "psd", "--lossless"]) == 0
    out = capsys.readouterr()
    assert out.out == greedy and "[psd]" in out.err
    assert main(base + ["--method", "psd", "--policy", "local", "--depths", "1,2", "--cache", "dual"]) == 0
    capsys.readouterr()
    assert main(base + ["--method", "psd", "--depths", "5,3"]) == 2
    assert "strictly increasing" in capsys.readouterr().err
    assert main(base + ["--method", "fast-dllm", "--lossless"]) == 2
    assert "only applies to method 'psd'" in capsys.readouterr().err


def test_api_generate_psd(model, tokenizer):
    res = generate(PROMPTS[:2], model=model, tokenizer=tokenizer, method="psd", gen_length=16, block_length=8,
                   lossless=True)
    van = _vanilla_greedy(model, tokenizer, PROMPTS[:2])
    assert res.texts == van.texts and res.summary()["spec"]["iterations"] > 0
