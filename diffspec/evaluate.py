"""Deprecated alias: `diffspec.evaluate` is `diffspec.evaluation.evaluate` (issue #36 moved it).

Kept only for importers that still name the old path (one test file owned by work in progress);
the alias is the same module object, so a monkeypatch through either name reaches the code.
New code imports `diffspec.evaluation.evaluate`.
"""
from __future__ import annotations

import sys

from .evaluation import evaluate as _evaluate

sys.modules[__name__] = _evaluate
