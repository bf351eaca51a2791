"""PSD and DualDiffusion within a block of a block-causal model (`speculative.block`, issue #39 item 4).

The reference loops here are written from the methods' descriptions (speculative.psd and
speculative.dualdiffusion's docstrings, restricted to one block) over the plain-torch LLaDA2
forward of tests/test_llada2.py, recomputing the whole window block-causally for every view, one
view per forward: they share no code with `speculative.block` or its exact cache. diffspec's runs
must decode the same ids with the cache and without it, and spend the forwards the loops spend.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffspec.decoding.config import DecodeConfig
from diffspec.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModel
from diffspec.speculative.dualdiffusion import DualConfig, dualdiffusion_generate
from diffspec.speculative.psd import PSDConfig, psd_generate
from test_llada2 import EOS, MASK, PROMPTS, ckpt, loaded, ref_config, ref_forward, ref_state  # noqa: F401

G, L = 24, 8


def _window_forward(ckpt):
    W, c = ref_state(ckpt), ref_config(ckpt, L)

    def forward(x: torch.Tensor, e: int, counter: list[int]) -> torch.Tensor:
        counter[0] += 1
        with torch.no_grad():
            return ref_forward(W, c, x[None, :e])[0, e - L:e]
    return forward


def _greedy(logits):
    logits = logits.clone()
    logits[:, MASK] = -torch.inf
    p = F.softmax(logits, -1)
    conf, tok = p.max(-1)
    return tok, conf


def _blocks(prompt):
    P = len(prompt)
    nb = -(-(P + G) // L)
    x = torch.full((nb * L,), MASK, dtype=torch.long)
    x[:P] = torch.tensor(prompt)
    return x, P, range(P // L, nb)


def _commit(conf, active, threshold):
    conf = torch.where(active, conf, torch.tensor(-torch.inf))
    chosen = conf > threshold
    if int(chosen.sum()) < 1:
        chosen = torch.zeros_like(active)
        chosen[int(conf.argmax())] = True
    return chosen


def _finish(x, P):
    ans = x[P:P + G].tolist()
    return ans[: ans.index(EOS) + 1] if EOS in ans else ans


def _eos_done(x, P, e, new):
    """The loop's early stop: a newly committed EOS with no masked cell before the first EOS."""
    gen = x[P:e].tolist()
    return bool((new == EOS).any()) and MASK not in gen[: gen.index(EOS)]


def ref_psd(forward, prompt, threshold, depths, order, counter):
    """PSD on each block: commit from the seed's ranking, nested drafts, one view per forward here."""
    x, P, blocks = _blocks(prompt)
    for b in blocks:
        s, e = b * L, (b + 1) * L
        seed = None
        for _ in range(L):
            active = x[s:e] == MASK
            if not active.any():
                break
            if seed is None:
                seed = forward(x, e, counter)
            tok, conf = _greedy(seed)
            chosen = _commit(conf, active, threshold)
            x[s:e] = torch.where(chosen, tok, x[s:e])
            if _eos_done(x, P, e, tok[chosen]):
                return _finish(x, P)
            free = [int(i) for i in (x[s:e] == MASK).nonzero().flatten()]
            if not free:
                break
            ranked = free if order == "position" else sorted(free, key=lambda i: (-float(conf[i]), i))
            views, keep = [x.clone()], 0
            for d in depths:
                v = x.clone()
                for i in ranked[:d]:
                    v[s + i] = tok[i]
                views.append(v)
            preds = [_greedy(forward(v, e, counter))[0] for v in views]  # the batched forward, one by one
            for j in range(1, len(views)):
                added = [i for i in ranked[depths[j - 2] if j > 1 else 0:depths[j - 1]]]
                if not added or any(int(preds[j - 1][i]) != int(tok[i]) for i in added):
                    break
                keep = j
            counter[0] -= len(views) - 1  # one batched forward
            new = views[keep][s:e][x[s:e] != views[keep][s:e]]
            x[s:e] = views[keep][s:e]
            seed = forward(views[keep], e, [0])  # == the batched forward's row `keep`
            if _eos_done(x, P, e, new):
                return _finish(x, P)
        if EOS in x[P:e].tolist():
            break
    return _finish(x, P)


def ref_dual(forward, prompt, drafter_threshold, n_draft, counter, view_kind="leftward"):
    """DualDiffusion on each block, the model drafting for itself: n drafter steps at a low threshold,
    then each draft judged with the drafts left of it filled; cut at the first rejection, whose cell
    gets the verifier's token; when all stand, the verifier's most confident masked cell."""
    x, P, blocks = _blocks(prompt)
    for b in blocks:
        s, e = b * L, (b + 1) * L
        for _ in range(L):
            if not (x[s:e] == MASK).any():
                break
            start = x.clone()
            for _ in range(n_draft):
                active = x[s:e] == MASK
                if not active.any():
                    break
                tok, conf = _greedy(forward(x, e, counter))
                x[s:e] = torch.where(_commit(conf, active, drafter_threshold), tok, x[s:e])
            cols = [i for i in range(L) if x[s + i] != start[s + i]]
            drafted = x.clone()
            x[:] = start
            fill = None
            for n, i in enumerate(cols):
                view = start.clone()
                for j in cols[:n] if view_kind == "leftward" else ():  # masked: every draft hidden
                    view[s + j] = drafted[s + j]
                tok, _ = _greedy(forward(view, e, [0]))
                if int(tok[i]) != int(drafted[s + i]):
                    fill = (i, int(tok[i]))
                    break
                x[s + i] = drafted[s + i]
            if fill is None:
                tok, conf = _greedy(forward(x, e, [0]))
                active = x[s:e] == MASK
                if active.any():
                    i = int(torch.where(active, conf, torch.tensor(-torch.inf)).argmax())
                    fill = (i, int(tok[i]))
            if fill is not None:
                x[s + fill[0]] = fill[1]
            counter[0] += 1  # the verifier's one batched forward
            if _eos_done(x, P, e, x[s:e][x[s:e] != start[s:e]]):
                return _finish(x, P)
        if EOS in x[P:e].tolist():
            break
    return _finish(x, P)


def _psd_cfg(cache, threshold, depths, order):
    return PSDConfig(decode=DecodeConfig(gen_length=G, block_length=L, steps=G, policy="threshold",
                                         threshold=threshold, cache=cache), depths=depths, draft_order=order)


@pytest.mark.parametrize("order", ["confidence", "position"])
def test_psd_within_a_block_matches_its_reference_loop(ckpt, loaded, order):
    model, tok = loaded
    forward = _window_forward(ckpt)
    accepted = 0
    for prompt in PROMPTS:
        counter = [0]
        want = ref_psd(forward, tok.encode(prompt), 0.3, (1, 3, 5), order, counter)
        for cache in ("none", "dual"):
            res = psd_generate(model, tok, [prompt], _psd_cfg(cache, 0.3, (1, 3, 5), order))
            assert res.raw_ids[0][: len(want)] == want, (prompt, cache)
            m = res.meter.models["model"]
            assert m.nfe == m.sequence_forwards == counter[0], (prompt, cache)  # a batch of views: one forward
        accepted += res.stats["accepted"]
    assert accepted > 0  # the drafts did some of the work: the acceptance path ran


def test_psd_within_a_block_takes_fewer_forwards_than_the_block_sampler(ckpt, loaded):
    from diffspec.decoding.llada2 import LLaDA2DecodeConfig, llada2_generate

    model, tok = loaded
    psd = psd_generate(model, tok, PROMPTS, _psd_cfg("dual", 0.3, (1, 3, 5, 7), "position"))
    base = llada2_generate(model, tok, PROMPTS, LLaDA2DecodeConfig(gen_length=G, block_length=L, steps=L,
                                                                  threshold=0.3))
    assert psd.stats["accepted"] > 0
    assert psd.meter.models["model"].nfe < base.meter.models["model"].nfe


def _dual_cfg(cache, drafter_threshold, n, **kw):
    return DualConfig(decode=DecodeConfig(gen_length=G, block_length=L, steps=G, policy="threshold",
                                          threshold=drafter_threshold, cache=cache),
                      num_drafter_steps=n, **{"verifier_view": "leftward", **kw})


@pytest.mark.parametrize("view", ["leftward", "masked"])
def test_dual_within_a_block_matches_its_reference_loop(ckpt, loaded, view):
    model, tok = loaded
    forward = _window_forward(ckpt)
    rejected = accepted = 0
    for prompt in PROMPTS:
        counter = [0]
        want = ref_dual(forward, tok.encode(prompt), 0.2, 2, counter, view)
        for cache in ("none", "dual"):
            res = dualdiffusion_generate(model, tok, [prompt], _dual_cfg(cache, 0.2, 2, verifier_view=view))
            assert res.raw_ids[0][: len(want)] == want, (prompt, cache)
            m = res.meter.models
            assert m["drafter"].nfe + m["verifier"].nfe == counter[0], (prompt, cache)
            assert m["verifier"].sequence_forwards == m["verifier"].nfe
        from diffspec.methods._stats import stats_class
        from diffspec.speculative.dualdiffusion import SpecStats

        assert stats_class(res.stats) is SpecStats  # so a bench row's chunks merge their counters
        rejected += res.stats["remasked"]
        accepted += res.stats["drafted"] - res.stats["remasked"] - res.stats["discarded"]
    assert rejected > 0 and accepted > 0  # both paths of the verdict ran


def test_views_share_the_cached_prefix_exactly(loaded):
    """One batched forward of several views equals each view's own forward (cached prefix expanded)."""
    from diffspec.decoding.llada2 import BlockForward
    from diffspec.decoding.meter import CostMeter, MeteredModel

    model, tok = loaded
    prompt = tok.encode(PROMPTS[2])
    x = torch.full((len(prompt) // L * L + 2 * L,), MASK)
    x[:len(prompt)] = torch.tensor(prompt)
    s = len(prompt) // L * L + L
    x[s - L:s][x[s - L:s] == MASK] = 7
    views = torch.full((3, L), MASK)
    views[1, :2] = torch.tensor([5, 9])
    views[2, :5] = torch.tensor([5, 9, 11, 3, 4])
    metered = MeteredModel(model, CostMeter(), "model")
    with torch.no_grad():
        plain = BlockForward(metered, x, L, cache=False, bidirectional=False)
        plain.start_block(s, s + L)
        want = [plain(views[i:i + 1])[0] for i in range(3)]
        for first_views in (views[:1], views):  # the block's first forward (storing the finished columns), 1 or 3 views
            cached = BlockForward(metered, x, L, cache=True, bidirectional=False)
            cached.start_block(s, s + L)
            first = cached(first_views)
            assert cached.kv.length == s and cached.kv.k[0].shape[0] == 1  # one stored copy
            batched = cached(views)
            for i in range(3):
                torch.testing.assert_close(batched[i], want[i], atol=1e-4, rtol=1e-4)
            for i in range(len(first_views)):
                torch.testing.assert_close(first[i], want[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw, match", [
    (dict(rule="confidence_threshold"), "exact_match only"),
    (dict(verifier_view="drafted"), "leftward or masked"),
    (dict(rollback="keep"), "discard only"),
    (dict(drafter="some/dir"), "drafter self"),
    (dict(max_iterations=3), "max_iterations"),
    (dict(verifier_unmask=0, progress_guard=False), "without the progress guard"),
    (dict(num_verifier_steps=2), "num_verifier_steps"),
    (dict(adaptive_drafter_steps=True), "adaptive_drafter_steps"),
])
def test_dual_refuses_what_a_block_cannot_honour(loaded, kw, match):
    model, tok = loaded
    with pytest.raises(ValueError, match=match):
        dualdiffusion_generate(model, tok, ["Hi"], _dual_cfg("dual", 0.5, 2, **kw))


def test_psd_accept_threshold_and_steps_on_a_block_model(loaded):
    """A confidence requirement keeps fewer drafts; --steps does not change PSD's iterations (each
    commits at least one cell, as on the full canvas)."""
    model, tok = loaded
    base = _psd_cfg("dual", 0.3, (1, 3, 5), "position")
    free = psd_generate(model, tok, PROMPTS, base)
    sure = psd_generate(model, tok, PROMPTS, base.replace(accept_threshold=0.6))
    assert 0 <= sure.stats["accepted"] < free.stats["accepted"]
    few = psd_generate(model, tok, PROMPTS, base.replace(decode=base.decode.replace(steps=3)))
    assert few.raw_ids == free.raw_ids and few.stats == free.stats


def test_dual_progress_guard_fills_a_stalled_block(loaded):
    """Without the verifier's own cell, a rejected first draft would stall the block: the guard
    writes the verifier's token there, and the answer has no masked cell left."""
    model, tok = loaded
    res = dualdiffusion_generate(model, tok, PROMPTS, _dual_cfg("dual", 0.2, 2, verifier_unmask=0))
    assert res.stats["guard_fills"] > 0 and res.stats["verifier_unmasked"] == 0
    assert all(MASK not in r for r in res.raw_ids)


def test_dual_refuses_sampling_on_a_block_model(loaded):
    model, tok = loaded
    cfg = _dual_cfg("dual", 0.5, 2)
    with pytest.raises(ValueError, match="temperature 0"):
        dualdiffusion_generate(model, tok, ["Hi"], cfg.replace(decode=cfg.decode.replace(temperature=0.7)))


def test_psd_refuses_lossless_and_local_on_a_block_model(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="lossless PSD"):
        psd_generate(model, tok, ["Hi"], PSDConfig(decode=DecodeConfig(gen_length=G, block_length=L, steps=G),
                                                   lossless=True))
    local = PSDConfig(decode=DecodeConfig(gen_length=G, block_length=L, steps=G, policy="local"), depths=(1, 3))
    with pytest.raises(ValueError, match="threshold or factor"):
        psd_generate(model, tok, ["Hi"], local)


def test_api_and_cli_run_psd_and_dual_on_a_block_model(ckpt):
    from block_diffusion_common import cli_generate
    from diffspec.api import generate

    res = generate("Hello", model=str(ckpt), method="psd", gen_length=16, block_length=8, steps=16,
                   depths=(1, 3), draft_order="position")
    assert len(res.raw_ids[0]) == 16 and MASK not in res.raw_ids[0]
    res = generate("Hello", model=str(ckpt), method="dualdiffusion", gen_length=16, block_length=8, steps=16,
                   verifier_view="leftward", drafter_threshold=0.5)
    assert len(res.raw_ids[0]) == 16 and res.meter.models["verifier"].nfe > 0
    cli_generate(ckpt, "psd", "--gen-length", "16", "--block-length", "8", "--depths", "1,3")
