"""Does a one-person arith-hard model copy each event's amount from the question? (issue #35)

    python benchmarks/arith-hard-probe/amount_probe.py CHECKPOINT

On 12 validation problems, for every answer line, one forward with the line's amount masked, and
also its result and the next line's first operand (which repeats that result), so the amount cannot
be worked out from the answer and must come from the question's event. Prints how often the
argmax is the right amount (eight possible amounts, 2-9: chance is 1/8). Why: the decoded answers
of the model in training had the right name, start and operation in every line but repeated one
amount; this says whether the lookup of event k's amount is being learned before exact match moves.
"""
from __future__ import annotations

import argparse

import torch

from diffspec.models.checkpoint import load_model
from diffspec.tasks import arith_hard_examples


def probe(path: str, n: int) -> tuple[int, int]:
    torch.set_num_threads(1)
    model, tok = load_model(path)
    model.eval()
    mask = model.config.mask_token_id
    hit = tot = 0
    for ex in arith_hard_examples("validation", n, 0):
        p, a = tok.encode(ex.prompt), tok.encode(ex.solution)
        toks = [tok.decode([t]) for t in a]
        for j in range(1, len(a)):
            if toks[j - 1] not in ("+", "-") or not toks[j].strip().isdigit():
                continue
            x = torch.tensor([p + a])
            x[0, len(p) + j] = mask
            k = j + 1
            while k < len(a) and toks[k] != "\n":  # the result
                x[0, len(p) + k] = mask
                k += 1
            while k < len(a) and toks[k] not in ("+", "-", "#"):  # the next line's first operand
                if toks[k].strip().isdigit() and (toks[k - 1] == " " or toks[k - 1].strip().isdigit()):
                    x[0, len(p) + k] = mask
                k += 1
            with torch.no_grad():
                guess = int(model(x).logits[0, len(p) + j].argmax())
            hit += guess == a[j]
            tot += 1
    return hit, tot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--n", type=int, default=12, help="validation problems (default 12)")
    a = ap.parse_args()
    if a.n < 1:
        ap.error(f"--n must be >= 1, got {a.n}")
    hit, tot = probe(a.checkpoint, a.n)
    print(f"{a.checkpoint}: amount copied from the question {hit}/{tot} ({hit / tot:.0%}; chance 1/8)")


if __name__ == "__main__":
    main()
