"""diffspec's built-in methods, registered in `diffspec.methods`.

Each entry says what the method is, which options it owns (with the help the
CLI shows) and where its config builder and decode function live; those are
`Ref`s, imported on first use.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .methods import Method, Option, Ref, register
from .options import parse_bool, parse_depths

# ---------------------------------------------------------------- masked diffusion: one block decoder

# Method presets over one DecodeConfig (cache × policy); a user option always wins over the preset,
# but a cache another method owns is refused, so a result is never labelled with the wrong method.
PRESETS: dict[str, dict[str, Any]] = {
    "vanilla": {"cache": "none", "policy": "schedule"},
    "fast-dllm": {"cache": "dual", "policy": "threshold"},
    # dkv-prefill by default: the best dKV variant measured on the bundled model (as accurate as
    # vanilla at ~1.8x fewer FLOPs); dkv-decode (the paper's headline) lost 15-25 points at
    # refresh 8. Every variant stays available with --cache.
    "dkv-cache": {"cache": "dkv-prefill", "policy": "schedule"},
}
ALLOWED_CACHES = {
    "vanilla": ("none",),
    "fast-dllm": ("none", "prefix", "dual"),
    "dkv-cache": ("dkv-decode", "dkv-greedy", "dkv-prefill"),
}


def build_block_config(method: str, base: Any = None, **options: Any) -> Any:
    """A DecodeConfig for vanilla / fast-dllm / dkv-cache: preset, then `base`, then `options`."""
    from .decoding.config import DecodeConfig

    unknown = set(options) - set(DecodeConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown decoding option(s) {sorted(unknown)}; "
                         f"valid: {sorted(DecodeConfig.__dataclass_fields__)}")
    given = {k: v for k, v in options.items() if v is not None}
    if base is None and "gen_length" in given and "steps" not in given:
        given["steps"] = given["gen_length"]  # full steps unless told otherwise
    cfg = DecodeConfig(**{**PRESETS[method], **(base.to_dict() if base else {}), **given})
    if cfg.cache not in ALLOWED_CACHES[method]:
        raise ValueError(f"method {method!r} does not use cache {cfg.cache!r} "
                         f"(allowed: {', '.join(ALLOWED_CACHES[method])}); pick the method that owns that cache")
    if method == "vanilla" and cfg.policy != "schedule":
        raise ValueError("method 'vanilla' uses the 'schedule' policy; use --method fast-dllm for threshold/factor")
    return cfg


def _block_method(name: str, summary: str) -> Method:
    return Method(name, "diffusion", summary,
                  build=lambda base=None, **o: build_block_config(name, base, **o),
                  config_type=(Ref("diffspec.decoding.config:DecodeConfig"),),
                  run=run_block)


def run_block(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
              **_: Any) -> Any:
    from .decoding.diffusion import diffusion_generate

    return diffusion_generate(model, tokenizer, list(prompts), cfg, progress=progress)


def run_dual(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, drafter: Any = None,
             drafter_tokenizer: Any = None, progress: bool = False, dtype: Any = None, **_: Any) -> Any:
    import torch

    from .api import resolve_drafter
    from .speculative.dualdiffusion import dualdiffusion_generate

    if isinstance(drafter, torch.nn.Module):
        cfg = cfg.replace(drafter=f"<{type(drafter).__name__} object>")
    d_model, d_tok = resolve_drafter(drafter, cfg, model, drafter_tokenizer, dtype)
    return dualdiffusion_generate(model, tokenizer, list(prompts), cfg, d_model, d_tok, progress=progress)


def run_psd(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
            **_: Any) -> Any:
    from .speculative.psd import psd_generate

    return psd_generate(model, tokenizer, list(prompts), cfg, progress=progress)


def run_ar(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, drafter: Any = None,
           drafter_tokenizer: Any = None, vp_drafter: Any = None, progress: bool = False, **_: Any) -> Any:
    from .speculative.armethods import ar_method_generate

    return ar_method_generate(model, tokenizer, prompts, cfg, drafter=drafter, vp_drafter=vp_drafter,
                              progress=progress, drafter_tokenizer=drafter_tokenizer)


register(_block_method("vanilla", "LLaDA's sampler: semi-autoregressive blocks, fixed steps, low-confidence remasking"))
register(_block_method("fast-dllm", "Fast-dLLM: prefix / dual KV cache + threshold or factor parallel unmasking"))
register(_block_method("dkv-cache", "dKV-Cache: delayed caching of decoded tokens (--cache dkv-prefill, the "
                                    "default, dkv-decode or dkv-greedy)"))

DUAL_OPTIONS = {
    "drafter": Option(str, "drafter checkpoint directory, or 'self' = the verifier's model (default self)"),
    "drafter_cache": Option(str, "drafter's cache (default dual)"),
    "drafter_policy": Option(str, "drafter's unmasking policy (default threshold)"),
    "drafter_threshold": Option(float, "drafter's threshold-policy confidence (default 0.9)"),
    "rule": Option(str, "exact_match (default) | confidence_threshold | disagreement_with_confidence | "
                        "trust_verifier | no_verification (the reference's rules) | kl_divergence | "
                        "disagreement_and_confidence | verifier_overwrite | unmask_confidence (ours)"),
    "rule_threshold": Option(float, "τ of the rule: probability in (0, 1], KL in nats > 0 (default: the rule's)"),
    "num_drafter_steps": Option(int, "drafter steps per iteration (default 4)"),
    "num_verifier_steps": Option(int, "verifier forwards per iteration (default 1)"),
    "max_iterations": Option(int, "draft/verify iterations before the verifier fills the rest (default gen-length)"),
    "verifier_view": Option(str, "masked (default) | stepwise | drafted (the paper's) | leftward (beyond the "
                                 "paper: each draft scored with the drafts left of it filled): what the verifier "
                                 "sees of the drafts"),
    "verifier_unmask": Option(int, "masked cells the verifier decodes itself per forward (default 1 for the "
                                   "reference's rules, 0 for ours)"),
    "rollback": Option(str, "discard (default): re-mask what the iteration filled after a row's first rejected "
                            "cell, as speculative decoding does | keep: leave it"),
    "progress_guard": Option(parse_bool, "fill a stalled row's first re-masked cell with the verifier's token "
                                         "(default true)"),
    "adaptive_drafter_steps": Option(parse_bool, "double the drafter steps after a fully accepted iteration, "
                                                 "halve them after a rejection (default false)"),
}
register(Method(
    "dualdiffusion", "diffusion",
    "DualDiffusion: a cheap drafter runs N steps, the full verifier checks them, a rule decides",
    build=Ref("diffspec.speculative.dualdiffusion:build_dual_config"),
    config_type=(Ref("diffspec.decoding.config:DecodeConfig"), Ref("diffspec.speculative.dualdiffusion:DualConfig")),
    run=run_dual, options=DUAL_OPTIONS, roles=("model", "drafter")))

register(Method(
    "psd", "diffusion",
    "PSD: nested drafts from one forward's ranking, verified together in one batched forward",
    build=Ref("diffspec.speculative.psd:build_psd_config"),
    config_type=(Ref("diffspec.decoding.config:DecodeConfig"), Ref("diffspec.speculative.psd:PSDConfig")),
    run=run_psd,
    options={"depths": Option(parse_depths, "nested draft depths, increasing, below block-length (default 1,3,5,7)"),
             "lossless": Option(parse_bool, "exactly the output of one-token greedy decoding, with fewer forwards"),
             "accept_threshold": Option(float, "beyond the paper: a drafted cell must also have the verifier's "
                                               "probability >= this for its token (default 0: argmax agreement)"),
             "draft_order": Option(str, "beyond the paper: confidence (PSD's, default) | position (nested drafts "
                                        "left to right, each checked with every cell to its left filled)")}))

# ---------------------------------------------------------------- Dream's own sampler

DREAM_SHARED = ("gen_length", "steps", "temperature", "seed", "batch_size")


def _given_options(options: dict[str, Any], shared: tuple[str, ...], own: Mapping[str, Option], name: str,
                   what: str) -> dict[str, Any]:
    """The options given (not None) to method `name`, refused with one line unless each is one of the
    `shared` options that apply to it or its `own`."""
    given = {k: v for k, v in options.items() if v is not None}
    valid = set(shared) | set(own)
    unknown = sorted(set(given) - valid)
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to method {name!r} ({what}); valid: {sorted(valid)}")
    return given


def build_dream_config(base: Any = None, **options: Any) -> Any:
    """DreamDecodeConfig from the shared options (gen_length is its max_new_tokens) and its own."""
    from .decoding.dream import DreamDecodeConfig

    given = _given_options(options, DREAM_SHARED, DREAM_OPTIONS, "dream", "Dream's whole-sequence sampler")
    if "gen_length" in given:
        given["max_new_tokens"] = given.pop("gen_length")
        given.setdefault("steps", given["max_new_tokens"])
    return base.replace(**given) if base is not None else DreamDecodeConfig(**given)


def run_dream(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
              **_: Any) -> Any:
    from .decoding.dream import dream_generate

    return dream_generate(model, tokenizer, list(prompts), cfg, progress=progress)


DREAM_OPTIONS = {
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
register(Method(
    "dream", "diffusion",
    "Dream's sampler (DreamLM/Dream diffusion_generate): whole-sequence decoding, alg origin / maskgit_plus / "
    "topk_margin / entropy",
    build=build_dream_config, config_type=(Ref("diffspec.decoding.dream:DreamDecodeConfig"),),
    run=run_dream, options=DREAM_OPTIONS, takes_block_options=False))

# ---------------------------------------------------------------- AR targets

_AR_COMMON = {
    "max_new_tokens": Option(int, "another name for gen_length on AR targets"),
    "stop_at_eos": Option(parse_bool, "stop a row at its first EOS (default true)"),
}
_GAMMA = Option(int, "draft tokens per round (ar-spec, default 4) or the DFlash block γ (dflash / d2sd, default 16)")
_AR_DRAFTER = Option(str, "the AR drafter (ar-spec) or DFlash block drafter (dflash / d2sd) checkpoint "
                          "(default: the bundled one)")


def _ar_method(name: str, summary: str, options: dict[str, Option], roles: tuple[str, ...]) -> Method:
    return Method(name, "ar", summary,
                  build=lambda base=None, **o: Ref("diffspec.speculative.armethods:build_ar_config")(name, base, **o),
                  config_type=(Ref("diffspec.speculative.armethods:ARMethodConfig"),),
                  run=run_ar, options={**_AR_COMMON, **options}, roles=roles, takes_block_options=False)


register(_ar_method("ar", "AR greedy / sampling on a Qwen3-layout target, KV-cached", {}, ("model",)))
register(_ar_method("ar-spec", "speculative decoding with a small AR drafter (lossless greedy, exact sampling)",
                    {"gamma": _GAMMA, "drafter": _AR_DRAFTER}, ("model", "drafter")))
register(_ar_method("dflash", "DFlash: a block-diffusion drafter on the target's hidden states, chain verification",
                    {"gamma": _GAMMA, "drafter": _AR_DRAFTER}, ("model", "drafter")))
register(_ar_method("d2sd", "D²SD: the K likeliest rejection boundaries re-anchored, tree verification",
                    {"gamma": _GAMMA, "drafter": _AR_DRAFTER,
                     "gamma2": Option(int, "d2sd: the variable-prefix drafter's window γ₂ (default 32)"),
                     "k": Option(int, "d2sd: rejection boundaries re-anchored by the VP drafter (default 4)"),
                     "vp_drafter": Option(str, "d2sd: variable-prefix drafter checkpoint (default: the bundled one)")},
                    ("model", "drafter", "vp_drafter")))

# ---------------------------------------------------------------- LLaDA2's and SDAR's block-diffusion samplers (issue #39)

BLOCK_SAMPLER_SHARED = ("gen_length", "block_length", "steps", "threshold", "temperature", "cache", "seed",
                        "batch_size")


def _block_sampler(name: str, what: str, summary: str, config: str, generate: str, options: dict[str, Option],
                   renames: dict[str, str] | None = None) -> Method:
    """A block-diffusion sampler's method: its config `diffspec.decoding.<name>:<config>` built from
    the shared options that apply and its own (`renames`: option name -> config field), run by
    `diffspec.decoding.<name>:<generate>`."""
    config_type = Ref(f"diffspec.decoding.{name}:{config}")
    generate_fn = Ref(f"diffspec.decoding.{name}:{generate}")

    def build(base: Any = None, **options_given: Any) -> Any:
        given = _given_options(options_given, BLOCK_SAMPLER_SHARED, options, name, what)
        for option, field in (renames or {}).items():
            if option in given:
                given[field] = given.pop(option)
        return base.replace(**given) if base is not None else config_type(**given)

    def run(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
            **_: Any) -> Any:
        return generate_fn(model, tokenizer, list(prompts), cfg, progress=progress)

    build.__doc__ = f"{config} from the shared options that apply and its own."
    return Method(name, "diffusion", summary, build=build, config_type=(config_type,), run=run, options=options,
                  takes_block_options=False)


LLADA2_OPTIONS = {
    "top_k": Option(int, "llada2 / dream: top-k filtering before sampling (default none)"),
    "top_p": Option(float, "llada2 / dream: nucleus (top-p) filtering before sampling (default none)"),
    "minimal_topk": Option(int, "llada2: steps per block are capped at gen-length // minimal-topk (default 1)"),
    "eos_early_stop": Option(parse_bool, "llada2: stop as soon as a committed EOS has no masked cell before it "
                                         "(default true)"),
}
register(_block_sampler(
    "llada2", "LLaDA2's block-diffusion sampler",
    "LLaDA2's block-diffusion sampler (block 32, threshold 0.95 else the schedule's top-k) with an exact K/V "
    "cache of finished blocks; for block-causal LLaDA2 MoE checkpoints",
    "LLaDA2DecodeConfig", "llada2_generate", LLADA2_OPTIONS))

SDAR_OPTIONS = {
    "top_k": LLADA2_OPTIONS["top_k"],
    "top_p": LLADA2_OPTIONS["top_p"],
    "remasking_strategy": Option(str, "sdar: low_confidence_dynamic (default: --threshold, else the schedule's "
                                      "top-k) | low_confidence_static | sequential"),
}
register(_block_sampler(
    "sdar", "SDAR's block-diffusion sampler",
    "SDAR's block-diffusion sampler (block 4, 4 steps, low_confidence_dynamic at 0.85) with an exact K/V cache of "
    "finished blocks; for block-causal SDAR checkpoints",
    "SDARDecodeConfig", "sdar_generate", SDAR_OPTIONS, renames={"remasking_strategy": "remasking"}))
