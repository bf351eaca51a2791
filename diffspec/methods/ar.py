"""ar: greedy / sampled decoding of an AR (Qwen3-layout) target, KV-cached (`speculative.ar`)."""
from __future__ import annotations

from typing import Any, Sequence

from ._ar import ar_method

ORDER = 50


def run_ar(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
           streamer: Any = None, meter: Any = None) -> Any:
    from ..speculative.armethods import ar_method_generate

    return ar_method_generate(model, tokenizer, prompts, cfg, progress=progress, streamer=streamer, meter=meter)


METHODS = (ar_method("ar", "AR greedy / sampling on a Qwen3-layout target, KV-cached", run_ar, batches=True),)
