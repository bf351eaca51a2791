"""Readable markdown tables of bench rows."""
from __future__ import annotations

from typing import Any

from ..evaluation.flexible import flexible_accuracy

COLUMNS = [
    ("method", "label", "{}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("Δacc", "accuracy_delta", "{:+.1%}"),
    ("fwd/seq", "nfe_per_sequence", "{:.1f}"),
    ("TPF (target)", "tokens_per_forward", "{:.2f}"),
    ("tokens processed", "tokens_processed", "{:,}"),
    ("GFLOPs", "flops", None),
    ("wall s", lambda r: wall_cell(r), "{}"),
    ("speed-up (wall)", "speedup_wall", "{:.2f}×"),
    ("speed-up (FLOPs)", "speedup_flops", "{:.2f}×"),
    ("same ids as baseline", "same_ids_as_baseline", "{:.1%}"),
]


def wall_cell(r: dict[str, Any]) -> str | None:
    """Wall seconds, marked ⚠ when the machine ran more work than it has cores during the row."""
    w = r.get("wall_seconds")
    if w is None:
        return None
    return f"{w:.1f}" + (" ⚠" if overloaded(r.get("load")) else "")


def overloaded(load: dict[str, Any] | None) -> bool:
    """Whether other work competed with a row: the bench's own threads already load the machine up
    to its core count, so only a load average above cores + 0.5 says something else was running."""
    if not load:
        return False
    return max(load.get("loadavg_start", 0.0), load.get("loadavg_end", 0.0)) > load.get("cores", 1) + 0.5


def acceptance_length(r: dict[str, Any]) -> float | None:
    """τ: tokens per verification round (accepted drafts + the bonus), for speculative rows that count it."""
    spec = r.get("spec")
    return spec.get("acceptance_length") if isinstance(spec, dict) else None


def drafter_flops(r: dict[str, Any]) -> float | None:
    """FLOPs of every model but the primary one (the drafters' cost); None for single-model rows."""
    models, primary = r.get("models") or {}, r.get("primary")
    if primary is None or len(models) < 2:
        return None
    return sum(m["flops"] for name, m in models.items() if name != primary)


def target_forwards_per_sequence(r: dict[str, Any]) -> float | None:
    """Forwards of the primary model (target / verifier) per sequence: a speculative row's latency is
    set by these, while fwd/seq also counts every cheap drafter forward."""
    models, primary, n = r.get("models") or {}, r.get("primary"), r.get("sequences")
    if primary not in models or not n:
        return None
    return models[primary]["sequence_forwards"] / n


def modelled_gpu_ms(r: dict[str, Any]) -> float | None:
    """Milliseconds per answer on one H100 at LLaDA-8B's shapes, by the roofline MODEL of
    `bench.latency` (None for rows measured before forwards were counted by shape)."""
    from .latency import seconds_per_answer

    s = seconds_per_answer(r)
    return None if s is None else 1000 * s


def tokens_per_forward_all(r: dict[str, Any]) -> float | None:
    """Tokens per forward of any model (drafters included); equals TPF (target) for one-model rows."""
    return r.get("tokens_per_forward_all", r.get("tokens_per_forward"))


def _has_drafter(rows: list[dict[str, Any]]) -> bool:
    return any(drafter_flops(r) is not None for r in rows)


def _has(get: Any) -> Any:
    return lambda rows: any(get(r) is not None for r in rows)


# Shown only when `show(rows)`, so single-model tables stay narrow; each goes right after the named
# column (by row key or title) (so of two after the same column, the later one in this list comes first).
# "TPF (target)" divides generated tokens (each answer through its first EOS) by target / verifier
# forwards; "TPF (all models)" by the forwards of every model, drafters included.
OPTIONAL = [
    ("accuracy (flexible)", flexible_accuracy, "{:.1%}", "accuracy", _has(flexible_accuracy)),
    ("target fwd/seq", target_forwards_per_sequence, "{:.1f}", "nfe_per_sequence", _has_drafter),
    ("τ (tokens/round)", acceptance_length, "{:.2f}", "tokens_per_forward", _has(acceptance_length)),
    ("TPF (all models)", tokens_per_forward_all, "{:.2f}", "tokens_per_forward", _has_drafter),
    ("drafter GFLOPs", drafter_flops, None, "flops", _has(drafter_flops)),
    ("H100 ms/answer (roofline model, 8B)", modelled_gpu_ms, "{:,.0f}", "wall s", _has(modelled_gpu_ms)),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    columns: list[tuple[str, Any, str | None]] = list(COLUMNS)
    for title, get, fmt, after, show in OPTIONAL:
        if show(rows):
            at = next(i for i, c in enumerate(columns) if after in (c[0], c[1])) + 1  # a row key or a title
            columns.insert(at, (title, get, fmt))
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            v = key(r) if callable(key) else r.get(key)
            if v is None:
                cells.append("")
            elif fmt is None:
                cells.append(f"{v / 1e9:,.1f}")
            else:
                cells.append(fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    if any("⚠" in (wall_cell(r) or "") for r in rows):
        lines.append("\n⚠ the machine's load average exceeded its core count during this row: its wall clock "
                     "(and wall speed-up) is unreliable; FLOPs and forwards are not affected.")
    return "\n".join(lines)
