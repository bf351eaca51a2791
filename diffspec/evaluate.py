"""Accuracy and cost of one method on one task, as a JSON-ready dict."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .api import AnyConfig, build_config, generate
from .jsonio import OutputFile
from .spec.armethods import AR_METHODS
from .tasks import Example, load_examples, score

# Generation shapes that fit each task's answers (overridable per run).
TASK_DEFAULTS: dict[str, dict[str, int]] = {
    "arith": {"gen_length": 48, "block_length": 16, "steps": 48},
    "arith-mc": {"gen_length": 8, "block_length": 8, "steps": 8},
    "gsm8k": {"gen_length": 256, "block_length": 32, "steps": 256},
    "mmlu": {"gen_length": 8, "block_length": 8, "steps": 8},
}


def task_config(task: str, method: str, strict: bool = True, **options: Any) -> AnyConfig:
    given = {k: v for k, v in options.items() if v is not None}
    defaults = TASK_DEFAULTS.get(task, {})
    if method in AR_METHODS:  # an AR method only needs the generation budget
        defaults = {k: v for k, v in defaults.items() if k == "gen_length"}
    base = {**defaults, **given}
    if "gen_length" in given and "steps" not in given and method not in AR_METHODS:  # full steps unless told otherwise
        base["steps"] = given["gen_length"]
    return build_config(method, strict=strict, **base)


def evaluate(
    task: str,
    model: Any,
    tokenizer: Any,
    method: str = "vanilla",
    config: AnyConfig | None = None,
    examples: list[Example] | None = None,
    limit: int | None = None,
    data: str | Path | None = None,
    progress: bool = True,
    keep_samples: bool = True,
    keep_ids: bool = False,
) -> dict[str, Any]:
    examples = examples if examples is not None else load_examples(task, limit=limit, data=data)
    cfg = config or task_config(task, method)
    res = generate([e.prompt for e in examples], model=model, tokenizer=tokenizer, method=method,
                   progress=progress, config=cfg)
    scores = [score(e, t) for e, t in zip(examples, res.texts)]
    n = len(examples)
    out: dict[str, Any] = {
        "task": task,
        "method": method,
        "accuracy": sum(s["correct"] for s in scores) / n,
        "n": n,
        **res.meter.summary(),
        "config": res.config.to_dict(),
    }
    if res.stats:  # speculative methods: what happened to the drafts
        out["spec"] = res.stats
    if any("flexible_correct" in s for s in scores):
        out["accuracy_flexible"] = sum(s.get("flexible_correct", False) for s in scores) / n
    if keep_ids:  # generated token ids (cut at EOS), for checking that a method is lossless
        out["token_ids"] = res.token_ids
    if keep_samples:
        out["samples"] = [{"prompt": e.prompt[-200:], "gold": e.gold, "completion": t, **s}
                          for e, t, s in zip(examples, res.texts, scores)]
    return out


def write_json(obj: Any, path: str | Path | OutputFile, rescue: bool = False) -> Path:
    """Write `obj` as JSON atomically (temp file + os.replace), creating the directory; returns where
    it went. Pass an `OutputFile.check`-ed path to validate it before a long run; an existing file is
    replaced with a note on stderr, and any OSError becomes one `OutputError` line (see `jsonio`)."""
    out = path if isinstance(path, OutputFile) else OutputFile.check(path)
    return out.write_json(obj, rescue=rescue)
