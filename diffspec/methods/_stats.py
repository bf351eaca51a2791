"""Merging the speculative methods' counters across parts of one run.

A run split into parts (data-parallel ranks, or a long bench row saved in chunks so it can resume)
produces one stats summary per part. Rates such as τ cannot be averaged across parts; they are
recomputed from the summed counters, by the same `summary()` that wrote them. A summary carries
its raw counters (each stats class's fields), so the class is the registered one whose fields it
holds (the largest such class: DFlash's counters include AR-spec's).

It lives beside the registry because the stats classes are found there: in `speculative/` it was an
upward arrow (speculative -> methods) and a package circle.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Sequence


def _classes() -> list[type]:
    """The registered methods' stats classes, each once."""
    from . import all_methods

    classes = [m.stats_class for m in all_methods() if m.stats is not None]
    return list(dict.fromkeys(classes))


def stats_class(summary: dict[str, Any]) -> type | None:
    """The stats class whose every counter `summary` holds (the one with the most counters)."""
    fits = [c for c in _classes() if all(f.name in summary for f in fields(c))]
    return max(fits, key=lambda c: len(fields(c)), default=None)


def add_counters(total: Any, part: Any) -> None:
    """total += part, counter by counter: numbers add, per-label dicts add per label, max_* take the max."""
    for f in fields(total):
        a, b = getattr(total, f.name), getattr(part, f.name)
        if isinstance(a, dict):
            setattr(total, f.name, {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}})
        elif f.name.startswith("max_"):
            setattr(total, f.name, max(a, b))
        else:
            setattr(total, f.name, a + b)


def merge_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """One summary of all parts, or None when they are not all summaries of one stats class."""
    parts = [s for s in summaries if s]
    if not parts:
        return None
    classes = {stats_class(s) for s in parts}
    if len(classes) != 1 or None in classes:
        return None
    cls = classes.pop()
    total = cls()
    for s in parts:
        add_counters(total, cls(**{f.name: s[f.name] for f in fields(cls)}))
    merged = total.summary()
    for key in ("auto_k", "auto_drafts", "auto_gamma"):  # k=auto, drafts=auto, gamma=auto: the first part's
        reports = [s[key] for s in parts if key in s]  # measurement, and what every part chose
        if reports:
            merged[key] = {**reports[0], "chosen_per_part": [r["chosen"] for r in reports]}
    return merged
