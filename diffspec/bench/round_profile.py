"""Where a speculative round's time goes (issue #34, part 2).

    python -m diffspec.bench.round_profile --out benchmarks/round-profile-cpu     # SmolLM2, GSM8K chat prompts

For each method (ar, ar-spec, dflash, d2sd by default) the same prompts are decoded twice. The
first pass times every model call (each `MeteredModel` and drafter call, by the meter's model
name) with the wall clock: what is left of the decode is host-side work (drafting bookkeeping,
tree building, acceptance, Python, allocation). The second pass runs under `torch.profiler`
with shapes recorded, to split each model's time into its LM head (the matmul whose weight has a
vocabulary's rows) and the rest. The profiler slows Python and keeps every op event, so it profiles one short answer
(the first prompt's first 32 tokens), and the split is reported as a share of each model's
profiled time, applied to the first pass's unprofiled times.

`--paired` asks another question: does a target forward cost more inside decoding than the same
forward alone (verify-cost's isolated curve)? Right after each cached target call of a decode, the
same number of new tokens goes through the target again on a standalone cache of the same length,
and both are timed. Pairs taken a few milliseconds apart see the same machine, so their ratio is
free of the drift between runs that comparing two benchmarks' medians is not.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..decoding import meter as meter_mod
from ..speculative import d2sd as d2sd_mod

METHODS = ("ar", "ar-spec", "dflash", "d2sd")
PROFILED_TOKENS = 32  # tokens of the one profiled answer (the first prompt's)


@contextmanager
def timed_calls(times: dict[str, float], label: bool) -> Iterator[None]:
    """Time every model call by meter name (and, with `label`, mark it for the profiler)."""
    originals = {cls: cls.__call__ for cls in (meter_mod.MeteredModel, d2sd_mod._MeteredDrafter)}

    def wrap(orig: Any) -> Any:
        def call(self: Any, *args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            if label:
                with torch.profiler.record_function(f"model::{self.name}"):
                    out = orig(self, *args, **kw)
            else:
                out = orig(self, *args, **kw)
            times[self.name] += time.perf_counter() - t0
            return out
        return call

    for cls, orig in originals.items():
        cls.__call__ = wrap(orig)
    try:
        yield
    finally:
        for cls, orig in originals.items():
            cls.__call__ = orig


def head_shares(prof: Any, vocab_rows: set[int]) -> dict[str, float]:
    """Per model label: the share of its profiled CPU time spent in LM-head matmuls (a matmul whose
    weight has one of `vocab_rows` rows)."""
    total: dict[str, float] = defaultdict(float)
    head: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.name.startswith("model::"):
            total[ev.name[7:]] += ev.cpu_time_total
            continue
        # F.linear(x, W) and oneDNN's packed product: the weight is the second operand;
        # `models.matmul.linear`'s weight-left product mm(W, xᵀ): the first
        weight_at = {"aten::linear": 1, "aten::mm": 0, "mkldnn::_linear_pointwise": 1}.get(ev.name)
        shapes = ev.input_shapes
        if weight_at is None or len(shapes) < 2 or len(shapes[weight_at]) != 2 or shapes[weight_at][0] not in vocab_rows:
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("model::"):
            parent = parent.cpu_parent
        if parent is not None:
            head[parent.name[7:]] += ev.cpu_time_total
    return {k: head[k] / total[k] for k in total if total[k] > 0}


def profile_method(spec: str, model: Any, tok: Any, prompts: list[str], gen_length: int) -> dict[str, Any]:
    from ..api import generate
    from .runner import parse_spec

    method, opts = parse_spec(spec)
    times: dict[str, float] = defaultdict(float)
    with timed_calls(times, label=False):
        t0 = time.perf_counter()
        res = generate(prompts, model=model, tokenizer=tok, method=method, gen_length=gen_length, batch_size=1,
                       **opts)
        wall = time.perf_counter() - t0
    rows = res.meter.summary()["models"]
    vocab_rows = {model.config.vocab_size}  # and the bundled drafters' draft vocabularies
    from ..models.draft_vocab import DRAFT_VOCAB_FILE
    from ..speculative.armethods import bundled_drafter

    for kind in ("ar-spec", "dflash", "vp"):
        f = bundled_drafter(kind, model) / DRAFT_VOCAB_FILE
        if f.is_file():
            vocab_rows.add(len(json.loads(f.read_text())["ids"]))
    # The profiler keeps every op event (gigabytes over a long decode): the head's share is a ratio,
    # so one short answer measures it.
    with timed_calls(defaultdict(float), label=True), torch.profiler.profile(record_shapes=True) as prof:
        generate(prompts[:1], model=model, tokenizer=tok, method=method, gen_length=min(gen_length, PROFILED_TOKENS),
                 batch_size=1, **opts)
    shares = head_shares(prof, vocab_rows)
    s = res.stats or {}
    rounds = s.get("rounds") or res.meter.tokens_generated
    out: dict[str, Any] = {"method": spec, "wall_s": wall, "tokens": res.meter.tokens_generated,
                           "rounds": rounds, "acceptance_length": s.get("acceptance_length"), "models": {}}
    for name, secs in times.items():
        out["models"][name] = {"s": secs, "calls": rows[name]["nfe"], "head_share": shares.get(name, 0.0),
                               "head_s": secs * shares.get(name, 0.0)}
    out["host_s"] = wall - sum(times.values())
    return out


def paired_forwards(spec: str, model: Any, tok: Any, prompts: list[str], gen_length: int) -> list[dict[str, Any]]:
    """Per width Q of the target's cached forwards in a decode of `spec`: median ms inside decoding,
    median ms of the same call alone right after it (a standalone cache at the same length, every
    other argument the decode's), and the median of the per-pair ratios."""
    import statistics

    from ..api import generate
    from ..models.causal import CausalKVCache
    from .runner import parse_spec

    method, opts = parse_spec(spec)
    alone: list[CausalKVCache] = []  # the standalone cache, shaped like the decode's on first use
    pairs: dict[int, list[tuple[float, float]]] = defaultdict(list)
    orig = meter_mod.MeteredModel.__call__

    def call(self: Any, ids: torch.Tensor, **kw: Any) -> Any:
        cache = kw.get("kv_cache")
        past = cache.length if cache is not None else 0
        t0 = time.perf_counter()
        out = orig(self, ids, **kw)
        inside = time.perf_counter() - t0
        if self.model is model and past > 0 and ids.shape[0] == 1:
            if not alone or alone[0].max_len != cache.max_len:
                alone[:] = [CausalKVCache.for_model(model, 1, cache.max_len)]
            alone[0].length = past  # what its slots hold does not change what the forward costs
            t0 = time.perf_counter()
            same = {k: v for k, v in kw.items() if k != "sequences"}  # the meter's own argument
            model(ids, **{**same, "kv_cache": alone[0]})  # the same call (tree mask, positions, taps)
            pairs[ids.shape[1]].append((inside, time.perf_counter() - t0))
        return out

    meter_mod.MeteredModel.__call__ = call
    try:
        generate(prompts, model=model, tokenizer=tok, method=method, gen_length=gen_length, batch_size=1, **opts)
    finally:
        meter_mod.MeteredModel.__call__ = orig
    return [{"method": spec, "q": q, "n": len(v), "inside_ms": 1000 * statistics.median(a for a, _ in v),
             "alone_ms": 1000 * statistics.median(b for _, b in v),
             "ratio": statistics.median(a / b for a, b in v)} for q, v in sorted(pairs.items())]


def paired_table(rows: list[dict[str, Any]], load: dict[str, Any]) -> str:
    lines = [f"A target forward inside decoding against the same width alone right after it (pairs), ms. "
             f"Load average {load['loadavg_start']:.1f} → {load['loadavg_end']:.1f} on {load['cores']} cores.", "",
             "| method | Q | forwards | inside decoding | alone | inside / alone (median of pairs) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['q']} | {r['n']} | {r['inside_ms']:.1f} | {r['alone_ms']:.1f} | {r['ratio']:.3f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def table(results: list[dict[str, Any]], load: dict[str, Any]) -> str:
    lines = [f"Milliseconds per round (one round = one target forward; `ar`: one token). Load average "
             f"{load['loadavg_start']:.1f} → {load['loadavg_end']:.1f} on {load['cores']} cores.", "",
             "| method | τ | ms / round | target (of which head) | drafters (of which head) | host | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        n = r["rounds"]
        t = r["models"].get("target") or r["models"].get("model") or {"s": 0.0, "head_s": 0.0}
        drafters = [v for k, v in r["models"].items() if k not in ("target", "model")]
        d_s, d_head = sum(v["s"] for v in drafters), sum(v["head_s"] for v in drafters)
        tau = f"{r['acceptance_length']:.2f}" if r["acceptance_length"] else "1"
        lines.append(f"| {r['method']} | {tau} | {1000 * r['wall_s'] / n:.1f} | {1000 * t['s'] / n:.1f} "
                     f"({1000 * t['head_s'] / n:.1f}) | {1000 * d_s / n:.1f} ({1000 * d_head / n:.1f}) | "
                     f"{1000 * r['host_s'] / n:.1f} | {r['tokens'] / r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffspec.bench.round_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (results.json, table.md)")
    p.add_argument("--model", default="smollm2", help="AR target (default smollm2)")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"bench specs, e.g. dflash:drafts=4 (default {' '.join(METHODS)})")
    p.add_argument("--limit", type=int, default=3, help="GSM8K test questions (default 3)")
    p.add_argument("--gen-length", type=int, default=128, help="tokens per answer at most (default 128)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--no-chat", action="store_true", help="plain prompts (a target without a chat template)")
    p.add_argument("--task", default="gsm8k", help="prompts' task (default gsm8k, zero-shot)")
    p.add_argument("--paired", action="store_true",
                   help="time each target forward inside decoding against the same width alone (paired.md)")
    a = p.parse_args(argv)
    from ..api import resolve_model
    from ..models.chat import ChatTemplate
    from ..models.gguf import resolve_checkpoint
    from ..tasks import load_examples
    from .runner import load_during, machine_load, parse_spec

    methods = a.methods
    bad = [m for m in methods if m.partition(":")[0] not in METHODS]
    if bad or a.limit < 1 or a.gen_length < 2 or a.threads < 1:
        p.error(f"--methods from {', '.join(METHODS)} (got {bad}), --limit >= 1, --gen-length >= 2, --threads >= 1")
    for m in methods:  # a bad option fails here, before the model loads
        try:
            parse_spec(m)
        except ValueError as e:
            p.error(str(e))
    torch.set_num_threads(a.threads)
    path = resolve_checkpoint(a.model)
    model, tok = resolve_model(str(path), None, "cpu", None, method="ar")
    examples = load_examples(a.task, limit=a.limit, **({"k_shot": 0} if a.task in ("gsm8k", "mmlu") else {}))
    prompts = [e.prompt for e in examples]
    if not a.no_chat:
        template = ChatTemplate.from_pretrained(path)
        prompts = [template.render([{"role": "user", "content": q}]) for q in prompts]
    start = machine_load()
    out = Path(a.out)
    command = "python -m diffspec.bench.round_profile " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.paired:
        with torch.inference_mode():
            rows = [r for m in methods for r in paired_forwards(m, model, tok, prompts, a.gen_length)]
        load = load_during(start)
        out.mkdir(parents=True, exist_ok=True)
        (out / "paired.json").write_text(json.dumps({"model": a.model, "threads": a.threads, "limit": a.limit,
                                                     "gen_length": a.gen_length, "torch": torch.__version__,
                                                     "load": load, "command": command, "pairs": rows}, indent=2) + "\n")
        (out / "paired.md").write_text(paired_table(rows, load))
        print(paired_table(rows, load))
        return 0
    results = []
    for m in methods:
        print(f"[round-profile] {m}", file=sys.stderr)
        results.append(profile_method(m, model, tok, prompts, a.gen_length))
    load = load_during(start)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": a.model, "task": a.task, "limit": a.limit, "gen_length": a.gen_length, "threads": a.threads,
           "torch": torch.__version__, "load": load, "command": command, "results": results}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "table.md").write_text(table(results, load))
    print(table(results, load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
