"""Token ids of every bench suite's rows on the first N problems, hashed per row.

A refactor must not change what any method decodes. Run this under two code trees
(PYTHONPATH=<tree>) and compare the JSON files: every row's hash must match.

    PYTHONPATH=/path/to/old python benchmarks/ids-check/ids.py --limit 100 --out old.json
    python benchmarks/ids-check/ids.py --limit 100 --out new.json --compare old.json

Uses only `evaluate(..., keep_ids=True)` and `suite()`, which both trees have.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import diffspec
from diffspec.api import resolve_model
from diffspec.bench.runner import parse_spec, suite
try:
    from diffspec.evaluation.evaluate import evaluate, task_config
except ImportError:  # a tree from before issue #36 moved evaluation into its package
    from diffspec.evaluate import evaluate, task_config
from diffspec.tasks import load_examples

LLADA_SUITES = ("steps", "cache", "dual", "psd", "frontier")
PACKAGE = str(Path(diffspec.__file__).resolve().parent)


def specs_of(suites: list[str]) -> list[str]:
    out: list[str] = []
    for name in suites:
        out += [s for s in suite(name, "arith") if s not in out]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--suites", nargs="+", default=[*LLADA_SUITES, "d2sd"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="a JSON file written by this script under other code")
    ap.add_argument("--shard", default="0/1", help="i/n: decode every n-th row from the i-th, so n processes "
                    "(one core each) share the rows; the parts' `rows` together are the whole")
    a = ap.parse_args()
    index, count = (int(v) for v in a.shard.split("/"))
    examples = load_examples("arith", limit=a.limit)
    result: dict[str, str] = {}
    n_diffusion = 0
    for family, suites in (("diffusion", [s for s in a.suites if s != "d2sd"]),
                           ("ar", [s for s in a.suites if s == "d2sd"])):
        specs = specs_of(suites)
        if family == "ar":  # the two families' rows are numbered as one list
            specs = [s for i, s in enumerate(specs, start=n_diffusion) if i % count == index]
        else:
            n_diffusion = len(specs)
            specs = [s for i, s in enumerate(specs) if i % count == index]
        if not specs:
            continue
        method0 = parse_spec(specs[0])[0]
        model, tok = resolve_model(None, None, method=method0)
        for spec in specs:
            method, opts = parse_spec(spec)
            cfg = task_config("arith", method, strict=False, **opts)
            r = evaluate("arith", model, tok, method, cfg, examples=examples, progress=False,
                         keep_samples=False, keep_ids=True)
            key = spec.replace(PACKAGE, "<diffspec>")  # bundled drafter paths differ between trees
            result[key] = hashlib.sha256(json.dumps(r["token_ids"]).encode()).hexdigest()[:16]
            print(f"{result[key]}  {key}", file=sys.stderr, flush=True)
    with open(a.out, "w") as f:
        json.dump({"limit": a.limit, "rows": result}, f, indent=1)
    if a.compare:
        other = json.load(open(a.compare))["rows"]
        diff = [s for s in result if s in other and other[s] != result[s]]
        missing = [s for s in result if s not in other]
        print(f"{len(result) - len(diff) - len(missing)} rows identical, {len(diff)} differ, "
              f"{len(missing)} not in {a.compare}")
        for s in diff:
            print(f"  DIFFERS: {s}")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
