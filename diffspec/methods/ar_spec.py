"""ar-spec: speculative decoding with a small AR drafter (`speculative.ar`)."""
from __future__ import annotations

from . import Ref
from ._ar import DRAFTER, GAMMA, ar_method

ORDER = 51

METHODS = (ar_method("ar-spec", "speculative decoding with a small AR drafter (lossless greedy, exact sampling)",
                     {"gamma": GAMMA, "drafter": DRAFTER}, ("model", "drafter"),
                     stats=Ref("diffspec.speculative.ar:ARSpecStats")),)
