"""Large-shape timings on random weights: what only a GPU can measure (issue #22).

    python -m diffspec.bench.gpu --out DIR              # CUDA, LLaDA-8B and Qwen3-8B shapes, bf16
    python -m diffspec.bench.gpu --out DIR --dry-run    # CPU, tiny shapes, seconds (the test suite runs this)
    python -m diffspec.bench.gpu --summarize DIR        # summary.json / summary.md of a benchmarks/gpu/run.sh folder

The bundled models are too small to say anything about speed on a GPU (a 3.5 M-parameter
forward is all kernel launches), so the questions the decoding methods hinge on are asked
here of models with the real shapes and random weights:

* **LLaDA-8B** (32 layers, width 4096, MLP 12288, vocabulary 126464; 8.0 B parameters, 16 GB
  in bf16): one full bidirectional forward at batch 1 x 256 / 512 / 1024 positions, against
  the device's roofline (weight bytes / memory bandwidth, FLOPs / matrix rate, both measured
  here); one Fast-dLLM dual-cache step (a block of 32 queries attending to all L cached keys,
  fed through the model's `kv_cache` hook exactly as `decoding/cache.py`'s KVStore does); and a
  batched verification of 1, 2, 4, 8 views (batch = views), full canvas and dual-cache block:
  are extra views nearly free (PSD, DualDiffusion)?
* **Qwen3-8B** (36 layers, width 4096, GQA 32/8, head 128, vocabulary 151936, untied head; 8.2 B
  parameters) as the AR target: one decode step with a KV cache, against a chain verification
  of 1 + 16 tokens (DFlash) and a D²SD tree verification of 4 branches x 32 tokens (129 nodes,
  tree attention mask through `attn_mask_override`, as `spec/d2sd.py` calls it), plus the same
  129 tokens with a plain causal mask (what the tree mask costs) and the tree under each SDPA
  backend forced in turn.

Models are built on the meta device, cast to bf16 there (free), materialised on the GPU with
`to_empty` and initialised in place (N(0, 0.02), norms 1): no fp32 copy ever exists. Times are
CUDA events around one call, after warm-up, median of N (min and max kept); CUDA-graph replays
of the decode step and of the dual-cache step show how much of eager time is launch overhead.
Results are written after every measurement (DIR/gpu.json, DIR/gpu.md), so a run stopped by its
timeout keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..decoding.meter import sync_device
from ..models.causal import CausalKVCache, Qwen3Config, Qwen3Model
from ..models.llada import LLaDAConfig, LLaDAModel, RMSNorm
from ..speculative.tree import DraftTree

# LLaDA-8B-Base/Instruct's config.json (the fields that change the shapes).
LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                embedding_size=126464, rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=4096,
                mask_token_id=126336, eos_token_id=126081, weight_tying=False)
# Qwen3-8B's config.json.
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                max_position_embeddings=40960, tie_word_embeddings=False)
# --dry-run: the same code on CPU in seconds.
LLADA_TINY = dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128, vocab_size=300,
                  max_sequence_length=256, mask_token_id=1, eos_token_id=0)
QWEN3_TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)

FULL = dict(positions=(256, 512, 1024), block=32, views=(1, 2, 4, 8), view_positions=512, past=(256, 512, 1024),
            branches=4, branch_len=32, chain=16, bw_bytes=2 << 30, mm=8192, warmup=3, reps=10)
DRY = dict(positions=(16, 32, 64), block=8, views=(1, 2, 4, 8), view_positions=32, past=(16, 32), branches=4,
           branch_len=8, chain=4, bw_bytes=8 << 20, mm=128, warmup=1, reps=3)
# The vendor's datasheet figures for the H200 SXM (leads only: the measured ones are used for bounds).
H200_DATASHEET = {"hbm_tb_s": 4.8, "bf16_dense_tflop_s": 989.0}


# ---------------------------------------------------------------- timing


class Timer:
    """Median-of-N wall time of a callable: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def sync(self) -> None:
        sync_device(self.device)

    def __call__(self, fn: Callable[[], Any], reps: int | None = None) -> dict[str, float]:
        reps = reps or self.reps
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}

    def graph(self, fn: Callable[[], Any]) -> dict[str, float]:
        """The same, replaying a CUDA graph of `fn` (launch overhead gone); CUDA only."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        out = self(g.replay)
        del g
        return out


# ---------------------------------------------------------------- models


def materialise(model_cls: type[nn.Module], cfg: Any, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> nn.Module:
    """Build on the meta device, cast there, allocate on `device` and fill in place: never an fp32 copy."""
    with torch.device("meta"):
        model = model_cls(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02, generator=gen)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
    return model.eval()


def weight_bytes(model: nn.Module, skip_embedding: bool) -> int:
    """Bytes of the weights one forward reads: an untied input embedding is a row lookup, not a read."""
    emb = model.transformer.wte.weight if isinstance(model, LLaDAModel) else model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if not (skip_embedding and p is emb))


class DualCacheHook:
    """The model's KVCacheHook as KVStore uses it in a dual-cache step: the block's fresh K/V are
    scattered into per-layer buffers holding every canvas position, and the block attends to all."""

    def __init__(self, model: LLaDAModel, batch: int, length: int, block: Tensor):
        cfg = model.config
        w = model.transformer.wte.weight
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        self.k = [torch.zeros(shape, device=w.device, dtype=w.dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=w.device, dtype=w.dtype) for _ in range(cfg.n_layers)]
        self.block = block

    def key_mask(self, attention_mask: Tensor | None, n_query: int) -> Tensor | None:
        return attention_mask  # every key attended (KVStore's `_all_keys` path)

    def layer(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[index].index_copy_(2, self.block, k)
        self.v[index].index_copy_(2, self.block, v)
        return self.k[index], self.v[index]


# ---------------------------------------------------------------- the run


class Run:
    def __init__(self, out: Path, dry_run: bool, device: torch.device, dtype: torch.dtype, shapes: dict[str, Any]):
        self.out, self.dry_run, self.device, self.dtype, self.s = out, dry_run, device, dtype, shapes
        self.timer = Timer(device, shapes["warmup"], shapes["reps"])
        self.result: dict[str, Any] = {"dry_run": dry_run, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                                       "environment": environment(device), "shapes": {k: list(v) if isinstance(v, tuple)
                                                                                        else v for k, v in shapes.items()},
                                       "device_ceilings": {}, "llada": {}, "qwen3": {}, "errors": []}
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        (self.out / "gpu.json").write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        (self.out / "gpu.md").write_text(format_gpu_markdown(self.result))

    def measure(self, section: str, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one measurement; record it (or its error) and save at once."""
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                row = fn()
        except Exception as e:  # one broken measurement must not lose the rest of the device time
            row = None
            self.result["errors"].append({"section": section, "name": name, "error": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc(limit=4)})
            print(f"[gpu] {section}/{name}: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            self.result[section][name] = row
            print(f"[gpu] {section}/{name}: {_brief(row)} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        self.save()
        return row

    # ---- the device's own ceilings

    def ceilings(self) -> None:
        def bandwidth() -> dict[str, Any]:
            n = self.s["bw_bytes"] // 2
            src = torch.empty(n, dtype=torch.bfloat16, device=self.device).normal_()
            dst = torch.empty_like(src)
            t = self.timer(lambda: dst.copy_(src))
            moved = 2 * src.numel() * src.element_size()  # read + write
            return {**t, "bytes_moved": moved, "tb_s": moved / (t["ms"] * 1e-3) / 1e12,
                    "how": "device-to-device copy_ of a bf16 tensor, bytes read + written"}

        def matmul() -> dict[str, Any]:
            n = self.s["mm"]
            a = torch.randn(n, n, device=self.device, dtype=self.dtype)
            b = torch.randn(n, n, device=self.device, dtype=self.dtype)
            t = self.timer(lambda: a @ b)
            return {**t, "n": n, "tflop_s": 2 * n ** 3 / (t["ms"] * 1e-3) / 1e12,
                    "how": f"{n}x{n}x{n} matmul in {str(self.dtype).replace('torch.', '')}, random data"}

        self.measure("device_ceilings", "memory_bandwidth", bandwidth)
        self.measure("device_ceilings", "matmul", matmul)
        if self.device.type == "cuda":
            self.result["device_ceilings"]["datasheet_h200"] = H200_DATASHEET

    def bounds(self, n_bytes: float, flops: float) -> dict[str, float]:
        """Roofline of one call: max(weight bytes / bandwidth, FLOPs / matrix rate), in ms."""
        c = self.result["device_ceilings"]
        out: dict[str, float] = {}
        if "memory_bandwidth" in c:
            out["memory_bound_ms"] = n_bytes / (c["memory_bandwidth"]["tb_s"] * 1e12) * 1e3
        if "matmul" in c:
            out["compute_bound_ms"] = flops / (c["matmul"]["tflop_s"] * 1e12) * 1e3
        if out:
            out["roofline_ms"] = max(out.values())
        return out

    def row(self, t: dict[str, float], tokens: int, n_bytes: float, flops: float, **extra: Any) -> dict[str, Any]:
        r = {**t, "tokens": tokens, "tokens_per_s": tokens / (t["ms"] * 1e-3), "gflop": flops / 1e9,
             "tflop_s": flops / (t["ms"] * 1e-3) / 1e12, "weight_gb": n_bytes / 1e9, **self.bounds(n_bytes, flops),
             **extra}
        if "roofline_ms" in r:
            r["fraction_of_roofline"] = r["roofline_ms"] / r["ms"]
        return r

    # ---- LLaDA-8B

    def llada(self) -> None:
        cfg = LLaDAConfig(**(LLADA_TINY if self.dry_run else LLADA_8B))
        t0 = time.perf_counter()
        model = materialise(LLaDAModel, cfg, self.device, self.dtype)
        self.timer.sync()
        nbytes = weight_bytes(model, skip_embedding=not cfg.weight_tying)
        self.result["llada"]["model"] = {
            "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}, "params": sum(p.numel() for p in model.parameters()),
            "weight_bytes_read_per_forward": nbytes, "materialise_s": time.perf_counter() - t0,
            "memory_allocated_gb": torch.cuda.memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None}
        self.save()
        gen = torch.Generator(device=self.device).manual_seed(0)

        def ids(b: int, n: int) -> Tensor:
            return torch.randint(0, cfg.vocab_size, (b, n), device=self.device, generator=gen)

        def full(b: int, n: int) -> dict[str, Any]:
            x = ids(b, n)
            t = self.timer(lambda: model(x))
            return self.row(t, b * n, nbytes, b * model.forward_flops(n, n), batch=b, positions=n)

        def dual(b: int, n: int, graph: bool = False) -> dict[str, Any]:
            blk = self.s["block"]
            x = ids(b, blk)
            pos = torch.arange(n - blk, n, device=self.device)  # the last block of the canvas
            hook = DualCacheHook(model, b, n, pos)
            step = lambda: model(x, positions=pos, kv_cache=hook)  # noqa: E731
            t = self.timer.graph(step) if graph else self.timer(step)
            return self.row(t, b * blk, nbytes, b * model.forward_flops(blk, n), batch=b, positions=n, queries=blk,
                            keys=n, cuda_graph=graph)

        for n in self.s["positions"]:
            self.measure("llada", f"full_b1_L{n}", lambda n=n: full(1, n))
        for n in self.s["positions"]:
            r = self.measure("llada", f"dual_cache_step_b1_L{n}", lambda n=n: dual(1, n))
            f = self.result["llada"].get(f"full_b1_L{n}")
            if r and f:
                r["speedup_vs_full"] = f["ms"] / r["ms"]
        L = self.s["view_positions"]
        for kind, fn in (("full", full), ("dual_cache", dual)):
            base = None
            for v in self.s["views"]:
                r = self.measure("llada", f"views_{kind}_L{L}_x{v}", lambda v=v, fn=fn: fn(v, L))
                if r is None:
                    continue
                base = base or r["ms"]
                r.update(views=v, ms_per_view=r["ms"] / v, cost_vs_one_view=r["ms"] / base)
        if self.device.type == "cuda":  # last: a failed capture must not disturb the eager numbers
            n = self.s["positions"][-1]
            r = self.measure("llada", f"dual_cache_step_b1_L{n}_cuda_graph", lambda: dual(1, n, graph=True))
            e = self.result["llada"].get(f"dual_cache_step_b1_L{n}")
            if r and e:
                r["speedup_vs_eager"] = e["ms"] / r["ms"]
        self.save()
        del model
        self._free()

    # ---- Qwen3-8B

    def qwen3(self) -> None:
        cfg = Qwen3Config(**(QWEN3_TINY if self.dry_run else QWEN3_8B))
        t0 = time.perf_counter()
        model = materialise(Qwen3Model, cfg, self.device, self.dtype)
        self.timer.sync()
        nbytes = weight_bytes(model, skip_embedding=not cfg.tie_word_embeddings)
        self.result["qwen3"]["model"] = {
            "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}, "params": sum(p.numel() for p in model.parameters()),
            "weight_bytes_read_per_forward": nbytes, "materialise_s": time.perf_counter() - t0}
        self.save()
        gen = torch.Generator(device=self.device).manual_seed(1)
        nb, bl = self.s["branches"], self.s["branch_len"]
        max_len = max(self.s["past"]) + 1 + nb * bl + 8
        cache = CausalKVCache.for_model(model, 1, max_len)

        def tokens(n: int) -> Tensor:
            return torch.randint(0, cfg.vocab_size, (1, n), device=self.device, generator=gen)

        def tree_inputs(past: int) -> tuple[Tensor, Tensor, Tensor]:
            # 4 branches of 32 tokens below one anchor, no shared prefixes: 1 + 128 nodes
            draws = tokens(1 + nb * bl)[0].tolist()
            branches = [draws[1 + b * bl: 1 + (b + 1) * bl] for b in range(nb)]
            tree = DraftTree.from_branches(draws[0], branches)
            ids = torch.tensor([tree.tokens], device=self.device)
            return ids, tree.positions(past, self.device), tree.attention_mask(past, self.device)[None, None]

        def call(past: int, ids: Tensor, **kw: Any) -> Callable[[], Any]:
            def step() -> Any:
                cache.crop(past)  # the committed prefix stays; the last call's tokens are dropped
                return model(ids, kv_cache=cache, **kw)
            return step

        def timed(past: int, ids: Tensor, graph: bool = False, **kw: Any) -> dict[str, Any]:
            cache.length = past  # slots [0, past) hold whatever: the timing does not depend on their values
            step = call(past, ids, **kw)
            t = self.timer.graph(step) if graph else self.timer(step)
            q = ids.shape[1]
            return self.row(t, q, nbytes, model.forward_flops(q, past + q), past=past, queries=q, cuda_graph=graph)

        for past in self.s["past"]:
            one = tokens(1)
            dec = self.measure("qwen3", f"decode_step_past{past}", lambda p=past, x=one: timed(p, x))
            chain = tokens(1 + self.s["chain"])
            ids, pos, mask = tree_inputs(past)
            rows = {
                f"chain_verify_{1 + self.s['chain']}_past{past}": lambda p=past, x=chain: timed(p, x),
                f"tree_verify_{nb}x{bl}_past{past}": lambda p=past, x=ids, q=pos, m=mask: timed(
                    p, x, positions=q, attn_mask_override=m),
                f"causal_{ids.shape[1]}_past{past}": lambda p=past, x=ids: timed(p, x),
            }
            for name, fn in rows.items():
                r = self.measure("qwen3", name, fn)
                if r and dec:
                    r["cost_vs_decode_step"] = r["ms"] / dec["ms"]
        if self.device.type == "cuda":
            past = self.s["past"][-1]
            ids, pos, mask = tree_inputs(past)
            self.measure("qwen3", f"tree_verify_{nb}x{bl}_past{past}_by_sdpa_backend",
                         lambda: self._backends(lambda: timed(past, ids, positions=pos, attn_mask_override=mask)))
            one = tokens(1)  # last: a failed capture must not disturb the eager numbers
            r = self.measure("qwen3", f"decode_step_past{past}_cuda_graph", lambda: timed(past, one, graph=True))
            e = self.result["qwen3"].get(f"decode_step_past{past}")
            if r and e:
                r["speedup_vs_eager"] = e["ms"] / r["ms"]
        self.save()
        del model, cache
        self._free()

    def _backends(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Time `fn` with each SDPA backend forced in turn: which kernels take a tree mask, at what cost."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        out: dict[str, Any] = {}
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            try:
                with sdpa_kernel(backend):
                    out[name.lower()] = fn()["ms"]
            except Exception as e:  # a backend that refuses the mask / dtype / shape
                out[name.lower()] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return {"ms_by_backend": out, "ms": min((v for v in out.values() if isinstance(v, float)), default=float("nan"))}

    def _free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _brief(row: dict[str, Any]) -> str:
    if "tb_s" in row:
        return f"{row['ms']:.3f} ms, {row['tb_s']:.2f} TB/s"
    if "ms_by_backend" in row:
        return ", ".join(f"{k} {v:.3f} ms" if isinstance(v, float) else f"{k} refused" for k, v in
                         row["ms_by_backend"].items())
    s = f"{row['ms']:.3f} ms"
    if "tflop_s" in row:
        s += f", {row['tflop_s']:.1f} TFLOP/s"
    if "fraction_of_roofline" in row:
        s += f", {row['fraction_of_roofline']:.0%} of roofline"
    return s


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "machine": platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gb=p.total_memory / 1e9, multiprocessors=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                   mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled())
    return env


# ---------------------------------------------------------------- markdown


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def _f(x: Any, fmt: str = ".2f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "–"


def format_gpu_markdown(r: dict[str, Any]) -> str:
    env = r.get("environment", {})
    lines = [f"# Large-shape timings ({'dry run, tiny shapes' if r.get('dry_run') else 'random weights'})", "",
             f"{env.get('gpu', r.get('device'))}, {r.get('dtype')}, torch {env.get('torch')}, CUDA {env.get('cuda', '–')}; "
             f"times in ms, median of {r.get('shapes', {}).get('reps', 'N')} calls after "
             f"{r.get('shapes', {}).get('warmup', 'some')} warm-up calls "
             f"({'CUDA events' if str(r.get('device', '')).startswith('cuda') else 'perf_counter'}). "
             "Roofline = max(weight bytes / measured bandwidth, FLOPs / measured matrix rate).", ""]
    c = r.get("device_ceilings", {})
    if c:
        bw, mm = c.get("memory_bandwidth", {}), c.get("matmul", {})
        lines += ["| ceiling | measured | how |", "|---|---|---|",
                  f"| memory bandwidth | {_f(bw.get('tb_s'))} TB/s | {bw.get('how', '–')} |",
                  f"| matrix rate | {_f(mm.get('tflop_s'), '.0f')} TFLOP/s | {mm.get('how', '–')} |"]
        if "datasheet_h200" in c:
            d = c["datasheet_h200"]
            lines.append(f"| datasheet (H200 SXM) | {d['hbm_tb_s']} TB/s, {d['bf16_dense_tflop_s']:.0f} TFLOP/s | vendor |")
        lines.append("")
    for section, title in (("llada", "LLaDA-8B shape"), ("qwen3", "Qwen3-8B shape (AR target)")):
        s = r.get(section, {})
        m = s.get("model")
        rows = {k: v for k, v in s.items() if k != "model"}
        if not m and not rows:
            continue
        lines.append(f"## {title}")
        if m:
            lines += ["", f"{_count(m['params'])} parameters, {m['weight_bytes_read_per_forward'] / 1e9:.3g} GB of "
                      f"weights read per forward, materialised in {m['materialise_s']:.1f} s.", ""]
        lines += ["| measurement | ms | min ms | tokens/s | TFLOP/s | roofline ms | of roofline | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, v in rows.items():
            if "ms_by_backend" in v:
                b = ", ".join(f"{k} {x:.3f}" if isinstance(x, float) else f"{k}: refused" for k, x in v["ms_by_backend"].items())
                lines.append(f"| {name} | {b} | | | | | | |")
                continue
            ratio = ""
            for key, label in (("speedup_vs_full", "× faster than full"), ("cost_vs_one_view", "× one view"),
                               ("cost_vs_decode_step", "× decode step"), ("speedup_vs_eager", "× faster than eager")):
                if key in v:
                    ratio = f"{v[key]:.2f}{label}"
            lines.append(f"| {name} | {_f(v.get('ms'), '.3f')} | {_f(v.get('min_ms'), '.3f')} | "
                         f"{_f(v.get('tokens_per_s'), ',.0f')} | {_f(v.get('tflop_s'), '.1f')} | "
                         f"{_f(v.get('roofline_ms'), '.3f')} | {_f(v.get('fraction_of_roofline'), '.0%')} | {ratio} |")
        lines.append("")
    if r.get("errors"):
        lines += ["## Errors", ""] + [f"- {e['section']}/{e['name']}: {e['error']}" for e in r["errors"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the run.sh summary


def _junit_counts(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    tot["failed_tests"] = bad
    return tot


def _cuda_report_markdown(rep: dict[str, Any]) -> list[str]:
    """tests/test_cuda.py's measurements ($DIFFSPEC_CUDA_REPORT) as tables."""
    md: list[str] = []
    split = {}
    for key, v in rep.items():
        parts = key.split("/")
        if len(parts) == 3 and isinstance(v, dict):
            split.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = v
    if "lossless" in split:
        md += ["## Lossless methods: share of prompts with ids identical to the greedy reference", "",
               "| method | fp32 (asserted) | bf16 (measured) | bf16 greedy = fp32 greedy | prompts |", "|---|---|---|---|---|"]
        for name, by in split["lossless"].items():
            f, b = by.get("fp32", {}), by.get("bf16", {})
            md.append(f"| {name} | {_f(f.get('agreement'), '.1%')} | {_f(b.get('agreement'), '.1%')} | "
                      f"{_f(b.get('bf16_reference_equal_to_fp32'), '.1%')} | {f.get('n', b.get('n', '–'))} |")
        md.append("")
    if "logits" in split:
        md += ["## Logits against fp32 (bundled models)", "", "| model | dtype | max_rel | mean_rel | top-1 |",
               "|---|---|---|---|---|"]
        for name, by in split["logits"].items():
            for dt, v in by.items():
                md.append(f"| {name} | {dt} | {_f(v.get('max_rel'), '.4f')} | {_f(v.get('mean_rel'), '.4f')} | "
                          f"{_f(v.get('top1'), '.2%')} |")
        md.append("")
    if "batch_invariance" in split:
        md += ["## Batch invariance: rows of a batch of 8 against the same row alone", "",
               "| model | dtype | max abs Δlogit | argmax agreement | bitwise equal |", "|---|---|---|---|---|"]
        for name, by in split["batch_invariance"].items():
            for dt, v in by.items():
                md.append(f"| {name} | {dt} | {_f(v.get('max_abs_diff'), '.3g')} | "
                          f"{_f(v.get('argmax_agreement'), '.2%')} | {v.get('bitwise_equal', '–')} |")
        md.append("")
    return md


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """Collect a benchmarks/gpu/run.sh folder into summary.json and summary.md (and return it)."""
    d = Path(run_dir)
    out: dict[str, Any] = {"run_dir": str(d), "stages": []}
    tsv = d / "stages.tsv"
    if tsv.is_file():
        for line in tsv.read_text().splitlines():
            name, status, rc, secs, limit, note = (line.split("\t") + [""] * 6)[:6]
            out["stages"].append({"stage": name, "status": status, "rc": rc, "seconds": secs, "limit_s": limit,
                                  "note": note})
    for f in ("env.json",):
        if (d / f).is_file():
            try:
                out["env"] = json.loads((d / f).read_text())
            except ValueError:
                pass
    junit = d / "cuda-tests.xml"
    if junit.is_file():
        try:
            out["cuda_tests"] = _junit_counts(junit)
        except ET.ParseError as e:
            out["cuda_tests"] = {"error": str(e)}
    agree = d / "cuda-report.json"
    if agree.is_file():
        try:
            out["cuda_report"] = json.loads(agree.read_text())
        except ValueError as e:
            out["cuda_report"] = {"error": str(e)}
    md = [f"# benchmarks/gpu/run.sh: {d.name}", "", "| stage | status | seconds | limit s | note |", "|---|---|---|---|---|"]
    md += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['limit_s']} | {s['note']} |" for s in out["stages"]]
    md.append("")
    if "cuda_tests" in out:
        t = out["cuda_tests"]
        md += ["## CUDA tests (pytest -m cuda)", "",
               "passed {passed}, failed {failures}, errors {errors}, skipped {skipped} of {tests}".format(
                   **{k: t.get(k, "?") for k in ("passed", "failures", "errors", "skipped", "tests")}), ""]
        md += [f"- failed: {n}" for n in t.get("failed_tests", [])]
        md.append("")
    md += _cuda_report_markdown(out.get("cuda_report", {}))
    if (d / "gpu" / "gpu.md").is_file():
        md += [(d / "gpu" / "gpu.md").read_text().replace("\n# ", "\n## ", 1).replace("# ", "## ", 1), ""]
    if (d / "decode" / "decode.md").is_file():  # the decode-loop stage (bench.decode_loop)
        md += [(d / "decode" / "decode.md").read_text().replace("# ", "## ", 1), ""]
    bench = d / "bench"
    if bench.is_dir():
        out["bench"] = {}
        for sd in sorted(p for p in bench.iterdir() if p.is_dir()):
            res = sd / "results.json"
            if res.is_file():
                r = json.loads(res.read_text())
                out["bench"][sd.name] = {"n": r.get("n"), "rows": len(r.get("rows", [])),
                                         "wall_seconds": sum(x.get("wall_seconds", 0) for x in r.get("rows", []))}
            if (sd / "table.md").is_file():
                md += [f"## bench {sd.name}", "", (sd / "table.md").read_text().strip(), ""]
    (d / "summary.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (d / "summary.md").write_text("\n".join(md) + "\n")
    return out


# ---------------------------------------------------------------- CLI


def device_parser(prog: str, doc: str, out: str, dry_run: str) -> argparse.ArgumentParser:
    """The options every GPU-run script shares: --out, --dry-run, --device, --dtype."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--out", default=out[0], help=f"output folder ({out[1]})")
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    p.add_argument("--device", help="cuda (default) | cpu")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) | float16 | float32")
    return p


def device_of(a: argparse.Namespace, prog: str) -> tuple[torch.device, torch.dtype] | None:
    """The run's device and dtype, or None after printing why not (no CUDA, unknown dtype)."""
    device = torch.device(a.device or ("cpu" if a.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: error: no CUDA device (use --dry-run for the CPU smoke run)", file=sys.stderr)
        return None
    dtype = getattr(torch, a.dtype, None)
    if not isinstance(dtype, torch.dtype):
        print(f"{prog}: error: unknown dtype {a.dtype!r}", file=sys.stderr)
        return None
    return device, dtype


def main(argv: list[str] | None = None) -> int:
    p = device_parser("python -m diffspec.bench.gpu", __doc__, ("gpu-out", "gpu.json, gpu.md"),
                      "tiny shapes on CPU in seconds (default device cpu)")
    p.add_argument("--only", default="llada,qwen3", help="comma-separated: llada, qwen3")
    p.add_argument("--reps", type=int, help="timed calls per measurement (median taken)")
    p.add_argument("--warmup", type=int, help="untimed calls before each measurement")
    p.add_argument("--summarize", metavar="RUN_DIR", help="write summary.json / summary.md of a run.sh folder and exit")
    a = p.parse_args(argv)
    if a.summarize:
        summarize(a.summarize)
        print((Path(a.summarize) / "summary.md").read_text())
        return 0
    picked = device_of(a, "diffspec.bench.gpu")
    if picked is None:
        return 2
    device, dtype = picked
    shapes = dict(DRY if a.dry_run else FULL)
    if a.reps:
        shapes["reps"] = a.reps
    if a.warmup is not None:
        shapes["warmup"] = a.warmup
    run = Run(Path(a.out), a.dry_run, device, dtype, shapes)
    run.ceilings()
    parts = {s.strip() for s in a.only.split(",") if s.strip()}
    for name in ("llada", "qwen3"):
        if name not in parts:
            continue
        try:
            getattr(run, name)()
        except Exception as e:  # e.g. out of memory while materialising: keep the other model's numbers
            run.result["errors"].append({"section": name, "name": "model", "error": f"{type(e).__name__}: {e}",
                                         "traceback": traceback.format_exc(limit=6)})
            print(f"[gpu] {name}: {type(e).__name__}: {e}", file=sys.stderr)
            run._free()
    run.result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    run.save()
    print(format_gpu_markdown(run.result))
    print(f"wrote {run.out / 'gpu.json'}, {run.out / 'gpu.md'}", file=sys.stderr)
    return 1 if run.result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
