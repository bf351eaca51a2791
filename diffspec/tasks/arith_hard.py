"""`arith-hard`: long, entangled GSM8K-style word problems the bundled model cannot saturate.

Why another task: on `arith` the bundled model scores 98.4 %, and Fast-dLLM's
threshold costs 0.2 points, so no decoding method can win or lose there. A
contest needs answers whose cells really depend on each other when a decoder
commits several in one step:

- one person and 7-8 numbered events, so an answer runs to 7-8 lines and
  about 100-117 tokens: four blocks of 32;
- a chain: every line starts from the result of the line above (the first
  from the question's count), so a line's first operand is a value the
  decoder wrote in the same or the previous block;
- results up to 50, so a line's tens digit depends on a carry or a borrow
  that a parallel step commits blind.

Each answer line repeats its event's number ("(2) Ana: 14+7=21"), so a line
finds its event by content rather than by counting sentences: without the
numbers, a 4-layer model warm-started from `arith` still wrote made-up names
after 700 steps. The amounts are one digit. Two earlier versions moved
two-digit amounts (10-39, counts up to 99) and never got one validation
answer in 32 right after 1,000+ steps, and `arith`'s own two-digit curriculum
(`arith.HARD`) plateaued near 10 % after three CPU-hours. One-digit amounts
over counts up to 50 are the fact table `arith` is learned on, so the new
skills are the ones parallel decoding breaks: looking up each person's count,
and chains of dependent lines. The training pool may also hold shorter
stories (`generate(..., lines=...)`, config `data.lines`) as a curriculum;
validation and test keep 7-8 lines.

Training may also mix in recall stories (`recall`, config
`data.recall_fraction`): the same story, asked "What changes in each event?",
answered with each line's event number, name and signed amount and no
arithmetic. Why: every model trained on the task alone collapsed the twelve
names into one class (their embeddings at cosine 0.81, the head at 0.90, the
cross-entropy of a masked name at ln 12 after 1,900 steps from scratch), the
plateau before induction-style copying, because names are 1/7 of the answer's
cells and the arithmetic dominates the loss. A pure copy task in this format
learns the copy within 600 steps (benchmarks/arith-hard-probe/copy_sanity.py).

Why one person (2026-12-06): the versions with two or three people (transfers
between them, a question about two people's total) never trained. Six runs,
about eight CPU-hours (from scratch and warm-started from `arith`, with and without
event numbers, with recall stories), all ended with the masked-name
cross-entropy at ln 12: the models never learned to read a name from the
question (benchmarks/arith-hard-probe), so they could not know whose count a
line continues. `arith`'s model already copies each event's amount from the
question in order; one person keeps that skill sufficient and makes the chain
long, which is what parallel decoding breaks. The give and total code is in the
history (commit f684bf7 and before).

The answer keeps GSM8K's format (`#### N` after the working) so the same
prompt, stop and scoring code runs on it. Every value stays in 1..50. Splits
are disjoint by a hash of the question text (`arith.split_of`), as for `arith`.
"""
from __future__ import annotations

import random
import re

from .arith import ITEMS, NAMES, SPLITS, Problem, split_of

MAX_VALUE = 50
OPERAND = (2, 9)  # one-digit amounts: the fact table a 4-layer CPU model learns (see below)
START = (10, 40)


def _amount(rng: random.Random, lo: int, hi: int) -> int | None:
    """An operand in OPERAND ∩ [lo, hi], or None when the range is empty."""
    lo, hi = max(lo, OPERAND[0]), min(hi, OPERAND[1])
    return rng.randint(lo, hi) if lo <= hi else None


def _event(rng: random.Random, people: list[str], have: dict[str, int]
           ) -> tuple[str, list[str], dict[str, int]] | None:
    """One story sentence, its answer line and the new count, or None if the draw does not fit 1..50.
    (`people` holds the one person; drawing among them keeps the random stream, and so every
    split, that the bundled model and its benchmarks were made with.)"""
    kind = rng.choice(["buy", "lose"])
    a = rng.choice(people)
    va = have[a]
    if kind == "buy":
        n = _amount(rng, 1, MAX_VALUE - va)
        if n is None:
            return None
        verb = rng.choice(["buys", "finds", "gets"])
        return f"{a} {verb} {n} more.", [f"{a}: {va}+{n}={va + n}"], {a: va + n}
    n = _amount(rng, 1, va - 1)
    if n is None:
        return None
    verb = rng.choice(["loses", "sells", "eats"])
    return f"{a} {verb} {n}.", [f"{a}: {va}-{n}={va - n}"], {a: va - n}


def make_problem(rng: random.Random, min_lines: int = 7, max_lines: int = 8) -> Problem:
    """One problem whose answer has between `min_lines` and `max_lines` working lines."""
    while True:
        item = rng.choice(ITEMS)
        people = rng.sample(NAMES, 1)
        have = {p: rng.randint(*START) for p in people}
        sentences = [f"{p} has {have[p]} {item}." for p in people]
        lines: list[str] = []
        want = rng.randint(min_lines, max_lines)
        tries = 0
        while len(lines) < want and tries < 50:
            tries += 1
            ev = _event(rng, people, have)
            if ev is None or len(lines) + len(ev[1]) > want:
                continue
            k = len(sentences) - len(people) + 1  # the event's number, which its answer lines repeat
            sentences.append(f"({k}) {ev[0]}")
            lines.extend(f"({k}) {line}" for line in ev[1])
            have.update(ev[2])
        if len(lines) < want:
            continue
        who = rng.choice(people)
        sentences.append(f"How many {item} does {who} have now?")
        value = have[who]
        return Problem(" ".join(sentences), "\n".join(lines) + f"\n#### {value}", str(value))


LINES = (7, 8)  # the task's answers: 7-8 working lines (88-116 tokens)
RECALL_QUESTION = "What changes in each event?"
_LINE = re.compile(r"^\((\d+)\) (\w+): \d+([+-])(\d+)=\d+$")


def recall(p: Problem) -> Problem:
    """The recall story of `p`: its events, asked for who changes by how much (the copy, no arithmetic)."""
    story = p.question.rsplit(" How many ", 1)[0]
    lines = [m.expand(r"(\1) \2: \3\4") for m in map(_LINE.match, p.answer.split("\n")) if m]
    if not lines:
        raise ValueError(f"not an arith-hard problem (no event lines): {p.answer!r}")
    events = len({line.split(")")[0] for line in lines})
    return Problem(f"{story} {RECALL_QUESTION}", "\n".join(lines) + f"\n#### {events}", str(events))


def generate(split: str, n: int, seed: int = 0, lines: tuple[int, int] = LINES) -> list[Problem]:
    """`n` distinct problems of `split`, the same list for the same arguments (a longer list extends it).

    `lines` widens the range for a training pool; evaluation always uses the task's LINES.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lo, hi = lines
    if not 2 <= lo <= hi:
        raise ValueError(f"lines must be a range [lo, hi] with 2 <= lo <= hi, got {list(lines)}")
    rng = random.Random(f"arith-hard-{split}-{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        p = make_problem(rng, lo, hi)
        if p.question in seen or split_of(p.question) != split:
            continue
        seen.add(p.question)
        out.append(p)
    return out
