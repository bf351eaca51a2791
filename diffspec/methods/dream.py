"""dream: Dream's own whole-sequence sampler (`decoding.dream`, after DreamLM's diffusion_generate)."""
from __future__ import annotations

from typing import Any, Sequence

from . import Method, Option, Ref
from ._common import given_options

ORDER = 40
SHARED = ("gen_length", "steps", "temperature", "seed", "batch_size")
OPTIONS = {
    "alg": Option(str, "dream: which masked cells to decode each step: origin (random, default) | maskgit_plus "
                       "(confidence) | topk_margin | entropy"),
    "alg_temp": Option(float, "dream: temperature of the confidence-weighted choice of cells (default none)"),
    "top_p": Option(float, "dream: nucleus sampling mass (default none)"),
    "top_k": Option(int, "dream: top-k sampling (default none)"),
    "eps": Option(float, "dream: the last timestep of its linspace(1, eps) schedule (default 1e-3)"),
    "transfer_schedule": Option(str, "dream: cells committed per step by the confidence algs: dream (Dream's "
                                     "int(m(1-s/t)), the rest at the last step; default) | even (split evenly over "
                                     "the steps, as LLaDA; beyond Dream)"),
}


def build_dream_config(base: Any = None, **options: Any) -> Any:
    """DreamDecodeConfig from the shared options (gen_length is its max_new_tokens) and its own."""
    from ..decoding.dream import DreamDecodeConfig

    given = given_options(options, SHARED, OPTIONS, "dream", "Dream's whole-sequence sampler")
    if "gen_length" in given:
        given["max_new_tokens"] = given.pop("gen_length")
        given.setdefault("steps", given["max_new_tokens"])
    return base.replace(**given) if base is not None else DreamDecodeConfig(**given)


def run_dream(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
              streamer: Any = None, meter: Any = None) -> Any:
    from ..decoding.dream import dream_generate

    return dream_generate(model, tokenizer, list(prompts), cfg, progress=progress, streamer=streamer, meter=meter)


METHODS = (Method(
    "dream", "diffusion",
    "Dream's sampler (DreamLM/Dream diffusion_generate): whole-sequence decoding, alg origin / maskgit_plus / "
    "topk_margin / entropy",
    build=build_dream_config, config_type=(Ref("diffspec.decoding.dream:DreamDecodeConfig"),),
    run=run_dream, options=OPTIONS, takes_block_options=False),)
