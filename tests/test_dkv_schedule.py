"""dKV-Cache schedules against horseee/dKV-Cache, worked out by hand.

Reference: `generate` in `generation_utils/llada_dkv_cache_decode.py` and
`generation_utils/llada_dkv_cache_greedy.py` (and `find_window_tokens` there).
Both restart their step counter i at every block.

* Decode: full forward when i == 0, i == 1 or i % cache_reloading_step == 0;
  otherwise feed every cell that was masked at the previous step (the masked
  cells plus the tokens just decoded, which are cached one step late).
* Greedy (random remasking only): full forward when i % cache_reloading_step
  == 0; otherwise feed the cells decoded at step i, those decoded at step
  i - 1 and, for each cell of step i, its `window_size` nearest still-masked
  cells (left, right, left, right, ... by distance), anywhere on the canvas.

To write the expected columns literally, the tests fix the decoding order
inside every block by replacing the loop's `propose` with a fixed confidence
ranking (ORDER: block offsets, first decoded first). Canvas: prompt 3 (columns
0-2), gen 12 in two blocks of 6 (columns 3-8 and 9-14), T = 15, one token a
step (steps 12), refresh_interval 4. With ORDER = [1, 4, 0, 5, 2, 3] the steps
decode columns 4, 7, 3, 8, 5, 6 | 10, 13, 9, 14, 11, 12.
"""
from __future__ import annotations

import pytest
import torch

from diffspec.decoding import cache, diffusion
from diffspec.decoding.cache import DKVGreedy, KVStore, make_cache
from diffspec.decoding.config import DecodeConfig
from diffspec.decoding.diffusion import BlockDecoder
from diffspec.decoding.meter import CostMeter, MeteredModel
from diffspec.decoding.state import Canvas
from diffspec.models.llada import LLaDAConfig, LLaDAModel

VOCAB, MASK, EOS = 64, 1, 0
ORDER = [1, 4, 0, 5, 2, 3]
CASE = dict(gen_length=12, block_length=6, steps=12, refresh_interval=4)
T = 15


def tiny_model(seed: int = 0) -> LLaDAModel:
    torch.manual_seed(seed)
    cfg = LLaDAConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64,
                      mask_token_id=MASK, eos_token_id=EOS, max_sequence_length=64)
    model = LLaDAModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


def prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def fix_order(monkeypatch, order: list[int]) -> None:
    """The loop (and dkv-greedy's replay of it) ranks block offsets by `order`."""
    score = torch.empty(len(order), dtype=torch.float64)
    score[torch.tensor(order)] = -torch.arange(len(order), dtype=torch.float64)

    def propose(logits, cfg, generator, *rest):
        return logits.argmax(-1), score.expand(logits.shape[:2]).clone()

    monkeypatch.setattr(diffusion, "propose", propose)  # the loop's
    monkeypatch.setattr(cache, "propose", propose)  # dkv-greedy's replay of it


def run(monkeypatch, ps, window: int = 0, **kw) -> tuple[list[set[int] | None], torch.Tensor, CostMeter]:
    """Decode; return per forward the fed columns of row 0 (None for a full forward)."""
    fed: list[set[int] | None] = []
    forward = KVStore.forward

    def spy(self, model, canvas, need, write, sequences=None):
        idx, logits = forward(self, model, canvas, need, write, sequences)
        fed.append(None if len(idx) == canvas.length else set(idx.tolist()))
        return idx, logits

    monkeypatch.setattr(KVStore, "forward", spy)
    cfg = DecodeConfig(**kw)
    canvas = Canvas.from_prompts(ps, cfg.gen_length, MASK, EOS, 64)
    meter = CostMeter()
    metered, generator = MeteredModel(tiny_model(), meter), torch.Generator().manual_seed(0)
    with torch.inference_mode():
        decoder = BlockDecoder(metered, canvas, cfg, generator)
        if cfg.cache == "dkv-greedy":  # the loop's generator, so the strategy knows the random picks
            decoder.cache = DKVGreedy(metered, canvas, cfg, generator, window_size=window)
        decoder.run()
    return fed, canvas.x, meter


def pattern(fed: list[set[int] | None]) -> str:
    return "".join("F" if f is None else "." for f in fed)


# dKV-Cache-Decode --------------------------------------------------------------
def test_decode_full_forwards_restart_at_each_block(monkeypatch):
    """gen 32, block 16, steps 32, refresh 8: the reference runs full forwards at block steps
    0, 1 and 8 of each block, i.e. global steps 0, 1, 8, 16, 17, 24: 6 of them. A global clock
    (step % 8 == 0) would give 4: 0, 8, 16, 24."""
    fed, _, _ = run(monkeypatch, prompts(3), cache="dkv-decode", gen_length=32, block_length=16, steps=32,
                    refresh_interval=8)
    assert pattern(fed) == "FF......F......." "FF......F......."
    assert pattern(fed).count("F") == 6


def test_decode_schedule_and_columns_by_hand(monkeypatch):
    """Full at block steps 0, 1, 4 (global 0, 1, 4, 6, 7, 10); a cached step feeds the cells masked
    now plus the one decoded at the previous step:
    step 2: masked = gen − {4, 7}, + 7          step 3: masked = gen − {4, 7, 3}, + 3
    step 5: masked = {6, 9..14}, + 5            step 8: masked = {9, 11, 12, 14}, + 13
    step 9: masked = {11, 12, 14}, + 9          step 11: masked = {12}, + 11"""
    fix_order(monkeypatch, ORDER)
    fed, x, _ = run(monkeypatch, prompts(3), cache="dkv-decode", **CASE)
    assert fed == [
        None, None,                                  # block 0, steps 0-1
        {3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14},      # step 2
        {3, 5, 6, 8, 9, 10, 11, 12, 13, 14},         # step 3
        None,                                        # step 4
        {5, 6, 9, 10, 11, 12, 13, 14},               # step 5
        None, None,                                  # block 1, steps 6-7
        {9, 11, 12, 13, 14},                         # step 8
        {9, 11, 12, 14},                             # step 9
        None,                                        # step 10
        {11, 12},                                    # step 11
    ]
    assert (x != MASK).all()


# dKV-Cache-Greedy --------------------------------------------------------------
def test_greedy_full_forwards_restart_at_each_block(monkeypatch):
    """Greedy (random remasking) refreshes at block steps 0 and 8 only: 4 full forwards."""
    fed, _, _ = run(monkeypatch, prompts(3), cache="dkv-greedy", remasking="random", gen_length=32,
                    block_length=16, steps=32, refresh_interval=8)
    assert pattern(fed) == "F.......F......." "F.......F......."


GREEDY_WINDOW_0 = [
    None,            # step 0: full (block 0 starts)
    {4, 7},          # step 1: decodes 7; 4 decoded at step 0
    {3, 7},          # step 2: decodes 3; 7 decoded at step 1
    {3, 8},          # step 3
    None,            # step 4: block step 4 % 4 == 0
    {5, 6},          # step 5
    None,            # step 6: full (block 1 starts)
    {10, 13},        # step 7
    {9, 13},         # step 8
    {9, 14},         # step 9
    None,            # step 10
    {11, 12},        # step 11
]

# window 1: the nearest cell masked now and not yet fed, left first at each distance.
GREEDY_WINDOW_1 = [
    None,
    {4, 7, 6},       # 7: left 6 is masked
    {3, 7, 5},       # 3: left 2 is prompt, right 4 decoded, left 1 prompt, right 5
    {3, 8, 9},       # 8: left 7 decoded, right 9 (the next block)
    None,
    {5, 6, 9},       # 6: 5 fed, 7, 4, 8, 3 decoded, then 9
    None,
    {10, 13, 12},    # 13: left 12
    {9, 13, 11},     # 9: 8, 10, 7 decoded, then 11
    {9, 14, 12},     # 14: 13 decoded, 15 off the canvas, then 12
    None,
    {11, 12},        # 12: nothing masked is left
]


@pytest.mark.parametrize("window, expected", [(0, GREEDY_WINDOW_0), (1, GREEDY_WINDOW_1)])
def test_greedy_schedule_and_columns_by_hand(monkeypatch, window, expected):
    fix_order(monkeypatch, ORDER)
    fed, x, meter = run(monkeypatch, prompts(3), window=window, cache="dkv-greedy", remasking="random", **CASE)
    assert fed == expected
    assert (x != MASK).all()
    assert meter.tokens_processed == sum(T if f is None else len(f) for f in expected)


def test_greedy_window_with_two_cells_a_step_by_hand(monkeypatch):
    """steps 6: two cells a step (3 steps a block), refresh 4: full at block step 0 only.
    Steps decode {4, 7}, {3, 8}, {5, 6} | {10, 13}, {9, 14}, {11, 12}; windows are taken in
    decoding order and never count a cell twice:
    step 1: 3 → 5 (2 prompt, 4 decoded, 1 prompt), 8 → 9 (7 decoded); + 4, 7 decoded at step 0
    step 2: 5 → 9 (6 fed; 4, 7, 3, 8 decoded), 6 → 10 (9 taken); + 3, 8
    step 4: 9 → 11, 14 → 12; + 10, 13        step 5: nothing masked is left; + 9, 14"""
    fix_order(monkeypatch, ORDER)
    fed, _, _ = run(monkeypatch, prompts(3), window=1, cache="dkv-greedy", remasking="random",
                    **{**CASE, "steps": 6})
    assert fed == [None, {3, 4, 5, 7, 8, 9}, {3, 5, 6, 8, 9, 10},
                   None, {9, 10, 11, 12, 13, 14}, {9, 11, 12, 14}]


def test_greedy_with_the_real_random_draw_feeds_every_committed_cell(monkeypatch):
    """Without a fixed order: the strategy replays the loop's random draw (temperature too) and
    after every commit checks that each committed cell was recomputed; batch of different prompt
    lengths, schedule and threshold policies."""
    for kw in (dict(), dict(temperature=0.7), dict(policy="threshold", threshold=0.6)):
        fed, x, meter = run(monkeypatch, prompts(4, 7, 2), window=2, cache="dkv-greedy", remasking="random",
                            gen_length=16, block_length=8, steps=16, refresh_interval=4, **kw)
        assert (x != MASK).all()
        assert "." in pattern(fed)


def test_greedy_refresh_every_step_equals_no_cache_with_random_remasking(monkeypatch):
    """Every forward full: same tokens as vanilla random remasking (the replay leaves the
    generator as it found it)."""
    kw = dict(remasking="random", gen_length=16, block_length=8, steps=16)
    ps = prompts(4, 7)
    _, x, meter = run(monkeypatch, ps, cache="dkv-greedy", refresh_interval=1, **kw)
    _, x_ref, meter_ref = run(monkeypatch, ps, cache="none", **kw)
    assert torch.equal(x, x_ref)
    assert meter.tokens_processed == meter_ref.tokens_processed


def test_greedy_predicted_cells_are_the_ones_committed(monkeypatch):
    """With refresh 100 and the real random draw, a cached step feeds exactly the cell committed
    now plus the one committed at the previous step (window 0, batch 1, one cell a step)."""
    fed, _, _ = run(monkeypatch, prompts(3), cache="dkv-greedy", remasking="random", refresh_interval=100,
                    **{k: v for k, v in CASE.items() if k != "refresh_interval"})
    assert pattern(fed) == "F....." "F....."
    assert all(len(f) == 2 for f in fed if f is not None)


def test_greedy_guard_catches_a_wrong_prediction():
    """A strategy holding another generator than the loop's predicts other cells: it must fail loudly."""
    cfg = DecodeConfig(cache="dkv-greedy", remasking="random", refresh_interval=100, **{
        k: v for k, v in CASE.items() if k != "refresh_interval"})
    canvas = Canvas.from_prompts(prompts(3), cfg.gen_length, MASK, EOS, 64)
    metered = MeteredModel(tiny_model(), CostMeter())
    decoder = BlockDecoder(metered, canvas, cfg, torch.Generator().manual_seed(0))
    decoder.cache = DKVGreedy(metered, canvas, cfg, torch.Generator().manual_seed(1))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="not recomputed"):
        decoder.run()


def test_greedy_without_a_known_order():
    """Low-confidence remasking (the reference refuses it) or no generator: every masked block
    cell is recomputed, and a window cannot be asked for."""
    model = MeteredModel(tiny_model(), CostMeter())
    canvas = Canvas.from_prompts(prompts(3), 12, MASK, EOS, 64)
    g = torch.Generator()
    low = DecodeConfig(cache="dkv-greedy", **CASE)
    rnd = low.replace(remasking="random")
    assert not DKVGreedy(model, canvas, low, g).order_known
    assert not make_cache(rnd, model, canvas).order_known
    assert make_cache(rnd, model, canvas, g).order_known
    with pytest.raises(ValueError, match="window"):
        DKVGreedy(model, canvas, low, g, window_size=2)
    with pytest.raises(ValueError, match="window"):
        DKVGreedy(model, canvas, rnd, None, window_size=2)
    with pytest.raises(ValueError, match="window_size"):
        DKVGreedy(model, canvas, rnd, g, window_size=-1)
