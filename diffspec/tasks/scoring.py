"""GSM8K-style answer extraction, shared by every generative task.

Follows lm-evaluation-harness: "strict-match" reads the number after `####`,
"flexible-extract" reads the last number anywhere in the completion.
"""
from __future__ import annotations

import re

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(text: str | None) -> str | None:
    """Strip `,` `$` and a trailing `.` so '1,000.' and '$1000' compare equal."""
    if text is None:
        return None
    text = text.strip().replace(",", "").replace("$", "")
    text = text.rstrip(".")
    return text or None


def extract_strict(completion: str) -> str | None:
    m = _STRICT.search(completion)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(completion: str) -> str | None:
    found = _NUMBER.findall(completion)
    if not found:
        return None
    last = found[-1]
    return normalize_number(last[0] or last[1])


def reference_answer(answer: str) -> str:
    """The number after `####` in a GSM8K-format reference solution."""
    if "####" not in answer:
        raise ValueError(f"reference answer has no '####' marker: {answer[-60:]!r}")
    return normalize_number(answer.split("####")[-1]) or ""


def truncate_at_stops(text: str, stops: list[str]) -> str:
    """Cut the completion at the first stop sequence (lm-eval 'until')."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
