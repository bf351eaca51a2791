"""Datasets for diffspec's lm-eval tasks that are generated rather than read: `arith`, `arith_hard`, `arith_mc`.

Each is the bundled `arith` task's split (`diffspec.tasks`), exported at run time to a JSON-lines
file under the cache directory ($DIFFSPEC_CACHE, else $XDG_CACHE_HOME/diffspec, else
~/.cache/diffspec; nothing is committed) and loaded with `datasets.load_dataset("json", ...)`, so
lm-eval scores exactly the examples `diffspec eval --task arith` / `--task arith-mc` scores, in the
same order (`--limit N` takes the first N of both).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"  # the bundled models' end-of-text token (diffspec.models.tokenizer.EOS_TOKEN)


def cache_dir() -> Path:
    base = os.environ.get("DIFFSPEC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffspec"
    return Path(base) / "lm_eval"


def _export(name: str, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` as JSON lines (atomically: data-parallel ranks may export at once)."""
    path = cache_dir() / f"{name}.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.is_file() and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _load(path: Path, split: str) -> Any:
    import datasets

    return datasets.load_dataset("json", data_files={split: str(path)})


def arith_dataset(arith_split: str = "test", arith_n: int = 500, arith_seed: int = 0, **_: Any) -> Any:
    """{question, answer} rows (the answer's chain of thought ends in `#### N`, as GSM8K's)."""
    from diffspec.tasks import arith

    rows = [{"question": p.question, "answer": p.answer}
            for p in arith.generate(arith_split, int(arith_n), int(arith_seed))]
    return _load(_export(f"arith-{arith_split}-{arith_n}-seed{arith_seed}", rows), arith_split)


def arith_hard_dataset(arith_split: str = "test", arith_n: int = 500, arith_seed: int = 0, **_: Any) -> Any:
    """`arith-hard`'s {question, answer} rows, in the same GSM8K layout as `arith_dataset`."""
    from diffspec.tasks import arith_hard

    rows = [{"question": p.question, "answer": p.answer}
            for p in arith_hard.generate(arith_split, int(arith_n), int(arith_seed))]
    return _load(_export(f"arith-hard-{arith_split}-{arith_n}-seed{arith_seed}", rows), arith_split)


def arith_mc_dataset(arith_split: str = "test", arith_n: int = 500, arith_seed: int = 0, **_: Any) -> Any:
    """{subject, question, choices, answer} rows in MMLU's layout (`diffspec eval --task arith-mc`)."""
    from diffspec.tasks import _mc_choices, arith

    rows = []
    for p in arith.generate(arith_split, int(arith_n), int(arith_seed) + 7919):  # arith-mc's own stream
        choices, gold = _mc_choices(p)
        rows.append({"subject": "arithmetic", "question": p.question, "choices": choices, "answer": gold})
    return _load(_export(f"arith_mc-{arith_split}-{arith_n}-seed{arith_seed}", rows), arith_split)


def arith_choice_dataset(arith_split: str = "test", arith_n: int = 500, arith_seed: int = 0, **_: Any) -> Any:
    """arith_mc's problems and numbers in the task's own format: after `Question: ...\\nAnswer:` each
    choice is the reference chain of thought ending in `#### <that number>` and the end-of-text token
    (so a number that is a prefix of another, 1 against 14, is not favoured): the log-likelihood of a
    whole answer, which a model trained on `arith` can score, unlike letters it never saw. The end
    token is the bundled tokenizer's `<|endoftext|>`: this task is for the bundled models."""
    from diffspec.tasks import _mc_choices, arith

    rows = []
    for p in arith.generate(arith_split, int(arith_n), int(arith_seed) + 7919):
        choices, gold = _mc_choices(p)
        chain = p.answer.rsplit("\n", 1)[0]
        rows.append({"question": p.question, "choices": [f"{chain}\n#### {c}{EOS}" for c in choices], "answer": gold})
    return _load(_export(f"arith_choice-{arith_split}-{arith_n}-seed{arith_seed}", rows), arith_split)
