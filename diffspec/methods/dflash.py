"""dflash: a block-diffusion drafter on the target's hidden states, chain verification
(`speculative.d2sd`)."""
from __future__ import annotations

from . import Ref
from ._ar import DRAFTER, GAMMA, ar_method

ORDER = 52

METHODS = (ar_method("dflash", "DFlash: a block-diffusion drafter on the target's hidden states, chain verification",
                     {"gamma": GAMMA, "drafter": DRAFTER}, ("model", "drafter"),
                     stats=Ref("diffspec.speculative.d2sd:BlockSpecStats")),)
