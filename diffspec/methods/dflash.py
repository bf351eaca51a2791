"""dflash: a block-diffusion drafter on the target's hidden states, chain verification
(`speculative.d2sd`)."""
from __future__ import annotations

from ..options import int_or_auto
from . import Option, Ref
from ._ar import DRAFTER, GAMMA, ar_method

ORDER = 52
DRAFTS = Option(int_or_auto, "dflash: drafts the target verifies a round, the first of the block's γ − 1 (default 0: "
                             "all); fewer cost less to verify on a CPU; auto: the count with the most tokens/s on "
                             "this device, timed on the first prompt's first 64 tokens (reported as auto_drafts)")

SHORTEN_BELOW = Option(float, "dflash: a round verifies only its first draft when the drafter's confidence in its "
                              "first two (the product of their probabilities) is below this (default 0: never); on "
                              "a CPU two tokens verify for about the cost of one; drafts auto chooses it")

METHODS = (ar_method("dflash", "DFlash: a block-diffusion drafter on the target's hidden states, chain verification",
                     {"gamma": GAMMA, "drafts": DRAFTS, "shorten_below": SHORTEN_BELOW, "drafter": DRAFTER},
                     ("model", "drafter"),
                     stats=Ref("diffspec.speculative.d2sd:BlockSpecStats")),)
