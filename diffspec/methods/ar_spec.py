"""ar-spec: speculative decoding with a small AR drafter (`speculative.ar`)."""
from __future__ import annotations

from typing import Any, Sequence

from . import Ref
from ._ar import DRAFTER, GAMMA, ar_method

ORDER = 51


def run_ar_spec(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
                streamer: Any = None, meter: Any = None, drafter: Any = None, drafter_tokenizer: Any = None) -> Any:
    from ..speculative.armethods import ar_method_generate

    return ar_method_generate(model, tokenizer, prompts, cfg, progress=progress, streamer=streamer, meter=meter,
                              drafter=drafter, drafter_tokenizer=drafter_tokenizer)


METHODS = (ar_method("ar-spec", "speculative decoding with a small AR drafter (lossless greedy, exact sampling)",
                     run_ar_spec, {"gamma": GAMMA, "drafter": DRAFTER}, ("model", "drafter"),
                     stats=Ref("diffspec.speculative.ar:ARSpecStats")),)
