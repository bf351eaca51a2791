"""ar: greedy / sampled decoding of an AR (Qwen3-layout) target, KV-cached (`speculative.ar`)."""
from __future__ import annotations

from ._ar import ar_method

ORDER = 50

METHODS = (ar_method("ar", "AR greedy / sampling on a Qwen3-layout target, KV-cached", batches=True),)
