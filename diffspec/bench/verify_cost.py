"""What one verification and one draft cost on this machine, by size (issue #34, part 1).

    python -m diffspec.bench.verify_cost --out benchmarks/verify-cost-cpu            # SmolLM2, 1 and 2 threads
    python -m diffspec.bench.verify_cost --out DIR --model PATH --drafter D --vp-drafter V --context 200

Speculative decoding pays when τ tokens per round cost less than τ plain forwards. A round's cost
is one target forward over Q drafted tokens plus the drafting, so what decides it is the curve
t(Q) / t(1), not FLOPs: on a CPU at batch 1 a forward mostly streams the weights from memory, and Q
tokens ride along almost free until the matrix products turn compute-bound. This measures that
curve for the target (a KV-cached forward of Q new tokens after a `--context`-token prefix, its LM
head timed apart through `logits_mask`), and each drafter call as decoding makes it: context
features recomputed or read from a `ContextKV`, the head over the whole vocabulary or a draft
vocabulary, on the cells decoding reads. Each figure is the median of `--repeats` runs after one
warm-up, at each thread count, in one process, so ratios within a run compare like with like.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..models.causal import CausalKVCache, Qwen3Model
from ..models.dflash import ContextKV, DFlashDrafter
from ..models.matmul import KERNELS, linear_by
from .runner import load_during, machine_load

Q_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
GEMM_ROWS = (1, 2, 3, 4, 5, 8, 16, 32, 64, 128)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: allocator, kernels' first-call setup
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@torch.inference_mode()
def target_curve(target: Qwen3Model, context: list[int], sizes: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """ms of one KV-cached forward of Q new tokens after `context`, with and without the LM head."""
    dev = target.model.embed_tokens.weight.device
    P = len(context)
    cache = CausalKVCache.for_model(target, 1, P + max(sizes))
    target(torch.tensor([context], device=dev), kv_cache=cache)
    rows = []
    for Q in sizes:
        ids = torch.tensor([context[:Q]], device=dev)  # Q <= len(context), checked by main
        no_head = torch.zeros(1, Q, dtype=torch.bool, device=dev)

        def run(mask: torch.Tensor | None) -> None:
            cache.crop(P)
            target(ids, kv_cache=cache, logits_mask=mask)

        total = median_ms(lambda: run(None), repeats)
        body = median_ms(lambda: run(no_head), repeats)
        rows.append({"Q": Q, "ms": total, "ms_layers": body, "ms_head": max(0.0, total - body)})
    cache.crop(P)
    return rows


@torch.inference_mode()
def drafter_costs(drafter: DFlashDrafter, hidden: torch.Tensor, windows: int, repeats: int,
                  draft_vocab: torch.Tensor | None) -> dict[str, float]:
    """ms of one decoding call of `drafter` (`windows` windows of its block size after a context of
    `hidden` (1, C, L·H)): recomputing the context or reading a ContextKV, and each with the head over
    the whole vocabulary, over the read cells only, and over a draft vocabulary."""
    dev = hidden.device
    C, W = hidden.shape[1], drafter.config.block_size
    block = torch.full((windows, W), drafter.config.mask_token_id, device=dev)
    block[:, 0] = 1
    bpos, cpos = torch.arange(C, C + W, device=dev), torch.arange(C, device=dev)
    read = torch.zeros(windows, W, dtype=torch.bool, device=dev)
    read[:, 1:] = True  # every cell but the anchor (a VP window reads fewer)
    cache = ContextKV(drafter, C)
    cache.extend(drafter, hidden)
    saved = drafter.draft_vocab
    out: dict[str, float] = {}
    try:
        drafter.set_draft_vocab(None)
        out["recompute_context_full_head"] = median_ms(lambda: drafter(block, bpos, hidden, cpos), repeats)
        out["cached_context_full_head"] = median_ms(
            lambda: drafter(block, bpos, hidden, cpos, ctx_cache=cache, read=torch.ones_like(read)), repeats)
        out["cached_context_read_cells"] = median_ms(
            lambda: drafter(block, bpos, hidden, cpos, ctx_cache=cache, read=read), repeats)
        if draft_vocab is not None:
            drafter.set_draft_vocab(draft_vocab)
            out["cached_context_read_cells_draft_vocab"] = median_ms(
                lambda: drafter(block, bpos, hidden, cpos, ctx_cache=cache, read=read), repeats)
    finally:
        drafter.draft_vocab = saved
    return out


@torch.inference_mode()
def ar_drafter_costs(drafter: Qwen3Model, context: list[int], repeats: int) -> dict[str, float]:
    """ms of the AR drafter's decoding calls after `context`: one drafted token (Q = 1) and the
    catch-up after a fully accepted round (Q = 2), each with the head over the whole vocabulary and
    over the drafter's draft vocabulary when it has one (its head is most of what a token reads)."""
    P = len(context)
    cache = CausalKVCache.for_model(drafter, 1, P + 2)
    drafter(torch.tensor([context]), kv_cache=cache)

    def call(q: int) -> None:
        drafter(torch.tensor([[1] * q]), kv_cache=cache)
        cache.crop(P)

    saved = drafter.draft_vocab
    out: dict[str, float] = {}
    try:
        drafter.set_draft_vocab(None)
        out["one_token_full_head"] = median_ms(lambda: call(1), repeats)
        out["two_tokens_full_head"] = median_ms(lambda: call(2), repeats)
        if saved is not None:
            drafter.draft_vocab = saved
            out["one_token_draft_vocab"] = median_ms(lambda: call(1), repeats)
            out["two_tokens_draft_vocab"] = median_ms(lambda: call(2), repeats)
    finally:
        drafter.draft_vocab = saved
    return out


@torch.inference_mode()
def gemm_layouts(target: Qwen3Model, rows: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """ms of the target's matmuls alone for M rows by each kernel `models.matmul.linear` chooses from
    (F.linear's x · Wᵀ, the weight-left W · xᵀ, oneDNN's packed weight): the LM head, and every
    linear of the blocks once (one forward's worth). These set `linear`'s row thresholds."""
    w = target.model.embed_tokens.weight if target.config.tie_word_embeddings else target.lm_head.weight
    blocks = [m.weight for m in target.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    out = []
    for m in rows:
        xs = {n: torch.randn(m, n, dtype=w.dtype, device=w.device) for n in {b.shape[1] for b in blocks} | {w.shape[1]}}
        row: dict[str, Any] = {"rows": m}
        for how in KERNELS:
            row[f"head_{how}"] = median_ms(lambda: linear_by(how, xs[w.shape[1]], w), repeats)
            row[f"blocks_{how}"] = median_ms(lambda: [linear_by(how, xs[b.shape[1]], b) for b in blocks], repeats)
        out.append(row)
    return out


def _kernel_cell(g: dict[str, Any], part: str) -> str:
    """One table cell: the three kernels' ms, the fastest in bold (rows measured before the packed
    kernel existed show two)."""
    ms = {how: g[f"{part}_{how}"] for how in KERNELS if f"{part}_{how}" in g}
    best = min(ms, key=ms.__getitem__)
    return " / ".join(f"**{v:.1f}**" if how == best else f"{v:.1f}" for how, v in ms.items())


def gsm8k_context(tok: Any, target_dir: Path, n: int) -> list[int]:
    """The ids of GSM8K train questions (chat-templated when the target has a template), cut to `n`
    tokens: a realistic prefix."""
    from ..models.chat import ChatTemplate, ChatTemplateError
    from ..tasks import _read_jsonl, default_data_dir, gsm8k_prompt

    try:
        template: ChatTemplate | None = ChatTemplate.from_pretrained(target_dir)
    except ChatTemplateError:
        template = None
    ids: list[int] = []
    for row in _read_jsonl(default_data_dir() / "gsm8k" / "train.jsonl"):
        text = gsm8k_prompt(row["question"])
        ids += tok.encode(template.render([{"role": "user", "content": text}]) if template else text)
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the GSM8K train file holds fewer than {n} tokens")


def table(result: dict[str, Any]) -> str:
    load = result.get("load", {})
    lines = [f"Target: one KV-cached forward of Q new tokens after {result['context']} tokens, batch 1, "
             f"{result['dtype']} (median of {result['repeats']}; × = ms / ms at Q = 1). Load average "
             f"{load.get('loadavg_start', float('nan')):.1f} → {load.get('loadavg_end', float('nan')):.1f} "
             f"on {load.get('cores', '?')} cores.", ""]
    for threads, run in result["runs"].items():
        curve = run["target"]
        base = curve[0]["ms"]
        lines += [f"**{threads} thread(s)**", "",
                  "| Q | " + " | ".join(str(r["Q"]) for r in curve) + " |",
                  "|---|" + "---|" * len(curve),
                  "| ms (× Q=1) | " + " | ".join(f"{r['ms']:.0f} ({r['ms'] / base:.1f})" for r in curve) + " |",
                  "| of which LM head, ms | " + " | ".join(f"{r['ms_head']:.0f}" for r in curve) + " |", ""]
        gemm = run.get("gemm_layouts", [])
        if gemm:
            lines += ["The matmuls alone, ms by rows M: F.linear (x · Wᵀ) / weight-left (W · xᵀ) / oneDNN "
                      "packed (`models.matmul`; fastest in bold)", "",
                      "| M | " + " | ".join(str(g["rows"]) for g in gemm) + " |", "|---|" + "---|" * len(gemm)]
            for part, label in (("head", "LM head"), ("blocks", "the blocks' linears")):
                lines.append(f"| {label} | " + " | ".join(_kernel_cell(g, part) for g in gemm) + " |")
            lines.append("")
        for name, costs in run["drafters"].items():
            lines += [f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} ms" for k, v in costs.items()), ""]
    return "\n".join(lines).rstrip() + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for threads, run in result["runs"].items():
        curve = run["target"]
        base = curve[0]["ms"]
        qs = [r["Q"] for r in curve]
        ax.plot(qs, [r["ms"] / base for r in curve], marker="o", label=f"forward, {threads} thread(s)")
        ax.plot(qs, [r["ms_head"] / base for r in curve], marker=".", ls="--", label=f"LM head, {threads} thread(s)")
    ax.plot(qs, qs, color="grey", lw=0.8, ls=":", label="Q × (cost ∝ tokens)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("new tokens Q in one forward")
    ax.set_ylabel("time / time of a 1-token forward")
    ax.set_title(f"{result['model']}: verification cost by size ({result['context']}-token context)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffspec.bench.verify_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (results.json, table.md, curve.png)")
    p.add_argument("--model", default="smollm2", help="AR target (default smollm2)")
    p.add_argument("--drafter", help="DFlash drafter dir (default: the bundled one for the target)")
    p.add_argument("--vp-drafter", help="VP drafter dir (default: the bundled one for the target)")
    p.add_argument("--ar-drafter", help="ar-spec drafter dir (default: the bundled one for the target)")
    p.add_argument("--context", type=int, default=200, help="tokens before the verified ones (default 200)")
    p.add_argument("--threads", default="1,2", help="torch thread counts to measure (default 1,2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median; default 5)")
    p.add_argument("--sizes", default=",".join(map(str, Q_SIZES)), help="Q values (default 1..128)")
    p.add_argument("--vp-windows", type=int, default=5, help="VP windows per call (D²SD's K + 1; default 5)")
    a = p.parse_args(argv)
    from ..models.causal import load_causal
    from ..models.gguf import resolve_checkpoint
    from ..speculative.armethods import bundled_drafter, load_causal_or_default, load_dflash_or_default

    try:
        threads = [int(t) for t in a.threads.split(",")]
        sizes = tuple(int(q) for q in a.sizes.split(","))
    except ValueError:
        p.error("--threads and --sizes take comma-separated integers")
    if a.context < max(sizes) or a.repeats < 1 or min(threads) < 1 or min(sizes) < 1:
        p.error("need --context >= the largest Q, --repeats >= 1, and thread counts and Q values >= 1")
    tdir = Path(resolve_checkpoint(a.model))
    target, tok = load_causal(tdir, dtype=torch.float32)
    drafters = {"dflash": load_dflash_or_default(a.drafter, bundled_drafter("dflash", target), "drafter", target),
                "vp": load_dflash_or_default(a.vp_drafter, bundled_drafter("vp", target), "vp drafter", target)}
    ar_drafter = load_causal_or_default(a.ar_drafter, bundled_drafter("ar-spec", target), "ar drafter",
                                        torch.device("cpu"), torch.float32, tok, target)
    context = gsm8k_context(tok, tdir, a.context)
    with torch.inference_mode():
        layers = sorted({i for d in drafters.values() for i in d.config.target_layers})
        out = target(torch.tensor([context]), hidden_layers=layers)
        states = dict(zip(layers, out.hidden_states))
    result: dict[str, Any] = {"model": str(a.model), "context": a.context, "repeats": a.repeats,
                              "dtype": "float32", "torch": torch.__version__, "runs": {}}
    start = machine_load()
    for n in threads:
        torch.set_num_threads(n)
        print(f"[verify-cost] {n} thread(s): target", file=sys.stderr)
        run: dict[str, Any] = {"target": target_curve(target, context, sizes, a.repeats), "drafters": {},
                               "gemm_layouts": gemm_layouts(target, GEMM_ROWS, a.repeats)}
        for name, d in drafters.items():
            hidden = torch.cat([states[i] for i in d.config.target_layers], dim=-1)
            windows = 1 if name == "dflash" else a.vp_windows
            print(f"[verify-cost] {n} thread(s): {name} drafter ({windows} window(s))", file=sys.stderr)
            run["drafters"][f"{name} ({windows}×{d.config.block_size})"] = drafter_costs(
                d, hidden, windows, a.repeats, d.draft_vocab)
        run["drafters"]["ar-spec drafter"] = ar_drafter_costs(ar_drafter, context, a.repeats)
        result["runs"][str(n)] = run
    result["load"] = load_during(start)  # a busy machine flattens or bends the curve: say how busy it was
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "table.md").write_text(table(result))
    plot(result, out_dir / "curve.png")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
