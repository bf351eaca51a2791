"""d2sd: DFlash with the K likeliest rejection boundaries re-anchored by a variable-prefix drafter,
tree verification (`speculative.d2sd`)."""
from __future__ import annotations

from ..options import int_or_auto
from . import Option, Ref
from ._ar import DRAFTER, DRAFTS, GAMMA, ar_method

ORDER = 53
OPTIONS = {
    "gamma": GAMMA,
    "drafts": DRAFTS,
    "drafter": DRAFTER,
    "gamma2": Option(int, "d2sd: the variable-prefix drafter's window γ₂ (default 32)"),
    "k": Option(int_or_auto, "d2sd: rejection boundaries re-anchored by the VP drafter (default 4); auto: the K "
                             "with the most tokens/s on this device, timed on the first prompt's first 64 tokens, "
                             "and with drafts and branch at their defaults also four small trees (K 1-2, 3 drafts, "
                             "branches of 4-6) that suit a CPU (reported in the stats as auto_k)"),
    "branch": Option(int, "d2sd: the most tokens a tree branch holds past the anchor (default 0: γ₂ − 1); a small "
                          "cap keeps the tree cheap to verify on a CPU"),
    "vp_drafter": Option(str, "d2sd: variable-prefix drafter checkpoint (default: the bundled one)"),
}


METHODS = (ar_method("d2sd", "D²SD: the K likeliest rejection boundaries re-anchored, tree verification",
                     OPTIONS, ("model", "drafter", "vp_drafter"),
                     stats=Ref("diffspec.speculative.d2sd:BlockSpecStats")),)
