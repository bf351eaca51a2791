"""sdar: SDAR's block-diffusion sampler with an exact K/V cache of finished blocks (issue #39)."""
from __future__ import annotations

from . import Option
from ._block_sampler import TOP_K, TOP_P, block_sampler

ORDER = 61
OPTIONS = {
    "top_k": TOP_K,
    "top_p": TOP_P,
    "remasking_strategy": Option(str, "sdar: low_confidence_dynamic (default: --threshold, else the schedule's "
                                      "top-k) | low_confidence_static | sequential"),
}
METHODS = (block_sampler(
    "sdar", "SDAR's block-diffusion sampler",
    "SDAR's block-diffusion sampler (block 4, 4 steps, low_confidence_dynamic at 0.85) with an exact K/V cache of "
    "finished blocks; for block-causal SDAR checkpoints",
    "SDARDecodeConfig", "sdar_generate", OPTIONS, renames={"remasking_strategy": "remasking"}),)
