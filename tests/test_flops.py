"""The analytic FLOP estimate against FLOPs counted from a real run.

Every method's cost is `2·(non-embedding params)·tokens + 4·layers·width·queries·keys`
per forward (`forward_flops`), charged by the meter with the keys each cached
forward really attends to. `FlopCounterMode` counts the matmuls a run actually
executes; with SDPA's math backend the attention products are matmuls too (the
fused CPU kernel is invisible to the counter). The estimate leaves out only
elementwise work, and counts the norm weights as if they were matmul weights
(~0.1 % here), so the two agree within 0.5 % — for every family: LLaDA with and
without caches, batched multi-view verification, a drafter + verifier pair,
the Qwen3 target with its KV cache, the DFlash drafter and the tree-masked
D²SD verification. A wrong key count (a cache that charges the full canvas) or a
missing forward would be far outside that.
"""
from __future__ import annotations

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffspec.api import generate
from diffspec.models import matmul
from diffspec.speculative.armethods import DEFAULT_TARGET
from diffspec.tasks import load_examples

CASES = [
    ("vanilla", {}),
    ("fast-dllm", {"cache": "dual", "policy": "threshold"}),
    ("fast-dllm", {"cache": "prefix"}),
    ("dkv-cache", {"cache": "dkv-greedy"}),
    ("psd", {}),
    ("dualdiffusion", {}),
    ("ar", {"model": DEFAULT_TARGET}),
    ("ar-spec", {"model": DEFAULT_TARGET}),
    ("dflash", {"model": DEFAULT_TARGET}),
    ("d2sd", {"model": DEFAULT_TARGET}),
]


@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{o.get('cache', '')}" for m, o in CASES])
def test_flop_estimate_matches_counted_matmuls(method, options, monkeypatch):
    # The CPU's weight-left matmul pads a one-row product to two rows (a kernel choice, free when the
    # weights' bytes bound it), and the counter cannot see oneDNN's packed kernel. Count F.linear's.
    monkeypatch.setattr(matmul, "MAX_ROWS", 0)
    monkeypatch.setattr(matmul, "PACKED_MAX_ROWS", 0)
    prompts = [e.prompt for e in load_examples("arith", limit=2)]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        res = generate(prompts, method=method, **options)
    counted = counter.get_total_flops()
    assert counted > 0
    assert res.meter.flops == pytest.approx(counted, rel=5e-3)
