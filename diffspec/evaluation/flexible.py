"""Which rows show a flexible-match accuracy beside the strict one.

Lives with evaluation, not with the bench tables, because `evaluate.run_eval` reports it too and
evaluation must not import the bench floor above it (bench imports evaluation).
"""
from __future__ import annotations

from typing import Any

# Tasks whose rows show a flexible-match accuracy beside the strict one. Scoring computes a flexible
# match for every numeric task, but only GSM8K needs it: it is graded by lm-eval's two filters, and a
# chat model that writes its answer in prose instead of "#### N" scores 0 % strict there. The arith
# tasks' models are trained to write "#### N", so their flexible column would only add noise.
FLEXIBLE_TASKS = ("gsm8k",)


def flexible_accuracy(r: dict[str, Any]) -> float | None:
    """The flexible match (the last number in the answer) of a row whose task is in FLEXIBLE_TASKS;
    None for every other row (an arith row's `accuracy_flexible` is kept in its JSON, not shown)."""
    if r.get("task") not in FLEXIBLE_TASKS:
        return None
    return r.get("accuracy_flexible")
