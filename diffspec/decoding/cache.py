"""Cache strategies for bidirectional MDMs: which positions each forward feeds.

A strategy answers `block_logits(step)` with the logits of the current block
and hears `after_commit(chosen, step)` about what the policy committed. The
`none` strategy is vanilla LLaDA: every step runs the full canvas.
"""
from __future__ import annotations

from torch import Tensor

from .config import DecodeConfig
from .meter import MeteredModel
from .state import Canvas


class NoCache:
    """Vanilla: one full bidirectional forward per step."""

    def __init__(self, model: MeteredModel, canvas: Canvas, cfg: DecodeConfig):
        self.model, self.canvas, self.cfg = model, canvas, cfg
        self.s = self.e = 0

    def begin_block(self, s: int, e: int) -> None:
        self.s, self.e = s, e

    def block_logits(self, step: int) -> Tensor:
        c = self.canvas
        return self.model(c.x, attention_mask=c.attention_mask).logits[:, self.s : self.e]

    def after_commit(self, chosen: Tensor, step: int) -> None:
        pass


def make_cache(cfg: DecodeConfig, model: MeteredModel, canvas: Canvas):
    if cfg.cache == "none":
        return NoCache(model, canvas, cfg)
    raise NotImplementedError(f"cache {cfg.cache!r} is not implemented yet")
