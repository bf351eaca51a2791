"""Helpers the method modules share (this module declares no method)."""
from __future__ import annotations

from typing import Any, Mapping

from . import Option


def given_options(options: dict[str, Any], shared: tuple[str, ...], own: Mapping[str, Option], name: str,
                  what: str) -> dict[str, Any]:
    """The options given (not None) to method `name`, refused with one line unless each is one of the
    `shared` options that apply to it or its `own`."""
    given = {k: v for k, v in options.items() if v is not None}
    valid = set(shared) | set(own)
    unknown = sorted(set(given) - valid)
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to method {name!r} ({what}); valid: {sorted(valid)}")
    return given
