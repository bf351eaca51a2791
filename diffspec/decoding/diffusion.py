"""The masked-diffusion decoding loop shared by vanilla LLaDA, Fast-dLLM and dKV-Cache.

One loop, close to LLaDA's pseudo-code: for each block, repeatedly ask the
cache strategy for the block's logits, propose tokens (argmax or Gumbel
sampling), score confidences, let the policy pick which masked positions to
commit, and tell the cache what was committed. Vanilla sampling is the
`none` cache with the `schedule` policy; the other methods only swap those two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.tokenizer import Tokenizer
from .cache import make_cache
from .config import DecodeConfig
from .meter import CostMeter, MeteredModel
from .policies import num_transfer_tokens, select_factor, select_local, select_threshold, select_topk
from .runner import GenerationResult, model_device, run_prompts
from .state import Canvas


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """LLaDA's sampler: argmax(exp(l) / (-log u)^T) in float64 (low precision hurts sampling quality)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = (-torch.log(u.clamp_min(1e-300))) ** temperature
    return logits.exp() / gumbel


def propose(logits: Tensor, cfg: DecodeConfig, generator: torch.Generator | None,
            end_ids: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """Candidate tokens and their confidence (softmax prob of the candidate, or random).

    With `cfg.confidence_eos_eot_inf` the confidence comes from a softmax in which
    the `end_ids` (EOS, <|eot_id|>) are impossible, as in LLaDA's sampler: a cell
    whose candidate ends the answer scores 0, so it is committed after the others.
    """
    x0 = add_gumbel_noise(logits, cfg.temperature, generator).argmax(dim=-1)
    if cfg.remasking == "low_confidence":
        scored = logits
        if cfg.confidence_eos_eot_inf and end_ids:
            scored = logits.index_fill(-1, torch.tensor(list(end_ids), device=logits.device), -torch.inf)
        p = F.softmax(scored.to(torch.float64), dim=-1)
        conf = torch.gather(p, -1, x0[..., None]).squeeze(-1).nan_to_num(0.0)  # NaN: only end ids were finite
    else:
        conf = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
    return x0, conf


def select(conf: Tensor, cfg: DecodeConfig, k: int) -> Tensor:
    if cfg.policy == "threshold":
        return select_threshold(conf, cfg.threshold)
    if cfg.policy == "factor":
        return select_factor(conf, cfg.factor)
    if cfg.policy == "local":
        return select_local(conf, cfg.threshold, cfg.local_threshold, cfg.local_radius)
    return select_topk(conf, k)


@dataclass
class StepOutput:
    """What one decoding step did to the current block [s, e) of the canvas."""

    s: int
    e: int
    chosen: Tensor  # bool (B, e - s): cells committed by this step
    logits: Tensor  # (B, e - s, V): the logits the step decided on (mask token at -inf)


class BlockDecoder:
    """The decoding loop of one canvas, runnable one step at a time.

    `step()` performs one iteration on the first block that still has masks
    in any row, keeping the cache strategy alive between calls, so a
    speculative method can run a few drafter steps, change the canvas, roll
    the decoder back and go on. `run()` is the plain loop (`decode_canvas`).

    The per-block step counter drives the schedule policy's plan; it restarts
    when the decoder enters a block and after a `rollback`, so a block whose
    cells were re-masked is decoded again at the same rate.
    """

    def __init__(self, model: MeteredModel, canvas: Canvas, cfg: DecodeConfig, generator: torch.Generator | None):
        if canvas.gen_length != cfg.gen_length:
            raise ValueError(f"canvas has {canvas.gen_length} generation slots but gen_length is {cfg.gen_length}")
        self.model, self.canvas, self.cfg, self.generator = model, canvas, cfg, generator
        self.cache = make_cache(cfg, model, canvas, generator)
        self.plan = num_transfer_tokens(cfg.block_length, cfg.steps // cfg.num_blocks)
        self.block: int | None = None
        self.step_in_block = 0
        self._mask_index = torch.tensor([canvas.mask_id], device=canvas.x.device)
        mc = model.config
        self._eos_index = torch.tensor([mc.eos_token_id], device=canvas.x.device)
        self._end_ids = tuple(i for i in (mc.eos_token_id, getattr(mc, "eot_token_id", None)) if i is not None)

    def current_block(self) -> int | None:
        """The first block in which some row still has a masked cell (None when done)."""
        c, cfg = self.canvas, self.cfg
        gen = c.masked()[:, c.prompt_len :].reshape(c.batch_size, cfg.num_blocks, cfg.block_length)
        todo = gen.any(-1).any(0).nonzero()
        return int(todo[0]) if len(todo) else None

    def step(self) -> StepOutput | None:
        """One forward and one commit on the current block; None when nothing is masked."""
        b = self.current_block()
        if b is None:
            return None
        c, cfg, model = self.canvas, self.cfg, self.model
        s, e = c.block_bounds(b, cfg.block_length)
        if b != self.block:
            self.block, self.step_in_block = b, 0
            self.cache.begin_block(s, e)
        step = self.step_in_block
        masked = c.x[:, s:e] == c.mask_id
        logits = self.cache.block_logits(step)
        if cfg.cfg_scale > 0:
            uncond = c.x.clone()
            uncond[:, : c.prompt_len] = torch.where(
                c.attention_mask[:, : c.prompt_len], c.mask_id, uncond[:, : c.prompt_len]
            )
            un = model(uncond, attention_mask=c.attention_mask).logits[:, s:e]
            logits = un + (cfg.cfg_scale + 1) * (logits - un)
        # Never propose the mask token itself: committing it would leave the slot
        # masked, and with greedy decoding the loop would then never terminate.
        logits = logits.index_fill(-1, self._mask_index, -torch.inf)
        if cfg.logits_eos_inf:
            logits = logits.index_fill(-1, self._eos_index, -torch.inf)
        x0, conf = propose(logits, cfg, self.generator, self._end_ids)
        conf = torch.where(masked, conf, torch.tensor(-torch.inf, dtype=conf.dtype, device=conf.device))
        k = self.plan[step] if step < len(self.plan) else 1
        chosen = select(conf, cfg, k)
        c.x[:, s:e] = torch.where(chosen, x0, c.x[:, s:e])
        self.cache.after_commit(chosen, step)
        self.step_in_block += 1
        if self.step_in_block > cfg.block_length:  # every policy commits >= 1 per row and step
            raise RuntimeError(f"block {b} still has masks after {self.step_in_block} steps; "
                               "the logits may contain NaN")
        return StepOutput(s, e, chosen, logits)

    def rollback(self, start: Tensor) -> None:
        """Someone else changed the canvas: drop cached K/V of row r from column start[r] on.

        Cells whose token changed would be recomputed anyway (the cache spots
        them); this also drops cells computed *in the context* of the old
        tokens, like truncating an AR KV cache at the first changed position.
        The step counter restarts so the schedule plan applies afresh.
        """
        self.cache.invalidate_from(start)
        self.step_in_block = 0

    def run(self) -> None:
        while self.step() is not None:
            pass


def decode_canvas(model: MeteredModel, canvas: Canvas, cfg: DecodeConfig, generator: torch.Generator | None) -> None:
    """Fill every masked slot of `canvas` in place, block by block."""
    BlockDecoder(model, canvas, cfg, generator).run()


def run_batches(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: DecodeConfig,
    meter: CostMeter,
    decode_batch: Callable[[Canvas], None],
    desc: str,
    progress: bool = False,
    max_positions: int | None = None,
) -> tuple[list[list[int]], list[str], list[list[int]]]:
    """The shared runner (`runner.run_prompts`) with each batch laid out on a canvas and filled in
    place by `decode_batch`; every masked-diffusion method decodes through it. Answers end at the
    config's single `eos_token_id`, as in LLaDA's and Dream's own code.

    Returns (ids cut at EOS, texts, raw generation ids)."""
    mcfg = model.config
    limit = max_positions or mcfg.max_sequence_length
    device = model_device(model)

    def decode(batch: list[list[int]]) -> list[list[int]]:
        canvas = Canvas.from_prompts(batch, cfg.gen_length, mcfg.mask_token_id, mcfg.pad_token_id, limit, device)
        decode_batch(canvas)
        return canvas.generated().tolist()

    return run_prompts(model, tokenizer, prompts, decode, gen_length=cfg.gen_length, batch_size=cfg.batch_size,
                       meter=meter, desc=desc, progress=progress, eos=(mcfg.eos_token_id,), limit=limit)


@torch.inference_mode()
def diffusion_generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: DecodeConfig,
    progress: bool = False,
    meter: CostMeter | None = None,
) -> GenerationResult:
    """Decode `prompts` with a masked diffusion model in batches of `cfg.batch_size`."""
    meter = meter or CostMeter()
    metered = MeteredModel(model, meter, meter.primary)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    token_ids, texts, raw = run_batches(
        model, tokenizer, prompts, cfg, meter, lambda canvas: decode_canvas(metered, canvas, cfg, generator),
        desc=f"decode[{cfg.policy},{cfg.cache}]", progress=progress)
    return GenerationResult(token_ids, texts, meter, cfg, raw)
