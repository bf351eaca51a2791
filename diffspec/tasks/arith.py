"""`arith`: a seeded generator of GSM8K-style word problems.

Why synthetic: a model small enough to train on a laptop CPU cannot learn
GSM8K, but it can learn 2-4 step add/subtract/double/halve stories written in
GSM8K's format (`Question: ...\\nAnswer: <chain of thought>\\n#### N`). That
keeps every decoder comparison meaningful on the bundled model while the very
same prompt format, stop sequences and scoring run on real GSM8K.

Why small numbers (values <= 50, one-digit operands, doubling but no
tripling): a 4-layer model trained for 45 CPU-minutes learns the chain
structure quickly but not general two-digit arithmetic (an earlier version
with operands up to 30 and values up to 99 plateaued near 10% exact match
after 2.5 CPU-hours). A few hundred distinct facts it can learn; the
decoding problem -- dependent lines, where parallel unmasking breaks the
chain -- stays the same.

Splits are disjoint by construction: a problem's split is a pure function of
a hash of its question text, and each split only keeps problems that hash to
it, so no question can appear in two splits whatever the seeds.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAMES = ["Tom", "Ana", "Sam", "Mia", "Leo", "Eva", "Ben", "Zoe", "Max", "Ivy", "Dan", "Amy"]
ITEMS = ["apples", "pens", "books", "coins", "cards", "eggs", "shells", "stamps", "cups", "balls"]
MAX_VALUE = 50
MAX_OPERAND = 9
SPLITS = ("train", "validation", "test")
_SPLIT_OF_BUCKET = ["train"] * 90 + ["validation"] * 5 + ["test"] * 5


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # chain of thought lines, then "#### N"
    target: str  # the final number as a string


def _step(rng: random.Random, name: str, value: int) -> tuple[str, str, int] | None:
    """One story sentence, its chain-of-thought line and the new value."""
    kind = rng.choice(["add", "add", "sub", "sub", "mul", "half"])
    if kind == "add" and value < MAX_VALUE:
        b = rng.randint(1, min(MAX_OPERAND, MAX_VALUE - value))
        text = rng.choice([f"{name} buys {b} more.", f"{name} finds {b} more.", f"{name} gets {b} more."])
        return text, f"{value}+{b}={value + b}", value + b
    if kind == "sub" and value > 1:
        b = rng.randint(1, min(MAX_OPERAND, value - 1))
        text = rng.choice([f"{name} gives away {b}.", f"{name} loses {b}.", f"{name} sells {b}."])
        return text, f"{value}-{b}={value - b}", value - b
    if kind == "mul" and value * 2 <= MAX_VALUE:
        return f"{name} doubles them.", f"{value}*2={value * 2}", value * 2
    if kind == "half" and value % 2 == 0 and value >= 2:
        return f"{name} gives away half.", f"{value}/2={value // 2}", value // 2
    return None


def make_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 4) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, 20)
    n_steps = rng.randint(min_steps, max_steps)
    sentences, lines = [f"{name} has {value} {item}."], []
    while len(lines) < n_steps:
        step = _step(rng, name, value)
        if step is None:
            continue
        text, line, value = step
        sentences.append(text)
        lines.append(line)
    sentences.append(f"How many {item} does {name} have now?")
    answer = "\n".join(lines) + f"\n#### {value}"
    return Problem(" ".join(sentences), answer, str(value))


def split_of(question: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "little") % 100
    return _SPLIT_OF_BUCKET[bucket]


def generate(split: str, n: int, seed: int = 0, min_steps: int = 2, max_steps: int = 4) -> list[Problem]:
    """`n` distinct problems of `split`, the same list for the same arguments."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    # Each split gets its own stream so that asking for more test problems
    # never changes the first ones.
    rng = random.Random(f"arith-{split}-{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * (n + 10):
            raise RuntimeError(f"could not draw {n} distinct {split} problems; ask for fewer")
        p = make_problem(rng, min_steps, max_steps)
        if p.question in seen or split_of(p.question) != split:
            continue
        seen.add(p.question)
        out.append(p)
    return out
