"""d2sd: DFlash with the K likeliest rejection boundaries re-anchored by a variable-prefix drafter,
tree verification (`speculative.d2sd`)."""
from __future__ import annotations

from typing import Any, Sequence

from . import Option, Ref
from ._ar import DRAFTER, GAMMA, ar_method

ORDER = 53
OPTIONS = {
    "gamma": GAMMA,
    "drafter": DRAFTER,
    "gamma2": Option(int, "d2sd: the variable-prefix drafter's window γ₂ (default 32)"),
    "k": Option(int, "d2sd: rejection boundaries re-anchored by the VP drafter (default 4)"),
    "vp_drafter": Option(str, "d2sd: variable-prefix drafter checkpoint (default: the bundled one)"),
}


def run_d2sd(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
             streamer: Any = None, meter: Any = None, drafter: Any = None, drafter_tokenizer: Any = None,
             vp_drafter: Any = None) -> Any:
    from ..speculative.armethods import ar_method_generate

    return ar_method_generate(model, tokenizer, prompts, cfg, progress=progress, streamer=streamer, meter=meter,
                              drafter=drafter, drafter_tokenizer=drafter_tokenizer, vp_drafter=vp_drafter)


METHODS = (ar_method("d2sd", "D²SD: the K likeliest rejection boundaries re-anchored, tree verification",
                     run_d2sd, OPTIONS, ("model", "drafter", "vp_drafter"),
                     stats=Ref("diffspec.speculative.d2sd:BlockSpecStats")),)
