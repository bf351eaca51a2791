"""The Python entry point: pick a method, get text and its cost.

Methods are presets over one `DecodeConfig` (cache × policy); a user option
always wins over the preset, but combinations that would silently mean a
different method (e.g. `vanilla` with a cache) are rejected so a result is
never labelled with the wrong method name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .decoding.config import DecodeConfig
from .decoding.diffusion import GenerationResult, diffusion_generate
from .models.checkpoint import load_model
from .models.tokenizer import Tokenizer

METHODS: dict[str, dict[str, Any]] = {
    "vanilla": {"cache": "none", "policy": "schedule"},
    "fast-dllm": {"cache": "dual", "policy": "threshold"},
    "dkv-cache": {"cache": "dkv-decode", "policy": "schedule"},
}
_ALLOWED_CACHES = {
    "vanilla": ("none",),
    "fast-dllm": ("none", "prefix", "dual"),
    "dkv-cache": ("dkv-decode", "dkv-greedy", "dkv-prefill"),
}


def build_config(method: str = "vanilla", base: DecodeConfig | None = None, **options: Any) -> DecodeConfig:
    """Method preset, then `base`, then explicit options (None means 'not given')."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(options) - set(DecodeConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown decoding option(s) {sorted(unknown)}; valid: {sorted(DecodeConfig.__dataclass_fields__)}")
    given = {k: v for k, v in options.items() if v is not None}
    merged = {**(base.to_dict() if base else {}), **METHODS[method], **given}
    cfg = DecodeConfig(**merged)
    if cfg.cache not in _ALLOWED_CACHES[method]:
        raise ValueError(
            f"method {method!r} does not use cache {cfg.cache!r} (allowed: {', '.join(_ALLOWED_CACHES[method])}); "
            f"pick the method that owns that cache"
        )
    if method == "vanilla" and cfg.policy != "schedule":
        raise ValueError("method 'vanilla' uses the 'schedule' policy; use --method fast-dllm for threshold/factor")
    return cfg


def resolve_model(model: Any, tokenizer: Tokenizer | None, device: str | None = "cpu",
                  dtype: str | None = None) -> tuple[torch.nn.Module, Tokenizer]:
    if model is None or isinstance(model, (str, Path)):
        return load_model(model, device=device, dtype=dtype)
    if tokenizer is None:
        raise ValueError("a model object needs its tokenizer: pass tokenizer=...")
    if tokenizer.vocab_size > model.config.embedding_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model embeds {model.config.embedding_size}; "
            "they do not belong together"
        )
    return model, tokenizer


def generate(
    prompts: str | Sequence[str],
    model: Any = None,
    tokenizer: Tokenizer | None = None,
    method: str = "vanilla",
    progress: bool = False,
    device: str | None = "cpu",
    dtype: str | None = None,
    config: DecodeConfig | None = None,
    **options: Any,
) -> GenerationResult:
    """Generate completions for `prompts` with `method` (vanilla, fast-dllm, dkv-cache).

    `model` is a checkpoint directory, a loaded model, or None for the bundled
    model; `options` are `DecodeConfig` fields (steps, gen_length, threshold...).
    """
    cfg = build_config(method, config, **options)
    model, tokenizer = resolve_model(model, tokenizer, device, dtype)
    if isinstance(prompts, str):
        prompts = [prompts]
    return diffusion_generate(model, tokenizer, list(prompts), cfg, progress=progress)
