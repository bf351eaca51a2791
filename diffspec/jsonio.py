"""Reading user-supplied JSON files with one error wording across configs, checkpoints and results."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def parse_json_file(path: Path, what: str = "", error: type[Exception] = ValueError) -> Any:
    """The parsed file, or `error` saying which file is broken and where (never a bare JSONDecodeError)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{what}{' ' if what else ''}{path} is not valid JSON ({e})") from None
