"""Decoding options as one validated dataclass (the `generate()` config pattern).

Validation that needs the model or prompts (max positions, empty prompts)
happens in `state.Canvas`; everything knowable from the options alone is
checked here so a bad CLI flag fails before any model is loaded.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

REMASKING = ("low_confidence", "random")
POLICIES = ("schedule", "threshold", "factor", "local")
CACHES = ("none", "prefix", "dual", "dkv-decode", "dkv-greedy", "dkv-prefill")


@dataclass(frozen=True)
class DecodeConfig:
    gen_length: int = 48
    block_length: int = 16
    steps: int = 48
    remasking: str = "low_confidence"
    temperature: float = 0.0
    cfg_scale: float = 0.0
    policy: str = "schedule"
    threshold: float = 0.9
    factor: float = 1.0
    local_threshold: float = 0.7  # policy "local": relaxed threshold next to an anchor
    local_radius: int = 1  # policy "local": how many columns an anchor reaches
    cache: str = "none"
    refresh_interval: int = 8
    seed: int = 0
    batch_size: int = 32
    # LLaDA's sampler options (its Appendix B.4), off by default as there: `logits_eos_inf` never
    # proposes EOS; `confidence_eos_eot_inf` scores cells whose candidate is EOS or <|eot_id|> with
    # confidence 0, so the answer's end is committed last.
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        check_finite_floats(self)
        if self.gen_length < 1:
            raise ValueError(f"gen_length must be >= 1, got {self.gen_length}")
        if self.block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {self.block_length}")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length}); "
                f"try block_length {self._divisor_hint()}"
            )
        if self.steps < 1 or self.steps > self.gen_length:
            raise ValueError(f"steps must be in [1, gen_length={self.gen_length}], got {self.steps}")
        if self.policy == "schedule" and self.steps % self.num_blocks:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of the number of blocks "
                f"(gen_length/block_length = {self.num_blocks})"
            )
        if self.remasking not in REMASKING:
            raise ValueError(f"unknown remasking {self.remasking!r}; choose one of {', '.join(REMASKING)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.cfg_scale > 0 and self.cache != "none":  # known now, so refused before any model is loaded
            raise ValueError("classifier-free guidance (cfg_scale > 0) is only supported with cache 'none'")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not 0 < self.threshold <= 1 and not (self.policy != "threshold" and self.threshold == 0.9):
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.policy == "local":
            if not 0 < self.local_threshold <= self.threshold:
                raise ValueError(f"local_threshold must be in (0, threshold={self.threshold}], got {self.local_threshold}")
            if self.local_radius < 1:
                raise ValueError(f"local_radius must be >= 1, got {self.local_radius}")
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {', '.join(CACHES)}")
        if self.refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {self.refresh_interval}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def unused_options(self, given: set[str] | list[str]) -> list[str]:
        """Options in `given` that this config would silently ignore (e.g. a threshold
        with the schedule policy), so callers can refuse them instead."""
        used_by = {
            "threshold": self.policy in ("threshold", "local"),
            "factor": self.policy == "factor",
            "local_threshold": self.policy == "local",
            "local_radius": self.policy == "local",
            "refresh_interval": self.cache in ("dkv-decode", "dkv-greedy"),
            "confidence_eos_eot_inf": self.remasking == "low_confidence",
        }
        return sorted(k for k in given if used_by.get(k) is False)

    def _divisor_hint(self) -> str:
        ds = [d for d in range(1, self.gen_length + 1) if self.gen_length % d == 0]
        return " or ".join(str(d) for d in ds[-4:])

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    def replace(self, **kw: Any) -> "DecodeConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def full_steps(decode: dict[str, Any], given: Mapping[str, Any], base: Any) -> None:
    """Full steps unless told otherwise: a gen_length given without steps decodes one token per
    step (steps = gen_length, LLaDA's default). A base config (a DecodeConfig, or a config wrapping
    one) at full steps stays at full steps; one with fewer steps than its gen_length keeps its
    count (that was a choice). The LLaDA-style builders (block, PSD, DualDiffusion) apply this one
    rule, so the CLI, the API, eval, lm-eval and the server agree on it."""
    if "gen_length" not in given or "steps" in given:
        return
    d = getattr(base, "decode", base)
    if base is None or getattr(d, "steps", None) == getattr(d, "gen_length", None):
        decode["steps"] = given["gen_length"]


def is_finite_number(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (an int too large for a float counts as infinite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_finite_floats(cfg: Any) -> None:
    """Reject NaN and infinite values of float fields: every comparison with NaN is False, so a NaN
    threshold or temperature slips through range checks and decodes garbage instead of failing, and
    an infinite temperature overflows the sampler."""
    for name, f in cfg.__dataclass_fields__.items():
        if isinstance(f.default, float) and not is_finite_number(getattr(cfg, name)):
            raise ValueError(f"{name} must be a finite number, got {getattr(cfg, name)!r}")


def check_field_types(cfg: Any) -> None:
    """Reject wrongly typed options up front (a string "48" would fail deep inside torch)."""
    for name, f in cfg.__dataclass_fields__.items():
        value, default = getattr(cfg, name), f.default
        if value == "auto" and name in getattr(cfg, "AUTO_FIELDS", ()):
            continue  # chosen when decoding starts (D²SD's k: `speculative.sizing`)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            also = " or 'auto'" if name in getattr(cfg, "AUTO_FIELDS", ()) else ""
            raise ValueError(f"{name} must be a {type(default).__name__}{also}, got {value!r} ({type(value).__name__})")


class WrapsDecodeConfig:
    """Mixin for a method config that keeps its decoding options in `decode` (DualDiffusion and PSD
    a DecodeConfig, the AR methods an ARConfig): code that reads the canvas shape or batching sees
    the same surface."""

    decode: Any  # a DecodeConfig, or any config with gen_length and batch_size

    @property
    def gen_length(self) -> int:
        return self.decode.gen_length

    @property
    def batch_size(self) -> int:
        return self.decode.batch_size
