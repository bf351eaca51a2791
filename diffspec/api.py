"""The Python entry point: pick a method, get text and its cost.

Methods are presets over one `DecodeConfig` (cache × policy); a user option
always wins over the preset, but combinations that would silently mean a
different method (e.g. `vanilla` with a cache) are rejected so a result is
never labelled with the wrong method name. Speculative methods
(`dualdiffusion`, `psd`) keep their own options in their own config (a
DecodeConfig plus the loop's options); `SPEC_METHODS` says which options
belong to which, so an option given to the wrong method is an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .decoding.config import DecodeConfig
from .decoding.diffusion import GenerationResult, diffusion_generate
from .models.checkpoint import load_model
from .models.tokenizer import Tokenizer
from .spec.dualdiffusion import DUAL_OPTIONS, SELF, DualConfig, build_dual_config, dualdiffusion_generate
from .spec.psd import PSD_OPTIONS, PSDConfig, build_psd_config, psd_generate

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
# Speculative methods: their own options (name -> parser from text), config builder and config type.
SPEC_METHODS: dict[str, tuple[dict[str, Any], Any, type]] = {
    "dualdiffusion": (DUAL_OPTIONS, build_dual_config, DualConfig),
    "psd": (PSD_OPTIONS, build_psd_config, PSDConfig),
}
METHOD_NAMES = (*METHODS, *SPEC_METHODS)
AnyConfig = DecodeConfig | DualConfig | PSDConfig


def method_options(method: str) -> dict[str, Any]:
    """The options only `method` takes (beyond DecodeConfig fields), with their text parsers."""
    return dict(SPEC_METHODS[method][0]) if method in SPEC_METHODS else {}


def build_config(method: str = "vanilla", base: AnyConfig | None = None, strict: bool = True,
                 **options: Any) -> AnyConfig:
    """Method preset, then `base`, then explicit options (None means 'not given').

    strict: refuse options the resulting config would ignore (a threshold with
    the schedule policy...) rather than run something other than what was asked.
    `diffspec bench` turns it off, since its command-line overrides apply to
    every row of a sweep and some rows have no use for them.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    foreign = {k: m for m, (opts, _, _) in SPEC_METHODS.items() if m != method
               for k in opts if options.get(k) is not None and k not in method_options(method)}
    if foreign:
        raise ValueError("; ".join(f"option {k!r} only applies to method {m!r}, not {method!r}"
                                   for k, m in sorted(foreign.items())))
    if base is not None and not isinstance(base, DecodeConfig) and \
            not (method in SPEC_METHODS and isinstance(base, SPEC_METHODS[method][2])):
        raise ValueError(f"method {method!r} cannot start from a {type(base).__name__}; pass a DecodeConfig")
    if method in SPEC_METHODS:
        cfg = SPEC_METHODS[method][1](base, **options)
        decode = cfg.decode
    else:
        cfg = decode = _build_decode_config(method, base, **options)
    unused = decode.unused_options({k for k, v in options.items() if v is not None})
    if strict and unused:
        raise ValueError(f"option(s) {unused} have no effect with policy {decode.policy!r} and cache "
                         f"{decode.cache!r} (method {method!r}); drop them or pick the policy/cache that uses them")
    return cfg


def _build_decode_config(method: str, base: DecodeConfig | None, **options: Any) -> DecodeConfig:
    unknown = set(options) - set(DecodeConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown decoding option(s) {sorted(unknown)}; valid: {sorted(DecodeConfig.__dataclass_fields__)}")
    given = {k: v for k, v in options.items() if v is not None}
    if base is None and "gen_length" in given and "steps" not in given:
        given["steps"] = given["gen_length"]  # full steps unless told otherwise
    # The preset is only the starting point: an explicit base config and explicit
    # options both win over it, so a result is never run with other settings than asked.
    merged = {**METHODS[method], **(base.to_dict() if base else {}), **given}
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


def resolve_drafter(drafter: Any, cfg: DualConfig, verifier: torch.nn.Module, drafter_tokenizer: Tokenizer | None,
                    dtype: str | None = None) -> tuple[torch.nn.Module | None, Tokenizer | None]:
    """The drafter model and its tokenizer: an object as given, `cfg.drafter` loaded
    onto the verifier's device, or (None, None) for 'self' (the verifier drafts)."""
    if isinstance(drafter, torch.nn.Module):
        return drafter, drafter_tokenizer
    if drafter is not None:
        raise ValueError(f"drafter must be a checkpoint path, 'self', a model object or None; "
                         f"got {type(drafter).__name__}")
    if cfg.drafter == SELF:
        return None, None
    param = next(verifier.parameters())
    return load_model(cfg.drafter, device=param.device, dtype=dtype or param.dtype)


def generate(
    prompts: str | Sequence[str],
    model: Any = None,
    tokenizer: Tokenizer | None = None,
    method: str = "vanilla",
    progress: bool = False,
    device: str | None = "cpu",
    dtype: str | None = None,
    config: AnyConfig | None = None,
    drafter: Any = None,
    drafter_tokenizer: Tokenizer | None = None,
    **options: Any,
) -> GenerationResult:
    """Generate completions for `prompts` with `method` (vanilla, fast-dllm, dkv-cache, dualdiffusion, psd).

    `model` is a checkpoint directory, a loaded model, or None for the bundled
    model; `options` are `DecodeConfig` fields (steps, gen_length, threshold...)
    and, for dualdiffusion, `DualConfig` options (rule, rule_threshold,
    num_drafter_steps, drafter_cache, drafter_policy, drafter_threshold...).
    `drafter` (dualdiffusion only) is a checkpoint path, 'self' / None (the
    verifier's own model with the drafter config, default dual cache +
    threshold 0.9) or a loaded model sharing the verifier's tokenizer.
    For psd, `options` also take `depths` (e.g. (1, 3, 5, 7)) and `lossless`.
    """
    if method != "dualdiffusion" and (drafter is not None or drafter_tokenizer is not None):
        raise ValueError(f"drafter= only applies to method 'dualdiffusion', not {method!r}")
    if isinstance(drafter, (str, Path)):
        options["drafter"], drafter = str(drafter), None
    cfg = build_config(method, config, **options)
    model, tokenizer = resolve_model(model, tokenizer, device, dtype)
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(cfg, DualConfig):
        if isinstance(drafter, torch.nn.Module):
            cfg = cfg.replace(drafter=f"<{type(drafter).__name__} object>")
        d_model, d_tok = resolve_drafter(drafter, cfg, model, drafter_tokenizer, dtype)
        return dualdiffusion_generate(model, tokenizer, list(prompts), cfg, d_model, d_tok, progress=progress)
    if isinstance(cfg, PSDConfig):
        return psd_generate(model, tokenizer, list(prompts), cfg, progress=progress)
    return diffusion_generate(model, tokenizer, list(prompts), cfg, progress=progress)
