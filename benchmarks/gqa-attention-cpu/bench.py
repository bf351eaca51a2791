"""Grouped-query attention on the CPU: repeating K/V heads (repeat_interleave) vs SDPA's enable_gqa.

Times `diffspec.models.layers.attend` both ways, alone at SmolLM2's head layout (9 query heads, 3
key/value heads, head_dim 64) and inside one KV-cached SmolLM2 decode step (one new token a row after a
300-token context) at batch 1 and 32. Medians of interleaved repeats, so both ways see the same machine;
the max difference of the outputs shows whether the two paths give the same numbers.

    OMP_NUM_THREADS=1 python benchmarks/gqa-attention-cpu/bench.py [--threads 1] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch

from diffspec.models import layers


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable, run in turn `repeats` times after one warm-up each."""
    for f in fns.values():
        f()
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            runs[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in runs.items()}


def with_native(native: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        old, layers._NATIVE_GQA = layers._NATIVE_GQA, native
        try:
            return fn()
        finally:
            layers._NATIVE_GQA = old
    return run


def attention_alone(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for B, Q, T in [(1, 1, 300), (1, 16, 316), (32, 1, 300), (32, 1, 550)]:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, h, n, 64, generator=g) for h, n in ((9, Q), (3, T), (3, T)))
        mask = torch.ones(B, 1, Q, T, dtype=torch.bool)
        mask[..., :5] = False  # left padding, as a batch has
        fns = {name: with_native(name == "enable_gqa", lambda: layers.attend(q, k, v, mask))
               for name in ("repeat_interleave", "enable_gqa")}
        ms = timed(fns, repeats)
        diff = (fns["repeat_interleave"]() - fns["enable_gqa"]()).abs().max().item()
        rows.append({"what": "attend", "batch": B, "queries": Q, "keys": T, **ms, "max_abs_diff": diff})
    return rows


@torch.inference_mode()
def decode_step(repeats: int) -> list[dict[str, Any]]:
    from diffspec.models.causal import CausalKVCache, load_causal
    from diffspec.models.gguf import resolve_checkpoint

    model, _ = load_causal(resolve_checkpoint("smollm2"), dtype=torch.float32)
    rows = []
    for B in (1, 32):
        ctx = torch.randint(100, 40000, (B, 300), generator=torch.Generator().manual_seed(1))
        x = torch.randint(100, 40000, (B, 1), generator=torch.Generator().manual_seed(2))
        cache = CausalKVCache.for_model(model, B, 302)
        model(ctx, kv_cache=cache)

        def step() -> torch.Tensor:
            out = model(x, kv_cache=cache).logits
            cache.crop(300)  # every timed step sees the same 300-token context
            return out

        fns = {name: with_native(name == "enable_gqa", step) for name in ("repeat_interleave", "enable_gqa")}
        ms = timed(fns, repeats)
        diff = (fns["repeat_interleave"]() - fns["enable_gqa"]()).abs().max().item()
        rows.append({"what": "SmolLM2 decode step", "batch": B, "queries": 1, "keys": 301, **ms, "max_abs_diff": diff})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    if not layers._NATIVE_GQA:
        raise SystemExit(f"torch {torch.__version__} has no SDPA enable_gqa (needs >= 2.5): nothing to compare")
    torch.set_num_threads(a.threads)
    rows = attention_alone(a.repeats) + decode_step(a.repeats)
    print("| what | batch | queries | keys | repeat_interleave ms | enable_gqa ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['batch']} | {r['queries']} | {r['keys']} | {r['repeat_interleave']:.3f} | "
              f"{r['enable_gqa']:.3f} | {r['repeat_interleave'] / r['enable_gqa']:.2f}x | {r['max_abs_diff']:.1e} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"threads": a.threads, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
