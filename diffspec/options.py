"""Text parsers for method options (CLI flags, bench specs), light enough to import without torch."""
from __future__ import annotations

from typing import Any


def parse_bool(s: Any) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {s!r}")


def parse_depths(value: Any) -> tuple[int, ...]:
    """'1,3,5,7' or a sequence of ints -> tuple; order and range are checked by PSDConfig."""
    if isinstance(value, str):
        items = [v for v in value.replace(" ", "").split(",") if v]
        try:
            return tuple(int(v) for v in items)
        except ValueError:
            raise ValueError(f"depths must be comma-separated integers like 1,3,5,7; got {value!r}") from None
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"depths must be a list of integers like (1, 3, 5, 7); got {value!r}") from None


def int_or_auto(s: Any) -> int | str:
    """'auto' or a whole number (D²SD's k); the range is checked by the config."""
    v = str(s).strip().lower()
    if v == "auto":
        return "auto"
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"expected a whole number or auto, got {s!r}") from None
