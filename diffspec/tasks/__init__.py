"""Evaluation tasks: prompts in lm-eval formats, answer extraction and scoring.

A task yields `Example`s (prompt, gold answer, and the full reference solution
used for training) and scores a completion. `arith`, `arith-hard` and
`arith-mc` are generated; `gsm8k` and `mmlu` read local jsonl files, so a real checkpoint is
evaluated exactly like the bundled model.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import arith, arith_hard
from .scoring import extract_flexible, extract_strict, reference_answer, truncate_at_stops

TASKS = ("arith", "arith-hard", "arith-mc", "gsm8k", "mmlu")
GSM8K_STOPS = ["Question:", "</s>", "<|im_end|>"]
LETTERS = "ABCD"


@dataclass(frozen=True)
class Example:
    prompt: str
    gold: str  # the number (generative tasks) or letter (multiple choice)
    solution: str  # what a model should write after the prompt (training target)
    kind: str  # "gen" or "mc"


def gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def mc_prompt(subject: str, question: str, choices: list[str]) -> str:
    lines = [f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.", ""]
    return "\n".join(lines) + "\n" + mc_body(question, choices)


def mc_body(question: str, choices: list[str]) -> str:
    opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{opts}\nAnswer:"


def arith_examples(split: str, n: int, seed: int = 0, spec: arith.ArithSpec = arith.TASK) -> list[Example]:
    return [Example(gsm8k_prompt(p.question), p.target, " " + p.answer, "gen")
            for p in arith.generate(split, n, seed, spec=spec)]


def arith_hard_examples(split: str, n: int, seed: int = 0,
                        lines: tuple[int, int] = arith_hard.LINES, recall: int = 0) -> list[Example]:
    """`n` problems, then `recall` recall stories (`arith_hard.recall`) of the next problems of the
    same stream, so adding recall stories never changes the first `n`."""
    probs = arith_hard.generate(split, n + recall, seed, lines)
    probs = probs[:n] + [arith_hard.recall(p) for p in probs[n:]]
    return [Example(gsm8k_prompt(p.question), p.target, " " + p.answer, "gen") for p in probs]


def _mc_choices(p: arith.Problem) -> tuple[list[str], int]:
    """Three distractors near the answer, fixed per problem (seeded by its text)."""
    rng = random.Random(p.question)
    value = int(p.target)
    options = {value}
    while len(options) < 4:
        options.add(max(0, value + rng.choice([-1, 1]) * rng.randint(1, 12)))
    choices = sorted(options)
    rng.shuffle(choices)
    return [str(c) for c in choices], choices.index(value)


def arith_mc_examples(split: str, n: int, seed: int = 0, spec: arith.ArithSpec = arith.TASK) -> list[Example]:
    out = []
    for p in arith.generate(split, n, seed + 7919, spec=spec):
        choices, gold = _mc_choices(p)
        out.append(Example(mc_prompt("arithmetic", p.question, choices), LETTERS[gold], " " + LETTERS[gold], "mc"))
    return out


def default_data_dir() -> Path:
    """Where ../shared/data lives: $DIFFSPEC_DATA, else ../shared/data from the cwd or the repo."""
    env = os.environ.get("DIFFSPEC_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path.cwd().parent / "shared" / "data"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found; pass --data PATH to a local jsonl file")
    rows = []
    with path.open() as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1} is not valid JSON ({e})") from None
    return rows


def gsm8k_examples(path: Path | None, n: int | None, k_shot: int = 5, seed: int = 1234) -> list[Example]:
    path = path or default_data_dir() / "gsm8k" / "test.jsonl"
    rows = _read_jsonl(Path(path))
    for r in rows[:1]:
        if not {"question", "answer"} <= set(r):
            raise ValueError(f"{path} rows need 'question' and 'answer' fields (GSM8K format)")
    shots = ""
    if k_shot > 0:
        train = _read_jsonl(Path(path).with_name("train.jsonl"))
        picked = random.Random(seed).sample(train, k_shot)
        shots = "\n\n".join(f"{gsm8k_prompt(r['question'])} {r['answer']}" for r in picked) + "\n\n"
    rows = rows[:n] if n is not None else rows
    return [Example(shots + gsm8k_prompt(r["question"]), reference_answer(r["answer"]), " " + r["answer"], "gen") for r in rows]


def mmlu_examples(path: Path | None, n: int | None, k_shot: int = 0, seed: int = 1234) -> list[Example]:
    path = path or default_data_dir() / "mmlu" / "test.jsonl"
    rows = _read_jsonl(Path(path))
    for r in rows[:1]:
        if not {"subject", "question", "choices", "answer"} <= set(r):
            raise ValueError(f"{path} rows need subject, question, choices, answer fields (MMLU format)")
    by_subject: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_subject.setdefault(r["subject"], []).append(i)
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(rows[:n] if n is not None else rows):
        shots = ""
        if k_shot > 0:  # exemplars from the same subject, never the question itself
            pool = [j for j in by_subject[r["subject"]] if j != i]
            picked = rng.sample(pool, min(k_shot, len(pool)))
            shots = "".join(f"{mc_body(rows[j]['question'], rows[j]['choices'])} {LETTERS[rows[j]['answer']]}\n\n" for j in picked)
        header = f"The following are multiple choice questions (with answers) about {r['subject'].replace('_', ' ')}.\n\n"
        out.append(Example(header + shots + mc_body(r["question"], r["choices"]), LETTERS[r["answer"]],
                           " " + LETTERS[r["answer"]], "mc"))
    return out


def load_examples(task: str, limit: int | None = None, split: str = "test", data: str | Path | None = None,
                  k_shot: int | None = None, seed: int = 0) -> list[Example]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if k_shot is not None:
        if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 0:
            raise ValueError(f"k_shot (--k-shot) must be an integer >= 0, got {k_shot!r}")
        if task not in ("gsm8k", "mmlu"):
            raise ValueError(f"--k-shot applies to gsm8k and mmlu; the {task} prompts have no exemplars")
    if task in ("gsm8k", "mmlu") and split != "test":
        raise ValueError(f"--split {split} applies to the generated tasks (arith, arith-hard, arith-mc); {task} reads "
                         "one file: choose it with --data")
    if task == "arith":
        return arith_examples(split, limit or 500, seed)
    if task == "arith-hard":
        return arith_hard_examples(split, limit or 500, seed)
    if task == "arith-mc":
        return arith_mc_examples(split, limit or 500, seed)
    if task == "gsm8k":
        return gsm8k_examples(Path(data) if data else None, limit, 5 if k_shot is None else k_shot)
    return mmlu_examples(Path(data) if data else None, limit, 0 if k_shot is None else k_shot)


_LETTER = re.compile(r"\b([ABCD])\b")


def score(example: Example, completion: str) -> dict[str, Any]:
    """Per-example scores; `correct` is strict-match for numbers, first letter for choices."""
    if example.kind == "mc":
        m = _LETTER.search(completion)
        pred = m.group(1) if m else None
        return {"pred": pred, "correct": pred == example.gold}
    text = truncate_at_stops(completion, GSM8K_STOPS)
    strict, flexible = extract_strict(text), extract_flexible(text)
    return {"pred": strict, "correct": strict == example.gold, "flexible_correct": flexible == example.gold}
