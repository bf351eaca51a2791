"""Cache strategies (Fast-dLLM prefix/dual, dKV-Cache decode/greedy/prefill).

Exact tests compare token ids with `torch.equal`; they hold where the cached
forward computes exactly what the uncached one does (a full forward). Where a
cache is an approximation by design, we check the cost it saves instead, or
that the first forward (before anything stale exists) is exact.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffspec.decoding import diffusion
from diffspec.decoding.cache import CACHE_STRATEGIES, KVStore, NoCache, make_cache
from diffspec.decoding.config import CACHES, DecodeConfig
from diffspec.decoding.diffusion import decode_canvas
from diffspec.decoding.meter import CostMeter, MeteredModel
from diffspec.decoding.state import Canvas
from diffspec.models.llada import LLaDAConfig, LLaDAModel

VOCAB, MASK, EOS = 64, 1, 0
CACHED = [c for c in CACHES if c != "none"]


def tiny_model(seed: int = 0) -> LLaDAModel:
    torch.manual_seed(seed)
    cfg = LLaDAConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64,
                      mask_token_id=MASK, eos_token_id=EOS, max_sequence_length=64)
    model = LLaDAModel(cfg).eval()
    with torch.no_grad():  # sharper than the 0.02 init (top probabilities ~0.1-0.5, far below 1)
        for p in model.parameters():  # so token choices are not near-ties
            p.mul_(4.0)
    return model


def prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def decode(model: LLaDAModel, ps: list[list[int]], **kw) -> tuple[torch.Tensor, CostMeter]:
    cfg = DecodeConfig(**{"gen_length": 8, "block_length": 4, "steps": 8, **kw})
    canvas = Canvas.from_prompts(ps, cfg.gen_length, MASK, EOS, 64)
    meter = CostMeter()
    with torch.inference_mode():
        decode_canvas(MeteredModel(model, meter), canvas, cfg, torch.Generator().manual_seed(0))
    return canvas.x, meter


def llada_reference(model: LLaDAModel, ps: list[list[int]], gen: int, block: int, steps: int) -> torch.Tensor:
    """LLaDA's generate.py loop, written independently: full forward, low-confidence top-k per row."""
    c = Canvas.from_prompts(ps, gen, MASK, EOS, 64)
    x, P, spb = c.x.clone(), c.prompt_len, steps // (gen // block)
    with torch.inference_mode():
        for b in range(gen // block):
            s, e = P + b * block, P + (b + 1) * block
            n = (x[:, s:e] == MASK).sum(1)
            for i in range(spb):
                logits = model(x, attention_mask=c.attention_mask).logits
                logits[..., MASK] = -torch.inf  # diffspec never commits the mask token
                x0 = logits.argmax(-1)
                conf = F.softmax(logits.double(), -1).gather(-1, x0[..., None]).squeeze(-1)
                conf[:, e:] = -torch.inf
                conf = torch.where(x == MASK, conf, -torch.inf)
                for r in range(x.shape[0]):
                    k = int(n[r] // spb + (i < n[r] % spb))
                    sel = conf[r].topk(k).indices
                    x[r, sel] = x0[r, sel]
    return x


def first_block_logits(model: LLaDAModel, ps: list[list[int]], cache: str, **kw) -> torch.Tensor:
    cfg = DecodeConfig(**{"gen_length": 8, "block_length": 4, "steps": 8, "cache": cache, **kw})
    canvas = Canvas.from_prompts(ps, cfg.gen_length, MASK, EOS, 64)
    strategy = make_cache(cfg, MeteredModel(model, CostMeter()), canvas)
    with torch.inference_mode():
        strategy.begin_block(canvas.block(0, cfg.block_length))
        return strategy.block_logits(0)


# 1 ---------------------------------------------------------------------------
def test_none_cache_is_vanilla_llada():
    model, ps = tiny_model(), prompts(5, 3)
    x, meter = decode(model, ps)  # default config: cache "none", schedule policy
    assert torch.equal(x, llada_reference(model, ps, 8, 4, 8))
    assert meter.nfe == 8 and meter.tokens_processed == 8 * 13 * 2
    canvas = Canvas.from_prompts(ps, 48, MASK, EOS, 64)
    assert type(make_cache(DecodeConfig(), MeteredModel(model, CostMeter()), canvas)) is NoCache


# 2 ---------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fast_dllm_with_one_step_per_block_equals_no_cache(cache):
    """With one step per block every forward is a block-start full forward, so
    the cache is never read and the result must be identical."""
    model, ps = tiny_model(), prompts(5, 3)
    kw = dict(gen_length=8, block_length=4, steps=2)
    assert torch.equal(decode(model, ps, cache=cache, **kw)[0], decode(model, ps, **kw)[0])


@pytest.mark.parametrize("cache", CACHED)
def test_first_forward_of_a_single_block_is_exact(cache):
    """One block covering the whole generation is NOT equal to no cache for a
    bidirectional model: the prompt's K/V depend on the generated tokens, so
    the prompt K/V cached at the first step go stale as the block fills in.
    What must hold exactly is the first step, before anything is stale."""
    model, ps = tiny_model(), prompts(5, 3)
    kw = dict(block_length=8)
    assert torch.equal(first_block_logits(model, ps, cache, **kw), first_block_logits(model, ps, "none", **kw))


# 3 ---------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["dkv-decode", "dkv-greedy"])
@pytest.mark.parametrize("policy", ["schedule", "threshold"])
def test_dkv_with_refresh_every_step_equals_no_cache(cache, policy):
    """Every forward is a full refresh. Under the threshold policy rows finish
    blocks at different steps, so idle rows (not refreshed) ride along."""
    model, ps = tiny_model(), prompts(4, 7, 2, 5)
    kw = dict(policy=policy, threshold=0.3)
    x, meter = decode(model, ps, cache=cache, refresh_interval=1, **kw)
    x_ref, meter_ref = decode(model, ps, **kw)
    assert torch.equal(x, x_ref)
    assert meter.tokens_processed == meter_ref.tokens_processed


# 4 ---------------------------------------------------------------------------
def test_threshold_one_commits_one_token_per_step():
    model, ps = tiny_model(), prompts(5, 3)
    assert first_block_logits(model, ps, "none").softmax(-1).max() < 0.9  # no probability reaches 1
    x, meter = decode(model, ps, policy="threshold", threshold=1.0, steps=2)  # steps unused by threshold
    x_ref, _ = decode(model, ps, steps=8)  # vanilla, steps = gen_length
    assert torch.equal(x, x_ref)
    assert meter.nfe == 8


# 5 ---------------------------------------------------------------------------
def test_fast_dllm_tokens_processed_by_hand():
    """prompt 5, gen 8, block 4, steps 8 (1 token a step, 4 steps a block), batch 2; T = 13.
    none:   8 forwards × 13 columns × 2 rows                         = 208
    prefix: per block a full forward (13) then 3 steps on [s, 13):
            block 0: 13 + 3·8 = 37, block 1: 13 + 3·4 = 25 → 62 × 2 = 124
    dual:   per block 13 + 3 steps on the block (4): 25 × 2 blocks = 50 × 2 = 100"""
    model, ps = tiny_model(), prompts(5, 5)
    assert decode(model, ps)[1].tokens_processed == 208
    assert decode(model, ps, cache="prefix")[1].tokens_processed == 124
    assert decode(model, ps, cache="dual")[1].tokens_processed == 100


def test_dkv_tokens_processed_by_hand():
    """Batch 1, prompt 5, gen 8, 1 token a step, T = 13. The refresh clock restarts at each block.
    dkv-decode (block 8, refresh 8): block steps 0 and 1 full (13 each); step j ≥ 2 feeds the
        8 - j masked cells plus the 1 decoded at step j-1 (cached one step late) = 9 - j:
        13 + 13 + (7 + 6 + 5 + 4 + 3 + 2) = 26 + 27 = 53
    dkv-decode, refresh 4: steps 0, 1 and 4 full: 13 + 13 + (7+6) + 13 + (4+3+2) = 61
    dkv-greedy (block 4, refresh 8, low-confidence remasking: every masked cell of the block is
        a candidate): block step 0 full, then the block's masked cells plus the token decoded at
        the previous step: per block 13 + (3+1) + (2+1) + (1+1) = 22, two blocks = 44
    dkv-prefill (block 4): forward 0 full, then the 8 generation columns: 13 + 7·8 = 69"""
    model, ps = tiny_model(), prompts(5)
    assert decode(model, ps, cache="dkv-decode", block_length=8)[1].tokens_processed == 53
    assert decode(model, ps, cache="dkv-decode", block_length=8, refresh_interval=4)[1].tokens_processed == 61
    assert decode(model, ps, cache="dkv-greedy")[1].tokens_processed == 44
    assert decode(model, ps, cache="dkv-prefill")[1].tokens_processed == 69


def test_dkv_decode_caches_a_token_one_step_after_it_is_decoded(monkeypatch):
    """A token decoded at step t is fed at t+1 (computed with its real token), then read from the
    cache. Block steps 0 and 1 are full forwards (the reference's schedule)."""
    fed: list[set[int]] = []
    snapshots: list[torch.Tensor] = []
    forward = KVStore.forward

    def spy(self, model, canvas, need, write, sequences=None):
        snapshots.append(canvas.x[0].clone())
        idx, logits = forward(self, model, canvas, need, write, sequences)
        fed.append(set(idx.tolist()))
        return idx, logits

    monkeypatch.setattr(KVStore, "forward", spy)
    x, _ = decode(tiny_model(), prompts(5), cache="dkv-decode", block_length=8, refresh_interval=100)
    snapshots.append(x[0])
    assert fed[0] == fed[1] == set(range(13))  # block steps 0 and 1: full
    for t in range(2, 8):
        masked = {c for c in range(13) if snapshots[t][c] == MASK}
        (just_decoded,) = (snapshots[t] != snapshots[t - 1]).nonzero()[:, 0].tolist()
        assert fed[t] == masked | {just_decoded}


class Recorder:
    """Wraps a strategy and keeps each step's block logits at the still-masked cells."""

    def __init__(self, inner, canvas: Canvas, log: list):
        self.inner, self.canvas, self.log = inner, canvas, log

    def begin_block(self, block) -> None:
        self.block = block
        self.inner.begin_block(block)

    def block_logits(self, step: int) -> torch.Tensor:
        out = self.inner.block_logits(step)
        self.log.append([row[m] for row, m in zip(out, self.block.take(self.canvas.x) == MASK)])
        return out

    def after_commit(self, chosen: torch.Tensor, step: int) -> None:
        self.inner.after_commit(chosen, step)


def decode_recorded(monkeypatch, model, ps, **kw) -> tuple[torch.Tensor, list]:
    log: list = []
    monkeypatch.setattr(diffusion, "make_cache", lambda cfg, m, c, g=None: Recorder(make_cache(cfg, m, c, g), c, log))
    return decode(model, ps, **kw)[0], log


# 6 ---------------------------------------------------------------------------
@pytest.mark.parametrize("cache", CACHES)
def test_batch_of_different_prompt_lengths_matches_each_row_alone(cache, monkeypatch):
    """Left padding must not leak, and batch companions must not change a row.

    Equal up to float rounding (1e-5) for the longest prompt (no padding), where
    every forward feeds the same columns batched or alone (none, prefix, dual,
    dkv-prefill): not bit-exact, because on the CPU `models.matmul.linear` sums
    a few rows in an order that depends on how many rows the batch has. Close
    otherwise: a shorter prompt decoded alone sits at other columns, so RoPE
    sees shifted absolute positions (same math, since attention depends on
    relative positions only, different floats); and dkv-decode/greedy feed the
    columns *any* row needs, so a batch feeds more columns than one row alone
    (the row keeps its stored K/V there, so the math is again the same). A
    leak of padding or of another row would change logits by O(1), not 1e-6.
    Token ids must match exactly, also under the threshold policy, where rows
    finish blocks at different steps and must keep their own refresh clock."""
    model, ps = tiny_model(), prompts(6, 3, 5)
    kw = dict(cache=cache, refresh_interval=3)
    x, batch_log = decode_recorded(monkeypatch, model, ps, **kw)
    for r, p in enumerate(ps):
        alone, alone_log = decode_recorded(monkeypatch, model, [p], **kw)
        assert torch.equal(x[r, -8:], alone[0, -8:]), f"row {r} differs from decoding it alone"
        for batch_step, alone_step in zip(batch_log, alone_log, strict=True):
            if r == 0 and cache in ("none", "prefix", "dual", "dkv-prefill"):
                torch.testing.assert_close(batch_step[r], alone_step[0], atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(batch_step[r], alone_step[0], atol=1e-4, rtol=1e-4)
    kw.update(policy="threshold", threshold=0.3)
    x, _ = decode(model, ps, **kw)
    for r, p in enumerate(ps):
        assert torch.equal(x[r, -8:], decode(model, [p], **kw)[0][0, -8:]), f"row {r} (threshold policy)"


# the store itself ----------------------------------------------------------------
def store_setup():
    model, canvas = tiny_model(), Canvas.from_prompts(prompts(5, 3), 8, MASK, EOS, 64)
    store = KVStore(canvas.batch_size, canvas.length, model.config.n_layers, canvas.x.device)
    cols = torch.arange(canvas.length).expand(canvas.batch_size, -1)
    return model, canvas, store, cols


def test_store_reuses_kv_of_an_unchanged_canvas():
    """With nothing decoded in between, cached K/V are what a full forward recomputes."""
    model, canvas, store, cols = store_setup()
    meter = CostMeter()
    metered = MeteredModel(model, meter)
    with torch.inference_mode():
        _, full = store.forward(metered, canvas, torch.ones_like(cols, dtype=torch.bool), cols < 5)
        assert torch.equal(store.valid, cols < 5)
        idx, part = store.forward(metered, canvas, cols >= 5, torch.zeros_like(cols, dtype=torch.bool))
    assert idx.tolist() == list(range(5, 13))
    assert store.last_n_keys == 13
    torch.testing.assert_close(part, full[:, 5:], atol=1e-5, rtol=1e-5)
    assert meter.tokens_processed == 2 * 13 + 2 * 8


def test_store_attends_only_fed_and_cached_columns():
    """A column neither fed nor cached has no K/V and is left out of attention."""
    model, canvas, store, cols = store_setup()
    with torch.inference_mode():
        idx, logits = store.forward(MeteredModel(model, CostMeter()), canvas, cols < 8, cols < 8)
        ref = model(canvas.x[:, :8], attention_mask=canvas.attention_mask[:, :8]).logits
    assert store.last_n_keys == 8
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


# 7 ---------------------------------------------------------------------------
def test_clear_errors():
    with pytest.raises(ValueError, match="unknown cache"):
        DecodeConfig(cache="paged")
    with pytest.raises(ValueError, match="refresh_interval"):
        DecodeConfig(cache="dkv-decode", refresh_interval=0)
    with pytest.raises(ValueError, match="threshold"):
        DecodeConfig(policy="threshold", threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        DecodeConfig(policy="threshold", threshold=1.5)
    with pytest.raises(ValueError, match="factor"):
        DecodeConfig(policy="factor", factor=0.0)
    with pytest.raises(ValueError, match="unknown policy"):
        DecodeConfig(policy="greedy")


def test_make_cache_rejects_what_it_cannot_support():
    model = tiny_model()
    canvas = Canvas.from_prompts(prompts(5), 8, MASK, EOS, 64)
    metered = MeteredModel(model, CostMeter())
    # a config that bypassed validation
    bad = DecodeConfig(gen_length=8, block_length=4, steps=8)
    object.__setattr__(bad, "cache", "paged")
    with pytest.raises(ValueError, match="unknown cache 'paged'"):
        make_cache(bad, metered, canvas)
    with pytest.raises(ValueError, match="cfg_scale"):
        make_cache(DecodeConfig(gen_length=8, block_length=4, steps=8, cache="dual", cfg_scale=1.0), metered, canvas)

    class NoHook(torch.nn.Module):
        config = model.config

        def forward(self, input_ids, attention_mask=None):
            return model(input_ids, attention_mask=attention_mask)

    with pytest.raises(ValueError, match="kv_cache"):
        make_cache(DecodeConfig(gen_length=8, block_length=4, steps=8, cache="prefix"),
                   MeteredModel(NoHook(), CostMeter()), canvas)

    class Shifted(LLaDAModel):
        logits_shifted = True  # Dream-style: logit i comes from output i-1

    with pytest.raises(ValueError, match="shifts its logits"):
        make_cache(DecodeConfig(gen_length=8, block_length=4, steps=8, cache="dual"),
                   MeteredModel(Shifted(model.config), CostMeter()), canvas)
    # and decode_canvas refuses guidance with a cache before doing any work
    with pytest.raises(ValueError, match="cfg_scale"):
        decode(model, prompts(5), cache="prefix", cfg_scale=1.0)


def test_every_config_cache_has_a_strategy():
    assert set(CACHE_STRATEGIES) == set(CACHES)


# cost -------------------------------------------------------------------------
@pytest.mark.parametrize("cache", CACHED)
def test_every_cache_saves_tokens_and_flops(cache):
    model, ps = tiny_model(), prompts(5, 3)
    kw = dict(gen_length=16, block_length=8, steps=16)
    _, none = decode(model, ps, **kw)
    _, cached = decode(model, ps, cache=cache, **kw)
    assert cached.nfe == none.nfe
    assert cached.tokens_processed < none.tokens_processed
    assert cached.flops < none.flops
