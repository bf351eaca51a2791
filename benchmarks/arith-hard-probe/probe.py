"""Does an arith-hard model read the people's names from the question? (issue #35)

    python benchmarks/arith-hard-probe/probe.py CHECKPOINT [--n 24]

Two probes on validation problems, each one forward per masked cell, everything else visible
(the question and the whole reference answer but one cell):

- cell accuracy by kind: the argmax at a masked name cell, and at a masked digit cell;
- name swap: the same masked name cell after every name in the question is replaced by a name
  the problem does not use (the answer left as it is). A model that copies names from the
  question changes its prediction; one that guesses names from the answer alone does not.

Why: exact match on 32 validation problems stayed at 0-3 while the loss fell, and the decoded
answers had the right format and amounts but made-up names. These probes say which skill is
missing, before a decode that takes minutes.
"""
from __future__ import annotations

import argparse
import json

import torch

from diffspec.models.checkpoint import load_model
from diffspec.tasks import arith_hard_examples
from diffspec.tasks.arith import NAMES


def masked_argmax(model, ids: list[int], pos: int, mask_id: int) -> int:
    x = torch.tensor([ids])
    x[0, pos] = mask_id
    with torch.no_grad():
        out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return int(logits[0, pos].argmax())


def swap_names(question: str, used: list[str]) -> str:
    """The question with each used name replaced by one the problem does not use."""
    spare = iter(n for n in NAMES if n not in used)
    for name, other in zip(used, spare):
        question = question.replace(" " + name, " \0" + other)
    return question.replace("\0", "")


def probe(path: str, n: int) -> dict:
    torch.set_num_threads(1)
    model, tok = load_model(path)
    model.eval()
    mask_id = model.config.mask_token_id
    name_ids = {tok.encode(" " + x)[-1] for x in NAMES} | {tok.encode(x)[0] for x in NAMES}
    counts = {"name": [0, 0], "digit": [0, 0], "swap_changed": [0, 0]}
    for ex in arith_hard_examples("validation", n, 0):
        prompt, answer = tok.encode(ex.prompt), tok.encode(ex.solution)
        used = [x for x in NAMES if " " + x in ex.prompt]
        swapped = tok.encode(swap_names(ex.prompt, used))
        for j, t in enumerate(answer):
            kind = "name" if t in name_ids else "digit" if tok.decode([t]).strip().isdigit() else None
            if kind is None:
                continue
            guess = masked_argmax(model, prompt + answer, len(prompt) + j, mask_id)
            counts[kind][0] += guess == t
            counts[kind][1] += 1
            if kind == "name" and len(swapped) == len(prompt):
                other = masked_argmax(model, swapped + answer, len(swapped) + j, mask_id)
                counts["swap_changed"][0] += other != guess
                counts["swap_changed"][1] += 1
    return {k: {"hits": h, "cells": c, "share": h / c if c else None} for k, (h, c) in counts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=24, help="validation problems (default 24)")
    a = p.parse_args()
    print(json.dumps({"checkpoint": a.checkpoint, "n": a.n, **probe(a.checkpoint, a.n)}, indent=2))


if __name__ == "__main__":
    main()
