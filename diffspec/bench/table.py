"""Readable markdown tables of bench rows."""
from __future__ import annotations

from typing import Any

COLUMNS = [
    ("method", "label", "{}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("Δacc", "accuracy_delta", "{:+.1%}"),
    ("fwd/seq", "nfe_per_sequence", "{:.1f}"),
    ("TPF", "tokens_per_forward", "{:.2f}"),
    ("tokens processed", "tokens_processed", "{:,}"),
    ("GFLOPs", "flops", None),
    ("wall s", "wall_seconds", "{:.1f}"),
    ("speed-up (wall)", "speedup_wall", "{:.2f}×"),
    ("speed-up (FLOPs)", "speedup_flops", "{:.2f}×"),
    ("same ids as baseline", "same_ids_as_baseline", "{:.1%}"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            if v is None:
                cells.append("")
            elif fmt is None:
                cells.append(f"{v / 1e9:,.1f}")
            else:
                cells.append(fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
