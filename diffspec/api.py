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

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Sequence

import torch

from .decoding.config import DecodeConfig, is_finite_number
from .decoding.diffusion import GenerationResult, diffusion_generate
from .models.checkpoint import load_model
from .models.tokenizer import Tokenizer
from .spec.dualdiffusion import DUAL_OPTIONS, SELF, DualConfig, build_dual_config, dualdiffusion_generate
from .spec.psd import PSD_OPTIONS, PSDConfig, build_psd_config, psd_generate
from .spec.armethods import AR_METHODS, DEFAULT_TARGET, ARMethodConfig, ar_method_generate, ar_options, build_ar_config

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
METHOD_NAMES = (*METHODS, *SPEC_METHODS, *AR_METHODS)
AnyConfig = DecodeConfig | DualConfig | PSDConfig | ARMethodConfig

# Which checkpoints a method decodes: masked-diffusion methods need LLaDA-style models (a mask
# token, unshifted logits), AR-target methods a Qwen3-layout causal model.
FAMILY_NAMES = {"diffusion": "masked-diffusion (LLaDA)", "ar": "autoregressive (Qwen3)"}
FAMILY_METHODS = {"diffusion": (*METHODS, *SPEC_METHODS), "ar": AR_METHODS}


def method_options(method: str) -> dict[str, Any]:
    """The options only `method` takes (beyond DecodeConfig fields), with their text parsers."""
    if method in AR_METHODS:
        return ar_options(method)
    return dict(SPEC_METHODS[method][0]) if method in SPEC_METHODS else {}


def _owner_of_options() -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for m in (*SPEC_METHODS, *AR_METHODS):
        for k in method_options(m):
            owners.setdefault(k, []).append(m)
    return owners


def _check_finite(options: dict[str, Any]) -> None:
    """Every float option is a finite number, named as the caller spelled it (`drafter_threshold`,
    not the `threshold` of the config it lands in). NaN passes every `<` check silently."""
    for k, v in options.items():
        if isinstance(v, float) and not is_finite_number(v):
            raise ValueError(f"{k} must be a finite number, got {v}")


# DualDiffusion options that land in the drafter's DecodeConfig under another name.
_DRAFTER_ALIASES = {"drafter_cache": "cache", "drafter_policy": "policy", "drafter_threshold": "threshold"}


def _name_drafter_option(e: ValueError, options: dict[str, Any]) -> ValueError:
    """`e` reworded to name the option the caller gave (drafter_policy) when it speaks of the
    DecodeConfig field that option became (policy): an error must say what to change."""
    msg = str(e)
    for alias, field in _DRAFTER_ALIASES.items():
        if options.get(alias) is not None and alias not in msg and re.search(rf"(?<!\w){field}(?!\w)", msg):
            return ValueError(f"{alias}: {msg}")
    return e


def build_config(method: str = "vanilla", base: AnyConfig | None = None, strict: bool = True,
                 **options: Any) -> AnyConfig:
    """Method preset, then `base`, then explicit options (None means 'not given').

    strict: refuse options the resulting config would ignore (a threshold with
    the schedule policy...) rather than run something other than what was asked.
    `diffspec bench` turns it off, since its command-line overrides apply to
    every row of a sweep and some rows have no use for them.
    """
    if not isinstance(method, str) or method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    _check_finite(options)
    own = method_options(method)
    foreign = {k: ms for k, ms in _owner_of_options().items()
               if options.get(k) is not None and k not in own and k not in DecodeConfig.__dataclass_fields__}
    if foreign:
        raise ValueError("; ".join(f"option {k!r} only applies to method {' / '.join(repr(m) for m in ms)}, "
                                   f"not {method!r}" for k, ms in sorted(foreign.items())))
    if method in AR_METHODS:
        return build_ar_config(method, base if isinstance(base, ARMethodConfig) else None, **options)
    if base is not None and not isinstance(base, DecodeConfig) and \
            not (method in SPEC_METHODS and isinstance(base, SPEC_METHODS[method][2])):
        raise ValueError(f"method {method!r} cannot start from a {type(base).__name__}; pass a DecodeConfig")
    if method in SPEC_METHODS:
        if base is None and options.get("gen_length") is not None and options.get("steps") is None:
            options = {**options, "steps": options["gen_length"]}  # full steps unless told otherwise, as above
        try:
            cfg = SPEC_METHODS[method][1](base, **options)
        except ValueError as e:
            raise _name_drafter_option(e, options) from None
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


def method_family(method: str) -> str:
    """'ar' for the AR-target methods, 'diffusion' for the masked-diffusion ones."""
    return "ar" if method in AR_METHODS else "diffusion"


def model_family(model: torch.nn.Module) -> str:
    """A loaded model's family: causal models shift their logits (output i predicts token i+1)."""
    return "ar" if getattr(model, "logits_shifted", False) else "diffusion"


def check_family(method: str, family: str, what: str) -> None:
    """ValueError, naming both, unless `method` decodes models of `family` (a Qwen3 checkpoint has
    no mask token, a LLaDA one no causal cache: decoding either with the other's method crashes
    deep inside, or worse, runs)."""
    if method not in METHOD_NAMES or method_family(method) == family:
        return
    want = method_family(method)
    article = "an" if want == "ar" else "a"
    raise ValueError(f"method {method!r} needs {article} {FAMILY_NAMES[want]} model, but {what} is "
                     f"{FAMILY_NAMES[family]}; with that model use method {' / '.join(FAMILY_METHODS[family])}, "
                     f"or pass {article} {FAMILY_NAMES[want]} checkpoint")


def load_any(path: str | Path | None, device: str | None = "cpu", dtype: str | None = None,
             default: str | Path | None = None, method: str | None = None) -> tuple[torch.nn.Module, Tokenizer]:
    """Load a checkpoint by its config's model_type: Qwen3 (AR) or LLaDA (masked diffusion).

    With `method`, the checkpoint's family must be the method's (checked from config.json, before
    any weights are read)."""
    from .models.checkpoint import read_config

    path = path if path is not None else default
    is_ar = False
    if path is not None:
        model_type = read_config(Path(path)).get("model_type")
        is_ar = model_type == "qwen3"
        if method is not None:
            check_family(method, "ar" if is_ar else "diffusion", f"the checkpoint {path} (model_type {model_type!r})")
    if is_ar:
        from .models.causal import load_causal

        return load_causal(path, device=device, dtype=dtype)
    return load_model(path, device=device, dtype=dtype)


def resolve_model(model: Any, tokenizer: Tokenizer | None, device: str | None = "cpu",
                  dtype: str | None = None, method: str = "vanilla") -> tuple[torch.nn.Module, Tokenizer]:
    """A loaded (model, tokenizer): paths are loaded by model_type; None is the bundled
    model of the method's family (the LLaDA arith model, or the Qwen3 arith target)."""
    if model is None and method in AR_METHODS:
        if not DEFAULT_TARGET.is_dir():
            raise FileNotFoundError(f"method {method!r} needs an autoregressive target and no bundled one exists "
                                    f"yet at {DEFAULT_TARGET}; pass --model with a Qwen3 checkpoint")
        return load_any(DEFAULT_TARGET, device=device, dtype=dtype)
    if model is None or isinstance(model, (str, Path)):
        return load_any(model, device=device, dtype=dtype, method=method)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a checkpoint directory, a loaded model or None (the bundled one); "
                         f"got {type(model).__name__}")
    check_family(method, model_family(model), f"the model object ({type(model).__name__})")
    if tokenizer is None:
        raise ValueError("a model object needs its tokenizer: pass tokenizer=...")
    embeds = getattr(model.config, "embedding_size", None) or model.config.vocab_size
    if tokenizer.vocab_size > embeds:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model embeds {embeds}; "
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


def prompt_list(prompts: Any) -> list[str]:
    """`prompts` as a list of non-empty strings, or a ValueError naming the argument and the entry."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif prompts is None or isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, Iterable):
        raise ValueError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is an empty list; give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] must be a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"prompt {i} is empty (prompts[{i}] = {p!r}); give some text to complete")
    return prompts


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
    AR-target methods (ar, ar-spec, dflash, d2sd) take a Qwen3-layout `model`,
    `gen_length` as max_new_tokens, `gamma` (and `gamma2`, `k` for d2sd), and
    `drafter` / `vp_drafter` as paths or loaded models.
    """
    prompts = prompt_list(prompts)
    takes_drafter = ("dualdiffusion", *[m for m in AR_METHODS if m != "ar"])
    if method not in takes_drafter and (drafter is not None or drafter_tokenizer is not None):
        raise ValueError(f"drafter= only applies to methods {', '.join(takes_drafter)}, not {method!r}")
    if isinstance(drafter, (str, Path)):
        options["drafter"], drafter = str(drafter), None
    vp_drafter = options.pop("vp_drafter", None) if method == "d2sd" else None
    if isinstance(vp_drafter, (str, Path)):
        options["vp_drafter"], vp_drafter = str(vp_drafter), None
    cfg = build_config(method, config, **options)
    model, tokenizer = resolve_model(model, tokenizer, device, dtype, method=method)
    if isinstance(cfg, ARMethodConfig):
        return ar_method_generate(model, tokenizer, prompts, cfg, drafter=drafter, vp_drafter=vp_drafter,
                                  progress=progress, drafter_tokenizer=drafter_tokenizer)
    if isinstance(cfg, DualConfig):
        if isinstance(drafter, torch.nn.Module):
            cfg = cfg.replace(drafter=f"<{type(drafter).__name__} object>")
        d_model, d_tok = resolve_drafter(drafter, cfg, model, drafter_tokenizer, dtype)
        return dualdiffusion_generate(model, tokenizer, list(prompts), cfg, d_model, d_tok, progress=progress)
    if isinstance(cfg, PSDConfig):
        return psd_generate(model, tokenizer, list(prompts), cfg, progress=progress)
    return diffusion_generate(model, tokenizer, list(prompts), cfg, progress=progress)
