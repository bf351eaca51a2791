"""`diffspec bench`: several methods on the same examples, one run, one table, one plot.

Speed-ups are ratios against the first row (the baseline) measured in the
same process on the same examples, because absolute wall-clock on a shared
machine is noise; ratios within one run are what can be compared.
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..api import METHODS
from ..decoding.config import DecodeConfig
from ..evaluate import TASK_DEFAULTS, evaluate, task_config, write_json
from ..tasks import load_examples
from .plot import pareto_plot
from .table import format_table


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'fast-dllm:cache=dual,policy=threshold,threshold=0.9' -> ('fast-dllm', {...})."""
    method, _, rest = spec.partition(":")
    method = method.strip()
    if method not in METHODS:
        raise ValueError(f"bench spec {spec!r}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    opts: dict[str, Any] = {}
    fields = DecodeConfig.__dataclass_fields__
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise ValueError(f"bench spec {spec!r}: bad option {item!r}; use key=value with keys from {sorted(fields)}")
        typ = type(fields[key].default)
        try:
            opts[key] = typ(val)
        except ValueError:
            raise ValueError(f"bench spec {spec!r}: {key} needs a {typ.__name__}, got {val!r}") from None
    return method, opts


def label_of(method: str, opts: dict[str, Any]) -> str:
    if not opts:
        return method
    return method + " " + " ".join(f"{k}={v}" for k, v in opts.items())


def suite(name: str, task: str) -> list[str]:
    L = TASK_DEFAULTS[task]["gen_length"]
    if name == "steps":
        return [f"vanilla:steps={s}" for s in (L, L // 2, L // 4, L // 8)]
    if name == "cache":
        return [
            f"vanilla:steps={L}", f"vanilla:steps={L // 2}", f"vanilla:steps={L // 4}",
            "fast-dllm:cache=prefix,policy=schedule", "fast-dllm:cache=dual,policy=schedule",
            "fast-dllm:cache=none,policy=threshold", "fast-dllm:cache=none,policy=factor",
            "fast-dllm:cache=prefix,policy=threshold", "fast-dllm:cache=dual,policy=threshold",
            "dkv-cache:cache=dkv-decode", "dkv-cache:cache=dkv-greedy", "dkv-cache:cache=dkv-prefill",
        ]
    raise ValueError(f"unknown suite {name!r}; choose steps or cache")


def run_bench(
    model: Any,
    tokenizer: Any,
    specs: list[str],
    task: str = "arith",
    limit: int = 500,
    out_dir: str | Path = "bench-out",
    data: str | None = None,
    overrides: dict[str, Any] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    if not specs:
        raise ValueError("no methods to benchmark")
    parsed = [parse_spec(s) for s in specs]
    configs = [task_config(task, m, **{**(overrides or {}), **o}) for m, o in parsed]  # validate all first
    examples = load_examples(task, limit=limit, data=data)
    rows = []
    for (method, opts), cfg, spec in zip(parsed, configs, specs):
        print(f"[bench] {label_of(method, opts)} on {len(examples)} {task} examples", file=sys.stderr)
        r = evaluate(task, model, tokenizer, method, cfg, examples=examples, progress=True, keep_samples=False)
        r.update(label=label_of(method, opts), spec=spec)
        rows.append(r)
    base = rows[0]
    for r in rows:
        r["speedup_wall"] = base["wall_seconds"] / r["wall_seconds"] if r["wall_seconds"] else float("nan")
        r["speedup_flops"] = base["flops"] / r["flops"] if r["flops"] else float("nan")
        r["speedup_nfe"] = base["nfe_per_sequence"] / r["nfe_per_sequence"] if r["nfe_per_sequence"] else float("nan")
        r["accuracy_delta"] = r["accuracy"] - base["accuracy"]
    out_dir = Path(out_dir)
    result = {
        "task": task,
        "n": len(examples),
        "baseline": base["label"],
        "command": command,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")},
        "rows": rows,
    }
    write_json(result, out_dir / "results.json")
    table = format_table(rows)
    (out_dir / "table.md").write_text(table + "\n")
    pareto_plot(rows, out_dir / "pareto.png", title=f"{task}: accuracy vs cost ({len(examples)} examples)")
    print(table)
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'table.md'}, {out_dir / 'pareto.png'}", file=sys.stderr)
    return result
