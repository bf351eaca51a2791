"""The autoregressive-target methods as the API sees them: `ar`, `ar-spec`, `dflash`, `d2sd`.

Each is an AR decoding config (`speculative.ar` / `speculative.d2sd`) plus the checkpoint
paths of its drafters, wrapped in one `ARMethodConfig` so a result's JSON
records which drafters produced it (as DualDiffusion's config records its
drafter). `max_new_tokens` is accepted as another name for `gen_length`, so one
`--gen-length` means the same budget for diffusion and AR methods.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..decoding.capabilities import capabilities
from ..decoding.config import WrapsDecodeConfig
from ..decoding.meter import CostMeter
from ..decoding.runner import GenerationResult
from ..decoding.streamer import Streamer
from ..models.draft_vocab import DRAFT_VOCAB_FILE, read_draft_vocab
from ..models.tokenizer import Tokenizer, check_same_tokenizer
from .ar import ARConfig, SpecConfig, ar_generate, spec_generate
from .d2sd import D2SDConfig, DFlashSpecConfig, d2sd_generate, dflash_generate

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Bundled checkpoints, used when no path is given (trained by configs/qwen3-arith.json etc.).
DEFAULT_TARGET = ASSETS / "qwen3-arith"
DEFAULT_DRAFTERS = {"ar-spec": ASSETS / "qwen3-arith-small", "dflash": ASSETS / "dflash-arith",
                    "d2sd": ASSETS / "dflash-arith"}
DEFAULT_VP = ASSETS / "vp-arith"
# The drafters trained here for SmolLM2-135M-Instruct (configs/*-smollm2.json; issue #19), used
# instead of the arith ones when the target is the converted SmolLM2 GGUF.
SMOLLM2_DRAFTERS = {"ar-spec": ASSETS / "ar-smollm2", "dflash": ASSETS / "dflash-smollm2",
                    "d2sd": ASSETS / "dflash-smollm2", "vp": ASSETS / "vp-smollm2"}


def bundled_drafter(kind: str, target: torch.nn.Module | None) -> Path:
    """The bundled drafter of `kind` (ar-spec | dflash | d2sd | vp) trained for `target`: the SmolLM2
    ones for the converted SmolLM2 GGUF (its config.json records the source file), else the arith ones."""
    from ..models.gguf import SMOLLM2_FILE

    source = (getattr(getattr(target, "config", None), "extra", None) or {}).get("diffspec_gguf", {})
    if isinstance(source, dict) and source.get("source") == SMOLLM2_FILE:
        return SMOLLM2_DRAFTERS[kind]
    return DEFAULT_VP if kind == "vp" else DEFAULT_DRAFTERS[kind]


_CONFIGS: dict[str, type[ARConfig]] = {"ar": ARConfig, "ar-spec": SpecConfig, "dflash": DFlashSpecConfig,
                                       "d2sd": D2SDConfig}


@dataclass(frozen=True)
class ARMethodConfig(WrapsDecodeConfig):
    method: str
    decode: ARConfig
    drafter: str | None = None  # checkpoint path; None = the bundled default
    vp_drafter: str | None = None

    def replace(self, **kw: Any) -> "ARMethodConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "drafter": self.drafter, "vp_drafter": self.vp_drafter,
                **self.decode.to_dict()}


def build_ar_config(method: str, base: ARMethodConfig | None = None, **options: Any) -> ARMethodConfig:
    """AR method options -> ARMethodConfig (None means 'not given'); `max_new_tokens` is accepted as
    another name for gen_length, the one budget every method takes."""
    given = {k: v for k, v in options.items() if v is not None}
    if "max_new_tokens" in given:
        alias = given.pop("max_new_tokens")
        if given.setdefault("gen_length", alias) != alias:
            raise ValueError(f"gen_length={given['gen_length']} and max_new_tokens={alias} name one budget; "
                             "give one of them")
    cls = _CONFIGS[method]
    allowed = {f.name for f in fields(cls)} | ({"drafter"} if method != "ar" else set()) | \
        ({"vp_drafter"} if method == "d2sd" else set())
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to the autoregressive method {method!r}; "
                         f"valid: {sorted(allowed | {'max_new_tokens'})}")
    if base is not None and base.method != method:
        raise ValueError(f"method {method!r} cannot start from a {base.method!r} config")
    decode = {**(base.decode.to_dict() if base else {}), **{k: v for k, v in given.items() if k in
                                                             {f.name for f in fields(cls)}}}
    decode = {k: v for k, v in decode.items() if k in {f.name for f in fields(cls)}}
    paths = {k: str(given[k]) if k in given else (getattr(base, k) if base else None)
             for k in ("drafter", "vp_drafter")}
    try:
        return ARMethodConfig(method, cls(**decode), **paths)
    except ValueError as e:
        if options.get("max_new_tokens") is None:
            raise
        # the caller said max_new_tokens: name it, not the field it became
        raise ValueError(str(e).replace("gen_length", "max_new_tokens (gen_length)")) from None


def load_causal_or_default(path: str | None, default: Path, what: str, device: torch.device,
                            dtype: torch.dtype, tokenizer: Tokenizer,
                            target: torch.nn.Module | None = None) -> torch.nn.Module:
    """The AR drafter at `path` (or the bundled one), refused unless its tokenizer is the target's:
    equal vocabulary sizes are not enough, a swapped pair of ids would make its drafts garbage.
    A drafter saved without its own embedding takes `target`'s; a `draft_vocab.json` beside it
    (`diffspec draft-vocab`) narrows its head to those ids."""
    from ..models.causal import load_causal

    if path is None and not default.is_dir():
        raise FileNotFoundError(f"no {what} given and no bundled one at {default}; pass a checkpoint directory")
    model, tok = load_causal(path or default, device=device, dtype=dtype, embeddings_from=target)
    check_same_tokenizer(tok, tokenizer, f"the {what} {path or default}", "the target")
    vocab = Path(path or default) / DRAFT_VOCAB_FILE
    if vocab.is_file():  # read here, not by load_causal: only a drafter may narrow its head
        model.set_draft_vocab(read_draft_vocab(vocab, model.config.vocab_size))
    return model


def load_dflash_or_default(path: str | None, default: Path, what: str, target: torch.nn.Module) -> torch.nn.Module:
    from ..models.dflash import load_dflash

    if path is None and not default.is_dir():
        raise FileNotFoundError(f"no {what} given and no bundled one at {default}; pass --{what.replace(' ', '-')} "
                                "with a checkpoint directory (diffspec train dflash|vp)")
    return load_dflash(path or default, target)


def load_drafters(cfg: ARMethodConfig, target: torch.nn.Module, tokenizer: Tokenizer,
                  given: dict[str, Any] | None = None) -> dict[str, torch.nn.Module]:
    """The drafters `cfg.method` runs with: those `given` as objects, the others loaded from cfg's paths
    (or the bundled ones). A server loads them once this way and keeps them."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    out: dict[str, torch.nn.Module] = {}
    if cfg.method == "ar-spec":
        param = next(target.parameters())
        out["drafter"] = given.get("drafter") or load_causal_or_default(
            cfg.drafter, bundled_drafter("ar-spec", target), "drafter", param.device, param.dtype, tokenizer, target)
    elif cfg.method in ("dflash", "d2sd"):
        out["drafter"] = given.get("drafter") or load_dflash_or_default(
            cfg.drafter, bundled_drafter(cfg.method, target), "drafter", target)
    if cfg.method == "d2sd":
        out["vp_drafter"] = given.get("vp_drafter") or load_dflash_or_default(
            cfg.vp_drafter, bundled_drafter("vp", target), "vp drafter", target)
    return out


def ar_method_generate(target: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: ARMethodConfig,
                       drafter: torch.nn.Module | None = None, vp_drafter: torch.nn.Module | None = None,
                       progress: bool = False, drafter_tokenizer: Tokenizer | None = None,
                       meter: CostMeter | None = None, streamer: Streamer | None = None) -> GenerationResult:
    """Run `cfg.method` on an AR target; drafters are objects, or loaded from cfg's paths / the bundled ones.

    An ar-spec drafter must share the target's tokenizer: a loaded one is checked against its
    tokenizer.json, an object against `drafter_tokenizer` when given. (DFlash / VP drafters reuse
    the target's embedding and LM head, so they have no tokenizer of their own.)
    """
    if not capabilities(target).is_ar:
        raise ValueError(f"method {cfg.method!r} needs an autoregressive (Qwen3-layout) target model, got "
                         f"{type(target).__name__}; pass --model with a Qwen3 checkpoint")
    if drafter is not None and drafter_tokenizer is not None:
        check_same_tokenizer(drafter_tokenizer, tokenizer, "the drafter", "the target")
    models = load_drafters(cfg, target, tokenizer, {"drafter": drafter, "vp_drafter": vp_drafter})
    run = dict(meter=meter, progress=progress, streamer=streamer)
    if cfg.method == "ar":
        res = ar_generate(target, tokenizer, prompts, cfg.decode, **run)
    elif cfg.method == "ar-spec":
        res = spec_generate(target, models["drafter"], tokenizer, prompts, cfg.decode, **run)
    elif cfg.method == "dflash":
        res = dflash_generate(target, models["drafter"], tokenizer, prompts, cfg.decode, **run)
    else:
        res = d2sd_generate(target, models["drafter"], models["vp_drafter"], tokenizer, prompts, cfg.decode, **run)
    res.config = cfg  # record the method and drafter paths with the decoding options
    return res
