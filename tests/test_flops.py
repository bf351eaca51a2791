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
import torch
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


class _Costed(torch.nn.Module):
    """A stand-in model: its forward does nothing, its cost model is `cost` and counts its calls."""

    def __init__(self, cost):
        super().__init__()
        self.config, self.cost, self.calls = None, cost, 0

    def forward(self, input_ids, **kw):
        return None

    def forward_flops(self, n_query: int, n_keys: int) -> float:
        self.calls += 1
        return self.cost(n_query, n_keys)


@pytest.mark.parametrize("cost, linear", [(lambda q, k: 2.0 * 1000 * q + 12.0 * q * k, True),
                                          (lambda q, k: 2.0 * 1000 * q + 12.0 * q * k + q * q, False)])
def test_the_meter_charges_forward_flops_without_calling_it_every_forward(cost, linear):
    """The meter reads a·Q + b·Q·K off the model once (forward_flops walks every parameter); a cost
    model of another form is called every forward, so the charge is always the model's own figure."""
    from diffspec.decoding.meter import CostMeter, MeteredModel

    model = _Costed(cost)
    meter = CostMeter()
    wrapped = MeteredModel(model, meter)
    shapes = [(1, 1), (3, 1), (1, 5), (2, 2), (1, 40)]  # (batch, Q) with no cache: n_keys = Q
    for B, Q in shapes:
        wrapped(torch.zeros(B, Q, dtype=torch.long))
        if (B, Q) == shapes[0]:
            after_first = model.calls
    assert meter.flops == pytest.approx(sum(B * cost(Q, Q) for B, Q in shapes), rel=1e-12)
    assert model.calls == after_first + (0 if linear else len(shapes) - 1)
