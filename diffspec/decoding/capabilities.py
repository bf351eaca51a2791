"""What a loaded model can do, asked in one place.

Every "is it autoregressive / where is the mask / which ids end an answer / how far
can it attend" question goes through `capabilities(model)`, so the answer cannot
differ between the API, the server, the likelihood scorer and the decoders.

`family` and `logits_shifted` are two questions, not one: Dream's network predicts
cell i from its output at i - 1 as an AR model does, but it is a masked model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .meter import MeteredModel
from .runner import eos_ids, max_positions


@dataclass(frozen=True)
class ModelCapabilities:
    family: str  # "ar" (a causal Llama / Qwen2 / Qwen3 target) or "diffusion" (a masked model)
    logits_shifted: bool  # logit i predicts token i + 1 (AR models and Dream's network)
    mask_id: int | None  # the mask token (None for AR models)
    eos_ids: tuple[int, ...]  # the ids that end an answer, as the family's decoders stop at them
    max_positions: int | None  # how many positions (prompt + answer) it attends over (None: its config does not say)
    block_causal: bool  # LLaDA2 / SDAR / Fast-dLLM v2: attention is causal across blocks

    @property
    def is_ar(self) -> bool:
        return self.family == "ar"


def unwrapped(model: Any) -> Any:
    """The network under any cost-meter wrappers."""
    while isinstance(model, MeteredModel):
        model = model.model
    return model


def capabilities(model: Any) -> ModelCapabilities:
    """The capabilities of `model` (a loaded network, or one wrapped in a `MeteredModel`).

    A masked model's answer ends at its config's single `eos_token_id` and it attends over
    `max_sequence_length` positions, as LLaDA's and Dream's own code has it; an AR target's
    at any of its EOS ids (SmolLM2 and Qwen3 have several), over `max_position_embeddings`."""
    from ..models.causal import Qwen3Model

    net = unwrapped(model)
    cfg = getattr(net, "config", None)
    if isinstance(net, Qwen3Model):
        return ModelCapabilities("ar", True, None, tuple(sorted(eos_ids(net))), max_positions(net), False)
    eos = getattr(cfg, "eos_token_id", None)
    return ModelCapabilities(
        family="diffusion",
        logits_shifted=bool(getattr(net, "logits_shifted", False)),
        mask_id=getattr(cfg, "mask_token_id", None),
        eos_ids=() if eos is None else (eos,) if isinstance(eos, int) else tuple(eos),
        max_positions=_diffusion_positions(net),
        block_causal=bool(getattr(net, "block_causal", False)),
    )


def _diffusion_positions(net: Any) -> int | None:
    """A masked model's `max_sequence_length` (LLaDA's name), else `max_position_embeddings`."""
    v = getattr(getattr(net, "config", None), "max_sequence_length", None)
    if isinstance(v, int) and v > 0:
        return v
    try:
        return max_positions(net)
    except (ValueError, AttributeError):
        return None
