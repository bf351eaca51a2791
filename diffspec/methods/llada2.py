"""llada2: LLaDA2's block-diffusion sampler with an exact K/V cache of finished blocks (issue #39)."""
from __future__ import annotations

from ..options import parse_bool
from . import Option
from ._block_sampler import TOP_K, TOP_P, block_sampler

ORDER = 60
OPTIONS = {
    "top_k": TOP_K,
    "top_p": TOP_P,
    "minimal_topk": Option(int, "llada2: steps per block are capped at gen-length // minimal-topk (default 1)"),
    "eos_early_stop": Option(parse_bool, "llada2: stop as soon as a committed EOS has no masked cell before it "
                                         "(default true)"),
}
METHODS = (block_sampler(
    "llada2", "LLaDA2's block-diffusion sampler",
    "LLaDA2's block-diffusion sampler (block 32, threshold 0.95 else the schedule's top-k) with an exact K/V "
    "cache of finished blocks; for block-causal LLaDA2 MoE checkpoints",
    "LLaDA2DecodeConfig", "llada2_generate", OPTIONS),)
