"""fast-dllm-v2: Fast-dLLM v2's block-diffusion sampler (blocks, sub-blocks, an exact K/V cache of finished
blocks; issue #39)."""
from __future__ import annotations

from typing import Any, Sequence

from ..options import parse_bool
from . import Method, Option, Ref
from ._block_sampler import TOP_P
from ._common import given_options

ORDER = 62
NAME = "fast-dllm-v2"
WHAT = "Fast-dLLM v2's block-diffusion sampler"
SHARED = ("gen_length", "block_length", "steps", "threshold", "factor", "temperature", "cache", "seed", "batch_size")
OPTIONS = {
    "top_p": TOP_P,
    "small_block_size": Option(int, "fast-dllm-v2: sub-block size; a block's sub-blocks are decoded left to right "
                                    "(default 8; must divide --block-length)"),
    "sub_block_cache": Option(parse_bool, "fast-dllm-v2: the reference's approximate use_block_cache inside a block "
                                          "(default false)"),
}


def build_fastdllm_v2_config(base: Any = None, **options: Any) -> Any:
    """FastDLLMv2DecodeConfig from the shared options that apply and its own. The sampler has no step
    count (a sub-block is decoded until no cell is masked, at least one cell a step): `steps` is taken
    only as the generation length the API fills in when it is not given."""
    from ..decoding.fastdllm_v2 import FastDLLMv2DecodeConfig

    given = given_options(options, SHARED, OPTIONS, NAME, WHAT)
    if "factor" in given and "threshold" in given:
        raise ValueError(f"method {NAME!r} commits by --threshold or by Fast-dLLM's --factor rule; give one of them")
    steps = given.pop("steps", None)
    gen_length = given.get("gen_length", (base or FastDLLMv2DecodeConfig).gen_length)
    if steps is not None and steps != gen_length:
        raise ValueError(f"method {NAME!r} takes no --steps: each sub-block is decoded until no cell is masked "
                         "(at least one cell a step); steer it with --threshold or --factor")
    return base.replace(**given) if base is not None else FastDLLMv2DecodeConfig(**given)


def run_fastdllm_v2(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
                    streamer: Any = None, meter: Any = None) -> Any:
    from ..decoding.fastdllm_v2 import fastdllm_v2_generate

    return fastdllm_v2_generate(model, tokenizer, list(prompts), cfg, progress=progress, streamer=streamer,
                                meter=meter)


METHODS = (Method(
    NAME, "diffusion",
    "Fast-dLLM v2's block-diffusion sampler (block 32, sub-blocks of 8, threshold 0.9, an AR token opening each "
    "block) with an exact K/V cache of finished blocks; for Fast-dLLM v2 (Fast_dLLM_Qwen) checkpoints",
    build=build_fastdllm_v2_config, config_type=(Ref("diffspec.decoding.fastdllm_v2:FastDLLMv2DecodeConfig"),),
    run=run_fastdllm_v2, options=OPTIONS, takes_block_options=False),)
