"""Every method's decode loop on the device, eager against `--compile`, with its host syncs counted
(issue #22, part 2).

    python -m diffspec.bench.decode_loop --out DIR                 # CUDA, bundled models, bf16
    python -m diffspec.bench.decode_loop --out DIR --dry-run       # CPU, three methods, seconds

A decode loop that asks the GPU for a value (`.item()`, `.tolist()`, a boolean of a tensor, a
`nonzero`) waits for every queued kernel: the GPU idles while Python decides. Some waits are the
algorithm (how many drafts were accepted decides the next input), the rest are overhead. On CUDA
each method runs once under `torch.cuda.set_sync_debug_mode("warn")`, which warns at every
synchronising call; the warnings are counted, per forward. Then the same prompts run with the
model's forward compiled (`models.compiled`): the first call's time is the compilation, the second
is what compiling buys, and the ids must equal eager's (fp32 kernels may differ in the last bit
under a compiled graph, so a difference is recorded, not hidden).

The bundled models are tiny, so this measures launch overhead, which is exactly what syncs and
compilation change; the large-shape timings in `bench.gpu` answer the roofline questions.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from ..api import generate, resolve_model
from ..evaluation.evaluate import task_config
from ..models.compiled import compile_forward
from ..tasks import load_examples
from .gpu import device_of, device_parser

# (method, options): every family's decode loop on the bundled models.
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("vanilla", {}),
    ("fast-dllm", {"cache": "dual", "policy": "threshold"}),
    ("dkv-cache", {"cache": "dkv-decode"}),
    ("psd", {"policy": "threshold"}),
    ("dualdiffusion", {"drafter": "self", "rule": "exact_match", "verifier_view": "masked"}),
    ("ar", {"batch_size": 1}),
    ("ar-spec", {"gamma": 4}),
    ("dflash", {}),
    ("d2sd", {}),
]
DRY_METHODS = ("vanilla", "fast-dllm", "dflash")


def count_syncs(run: Any, device: torch.device) -> int | None:
    """Synchronising calls made by `run()` on a CUDA device (None elsewhere, without running: a CPU
    never waits)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def measure(method: str, opts: dict[str, Any], prompts: list[str], device: torch.device, dtype: str,
            backend: str) -> dict[str, Any]:
    cfg = task_config("arith", method, **opts)
    model, tok = resolve_model(None, None, str(device), dtype, method=method)

    def once() -> Any:
        return generate(prompts, model=model, tokenizer=tok, method=method, config=cfg)

    once()  # warm-up: allocator, kernels chosen
    eager = once()
    row: dict[str, Any] = {"method": method, "options": opts, "prompts": len(prompts), "forwards": eager.meter.nfe,
                           "eager_s": eager.meter.wall_seconds}
    syncs = count_syncs(once, device)
    row["syncs"] = syncs
    row["syncs_per_forward"] = None if syncs is None else syncs / max(eager.meter.nfe, 1)
    compile_forward(model, backend)
    t0 = time.perf_counter()
    first = once()
    row["compile_first_call_s"] = time.perf_counter() - t0
    compiled = once()
    row.update(compiled_s=compiled.meter.wall_seconds, backend=backend,
               compiled_speedup=eager.meter.wall_seconds / compiled.meter.wall_seconds,
               compiled_same_ids=compiled.token_ids == eager.token_ids and first.token_ids == eager.token_ids)
    return row


def format_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Decode loops: eager vs --compile {result['backend']} ({result['device']}, {result['dtype']}, "
             f"{result['prompts']} prompts)", "",
             "| method | forwards | eager s | compiled s | speed-up | first compiled call s | same ids | "
             "host syncs | syncs / forward |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        syncs = "n/a (CPU)" if r["syncs"] is None else str(r["syncs"])
        per = "" if r["syncs_per_forward"] is None else f"{r['syncs_per_forward']:.2f}"
        lines.append(f"| {r['method']} | {r['forwards']} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | "
                     f"{r['compiled_speedup']:.2f}× | {r['compile_first_call_s']:.1f} | "
                     f"{'yes' if r['compiled_same_ids'] else 'NO'} | {syncs} | {per} |")
    for e in result["errors"]:
        lines.append(f"\n- {e['method']}: {e['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = device_parser("python -m diffspec.bench.decode_loop", __doc__, ("decode-loop-out", "decode.json, decode.md"),
                      "CPU, three methods, backend eager: seconds")
    p.add_argument("--backend", help="torch.compile backend (default inductor; eager for --dry-run)")
    p.add_argument("--prompts", type=int, default=4, help="arith test prompts per call (default 4)")
    a = p.parse_args(argv)
    picked = device_of(a, "diffspec.bench.decode_loop")
    if picked is None:
        return 2
    device = picked[0]
    if a.prompts < 1:
        print("diffspec.bench.decode_loop: error: --prompts must be >= 1", file=sys.stderr)
        return 2
    backend = a.backend or ("eager" if a.dry_run else "inductor")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [e.prompt for e in load_examples("arith", limit=a.prompts)]
    result: dict[str, Any] = {"device": str(device), "dtype": a.dtype, "backend": backend, "prompts": len(prompts),
                              "dry_run": a.dry_run, "torch": torch.__version__, "rows": [], "errors": []}
    methods = [m for m in METHODS if not a.dry_run or m[0] in DRY_METHODS]
    for method, opts in methods:
        torch._dynamo.reset()  # each method's compiled graphs from scratch
        try:
            row = measure(method, opts, prompts, device, a.dtype, backend)
        except Exception as e:  # one broken method must not lose the others' numbers
            result["errors"].append({"method": method, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc(limit=4)})
            print(f"[decode-loop] {method}: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            result["rows"].append(row)
            print(f"[decode-loop] {method}: {row['forwards']} forwards, eager {row['eager_s']:.3f}s, compiled "
                  f"{row['compiled_s']:.3f}s, syncs {row['syncs']}", file=sys.stderr)
        (out / "decode.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "decode.md").write_text(format_markdown(result))
    print(format_markdown(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
