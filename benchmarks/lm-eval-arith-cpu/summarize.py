"""Collect run.sh's outputs into results.json and table.md (lm-eval's accuracy and cost beside diffspec eval's)."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
rows = []
for scoring, task, lm_task, metric in [("generate", "arith", "arith", "exact_match,strict-match"),
                                       ("likelihood", "arith-mc", "arith_mc", "acc,none")]:
    for method in ("vanilla", "ar"):
        results = sorted((out / f"lm-eval-{scoring}-{method}").rglob("results_*.json"))[-1]
        lm = json.loads(results.read_text())
        cost = json.loads((out / f"lm-eval-{scoring}-{method}-cost.json").read_text())
        ours = json.loads((out / f"diffspec-eval-{scoring}-{method}.json").read_text())
        rows.append({
            "model": ours["model"], "method": method, "scoring": scoring, "task": task, "lm_eval_task": lm_task,
            "n": ours["n"], "lm_eval_n": lm["n-samples"][lm_task]["effective"],
            "lm_eval_accuracy": lm["results"][lm_task][metric], "lm_eval_metric": metric,
            "diffspec_eval_accuracy": ours["accuracy"],
            "lm_eval_cost": {k: cost["totals"][k] for k in ("nfe", "tokens_processed", "flops", "tokens_generated",
                                                             "wall_seconds")},
            "diffspec_eval_cost": {k: ours[k] for k in ("nfe", "tokens_processed", "flops", "tokens_generated",
                                                         "wall_seconds")},
            "lm_eval_results": str(results.relative_to(out)),
            "diffspec_eval_results": f"diffspec-eval-{scoring}-{method}.json",
        })
choice = []
for name, method, mc in [("ar", "ar", None), ("vanilla-mc1", "vanilla", 1), ("vanilla-mc8", "vanilla", 8),
                         ("vanilla-mc32", "vanilla", 32)]:
    found = sorted((out / f"lm-eval-choice-{name}").rglob("results_*.json"))
    if not found:
        continue
    lm = json.loads(found[-1].read_text())
    cost = json.loads((out / f"lm-eval-choice-{name}-cost.json").read_text())
    choice.append({
        "model": cost["model"], "method": method, "mc_num": mc, "task": "arith_choice",
        "lm_eval_n": lm["n-samples"]["arith_choice"]["effective"],
        "lm_eval_accuracy": lm["results"]["arith_choice"]["acc,none"],
        "lm_eval_stderr": lm["results"]["arith_choice"]["acc_stderr,none"],
        "lm_eval_cost": {k: cost["totals"][k] for k in ("nfe", "tokens_processed", "flops", "wall_seconds")},
        "lm_eval_results": str(found[-1].relative_to(out)),
    })
summary = {
    "what": "the bundled models on the same 100 arith / arith-mc test problems through lm-evaluation-harness "
            "(python -m diffspec.evaluation.harness, the `diffspec` model) and through `diffspec eval`",
    "command": "bash benchmarks/lm-eval-arith-cpu/run.sh",
    "lm_eval_version": json.loads(sorted((out / "lm-eval-generate-vanilla").rglob("results_*.json"))[-1]
                                  .read_text()).get("lm_eval_version"),
    "environment": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                    "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")},
    "rows": rows,
    "arith_choice": choice,
}
(out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = ["| model | method | scoring | task (lm-eval) | n | lm-eval accuracy | diffspec eval accuracy | forwards (lm-eval / diffspec) "
         "| GFLOPs (lm-eval / diffspec) | wall s (lm-eval / diffspec) |", "|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    a, b = r["lm_eval_cost"], r["diffspec_eval_cost"]
    lines.append(f"| {r['model']} | {r['method']} | {r['scoring']} | {r['task']} ({r['lm_eval_task']}, {r['lm_eval_metric']}) "
                 f"| {r['n']} | {r['lm_eval_accuracy']:.1%} | {r['diffspec_eval_accuracy']:.1%} | {a['nfe']} / {b['nfe']} "
                 f"| {a['flops'] / 1e9:,.1f} / {b['flops'] / 1e9:,.1f} | {a['wall_seconds']:.1f} / {b['wall_seconds']:.1f} |")
if choice:
    lines += ["", "| model | method | mc_num | task | n | lm-eval accuracy | forwards | GFLOPs | wall s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in choice:
        a = r["lm_eval_cost"]
        lines.append(f"| {r['model']} | {r['method']} | {r['mc_num'] or 'exact'} | arith_choice (acc) | {r['lm_eval_n']} "
                     f"| {r['lm_eval_accuracy']:.1%} ± {r['lm_eval_stderr']:.1%} | {a['nfe']} | {a['flops'] / 1e9:,.1f} "
                     f"| {a['wall_seconds']:.1f} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
