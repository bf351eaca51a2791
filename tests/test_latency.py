"""The roofline latency model (bench.latency) and the meter's shape counts it reads."""
from __future__ import annotations

import pytest

from diffspec.api import generate
from diffspec.bench.latency import H100, LLADA_8B, forward_seconds, row_seconds, seconds_per_answer
from diffspec.decoding.meter import CostMeter
from diffspec.tasks import load_examples


def test_reference_is_llada_8b():
    assert LLADA_8B.params == pytest.approx(7.50e9, rel=0.01)  # 6.98 B in the layers + 0.52 B head


def test_small_forwards_are_bound_by_memory_and_large_ones_by_arithmetic():
    one = forward_seconds(1, 1, 300)
    assert one == pytest.approx(2 * LLADA_8B.params / H100.bandwidth, rel=0.05)  # streaming 15 GB of weights
    assert forward_seconds(1, 32, 300) == pytest.approx(one, rel=0.01)  # 32 queries ride along
    big = forward_seconds(1, 4096, 4096)
    assert big == pytest.approx((2 * LLADA_8B.params * 4096 + 4 * 32 * 4096 * 4096 * 4096) / H100.peak_flops)
    assert forward_seconds(1, 1, 300, scale=0.25) == pytest.approx(one / 4, rel=0.05)
    with pytest.raises(ValueError, match="B, Q, K"):
        forward_seconds(0, 1, 1)


def test_meter_counts_forwards_by_shape_and_merges():
    m = CostMeter()
    m.record("model", 2, 32, 100, 1.0, params=10)
    m.record("model", 2, 32, 100, 1.0)
    m.record("model", 1, 8, 40, 1.0)
    assert m.models["model"].shapes == {"2,32,100": 2, "1,8,40": 1} and m.models["model"].params == 10
    other = CostMeter.from_summary(m.summary())
    other.merge(m)
    assert other.models["model"].shapes == {"2,32,100": 4, "1,8,40": 2}
    legacy = m.summary()
    for v in legacy["models"].values():
        del v["shapes"], v["params"]  # a results.json written before shapes were counted
    assert CostMeter.from_summary(legacy).models["model"].shapes == {}
    assert row_seconds(legacy["models"], "model") is None


def test_a_run_prices_every_forward_it_made():
    """Vanilla's 48 full-canvas forwards per answer, and Fast-dLLM's fewer and smaller ones, priced
    from the meter's shape counts: the total equals pricing the forwards one by one."""
    prompts = [e.prompt for e in load_examples("arith", limit=2)]
    van = generate(prompts, method="vanilla").meter.summary()
    fast = generate(prompts, method="fast-dllm", cache="dual", policy="threshold").meter.summary()
    shapes = van["models"]["model"]["shapes"]
    assert sum(shapes.values()) == van["nfe"] and all(k.split(",")[1] == k.split(",")[2] for k in shapes)
    by_hand = sum(n * forward_seconds(*map(int, k.split(","))) for k, n in shapes.items())
    assert row_seconds(van["models"], "model") == pytest.approx(by_hand)
    assert seconds_per_answer(van) == pytest.approx(by_hand / 2)
    assert 0 < seconds_per_answer(fast) < seconds_per_answer(van)


def test_a_smaller_drafter_is_priced_by_its_size():
    models = {"verifier": {"nfe": 1, "params": 100, "shapes": {"1,32,100": 1}},
              "drafter": {"nfe": 4, "params": 25, "shapes": {"1,32,100": 4}}}
    v = forward_seconds(1, 32, 100)
    d = forward_seconds(1, 32, 100, scale=0.25)
    assert row_seconds(models, "verifier") == pytest.approx(v + 4 * d)
