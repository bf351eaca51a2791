"""SDAR's block-diffusion sampler (`block_diffusion_generate` of JetAstra/SDAR's `generate.py`).

The reference, step for step: the canvas is the prompt plus masks, rounded up to whole blocks of
`block_length` (4) counted from column 0; the prompt's whole blocks are prefilled into a K/V
cache; each block runs up to `denoising_steps` (4) steps with an even transfer schedule
(`block_length // steps` a step, the first `block_length % steps` steps one more), each step
scoring the block against the cached blocks (block-causal), drawing a candidate and its
probability per cell, and committing cells by `remasking_strategy`:

- `low_confidence_dynamic` (default): every masked cell above `confidence_threshold` (0.85) when
  there are at least the schedule's number, else that many most confident masked cells;
- `low_confidence_static`: the schedule's number of most confident masked cells;
- `sequential`: the schedule's number of cells from the first masked one, left to right.

After each block, decoding stops if a stop id (generation_config.json's `eos_token_id` list)
appears in the generated columns; the answer is cut at the first one.

Differences, all of which leave the token ids of the reference's greedy runs unchanged:
- the finished block's K/V are stored by the next block's first forward (fed together with it,
  under the block-causal mask) instead of one extra forward per block, so a block costs its
  denoising forwards only (`cache="none"` recomputes the whole window every step instead);
- temperature 0 is greedy (argmax, with its softmax probability as confidence); the reference
  divides the logits by the temperature and would fail at 0 (SDAR's README evaluates greedily);
  top-k / top-p need a temperature > 0 here;
- the top-k floor never takes more cells than are masked (the reference's `topk` over a block
  whose first cells are prompt could overwrite a prompt token when a step's quota exceeds the
  masked cells; with the default steps = block_length it never does);
- `entropy_bounded` is not offered (the reference's version sums the chosen tokens'
  probabilities over the block, not an entropy per cell; we could not tell what it intends);
- one seeded generator; rows decoded one at a time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from ..models.tokenizer import Tokenizer
from .llada2 import (CACHES, _int, check_counts, check_factor, check_sampling, choose_cells, decode_block_causal_row,
                     even_schedule, run_block_sampler, sample_candidates)
from .meter import CostMeter, MeteredModel
from .runner import GenerationResult, eos_ids
from .streamer import RowReporter, Streamer

__all__ = ["SDARDecodeConfig", "sdar_generate", "REMASKING"]

REMASKING = ("low_confidence_dynamic", "low_confidence_static", "sequential")


@dataclass(frozen=True)
class SDARDecodeConfig:
    """Options of SDAR's `block_diffusion_generate`, with `generate.py`'s defaults (block 4, 4 steps,
    low_confidence_dynamic at 0.85) except temperature 0 (greedy; see the module docstring)."""

    gen_length: int = 128
    block_length: int = 4
    steps: int = 4
    remasking: str = "low_confidence_dynamic"
    threshold: float = 0.85
    factor: float | None = None  # ours: Fast-dLLM's factor rule in low_confidence_dynamic (issue #39)
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    cache: str = "auto"
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_counts(self, ("gen_length", "block_length", "steps", "batch_size"))
        if not _int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.remasking not in REMASKING:
            raise ValueError(f"method 'sdar' takes remasking {' / '.join(REMASKING)}; got {self.remasking!r}")
        check_sampling(self)
        check_factor(self)
        if self.factor is not None and self.remasking != "low_confidence_dynamic":
            raise ValueError(f"factor replaces low_confidence_dynamic's threshold; remasking {self.remasking!r} "
                             "commits a fixed number of cells a step: leave factor unset")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            raise ValueError("top_k / top_p filter a sampling distribution: give a temperature > 0 with them")
        if self.cache not in CACHES:
            raise ValueError(f"method 'sdar' takes cache {' / '.join(CACHES)}; got {self.cache!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": "sdar", **asdict(self)}

    def replace(self, **kw: Any) -> "SDARDecodeConfig":
        return replace(self, **kw)


def choose(cfg: SDARDecodeConfig, conf: Tensor, active: Tensor, k: int) -> Tensor:
    """The cells the remasking strategy commits (conf is -inf off the masked cells)."""
    if cfg.remasking == "low_confidence_dynamic":
        return choose_cells(cfg)(conf, active, k)
    chosen = torch.zeros_like(active)
    if cfg.remasking == "low_confidence_static":
        chosen[conf.topk(min(k, int(active.sum()))).indices] = True
    else:  # sequential
        first = int(active.nonzero()[0])
        chosen[first:first + k] = True
        chosen &= active
    return chosen


@torch.inference_mode()
def sdar_generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: SDARDecodeConfig,
                  progress: bool = False, meter: CostMeter | None = None,
                  streamer: Streamer | None = None) -> GenerationResult:
    """Decode `prompts` one at a time with SDAR's rules. Answers end at any of the model's stop ids.
    A bidirectional model runs the same rules over its whole canvas, without a cache (as
    `llada2_generate`)."""
    stops = eos_ids(model)
    schedule = even_schedule(cfg.block_length, cfg.steps)

    def row(metered: MeteredModel, p: Sequence[int], cfg: SDARDecodeConfig, generator: torch.Generator,
            device: torch.device, bidirectional: bool, report: RowReporter | None) -> list[int]:
        return decode_block_causal_row(
            metered, p, block_length=cfg.block_length, gen_length=cfg.gen_length, schedule=schedule,
            choose=lambda conf, active, k: choose(cfg, conf, active, k),
            sample=lambda logits: sample_candidates(logits, cfg, generator), stop_ids=stops, early_stop=False,
            cache=cfg.cache == "block", mask_id=model.config.mask_token_id, device=device,
            bidirectional=bidirectional, report=report)

    return run_block_sampler(model, tokenizer, prompts, cfg, row, method="sdar", needs="SDAR / LLaDA2", eos=stops,
                             progress=progress, meter=meter, streamer=streamer)
