"""dflash: a block-diffusion drafter on the target's hidden states, chain verification
(`speculative.d2sd`)."""
from __future__ import annotations

from typing import Any, Sequence

from . import Ref
from ._ar import DRAFTER, GAMMA, ar_method

ORDER = 52


def run_dflash(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
               streamer: Any = None, meter: Any = None, drafter: Any = None, drafter_tokenizer: Any = None) -> Any:
    from ..speculative.armethods import ar_method_generate

    return ar_method_generate(model, tokenizer, prompts, cfg, progress=progress, streamer=streamer, meter=meter,
                              drafter=drafter, drafter_tokenizer=drafter_tokenizer)


METHODS = (ar_method("dflash", "DFlash: a block-diffusion drafter on the target's hidden states, chain verification",
                     run_dflash, {"gamma": GAMMA, "drafter": DRAFTER}, ("model", "drafter"),
                     stats=Ref("diffspec.speculative.d2sd:BlockSpecStats")),)
