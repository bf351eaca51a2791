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
from torch import Tensor

from ..models.tokenizer import Tokenizer
from .cache import DKVDecode, DualCache, NoCache, PrefixCache, make_cache
from .capabilities import capabilities
from .config import DecodeConfig
from .meter import CostMeter, MeteredModel, meter_primary
from .policies import num_transfer_tokens
from .propose import propose, select
from .runner import GenerationResult, model_device, run_prompts
from .state import Canvas
from .streamer import CanvasReporter, Streamer

# The caches whose decoder state is rebuilt from scratch at every block start and kept per row in
# between, so a row may leave the canvas at any step without changing what the others decode.
ROW_DROP_CACHES = ("none", "prefix", "dual", "dkv-decode")


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


def decode_canvas(model: MeteredModel, canvas: Canvas, cfg: DecodeConfig, generator: torch.Generator | None,
                  streamer: Streamer | None = None) -> None:
    """Fill every masked slot of `canvas` in place, block by block; with a `streamer`, report each
    step's commits (final: this loop never takes a committed cell back) and end when it says stop."""
    if streamer is None:
        BlockDecoder(model, canvas, cfg, generator).run()
        return
    decoder = BlockDecoder(model, canvas, cfg, generator)
    report = CanvasReporter(streamer, canvas)
    # Rows may leave only where that changes nothing for the others: a cache rebuilt at every
    # block start and kept per row in between, and no random draws (their order depends on the
    # batch's shape).
    droppable = cfg.cache in ROW_DROP_CACHES and cfg.temperature == 0 and cfg.remasking != "random"
    while not streamer.should_stop():
        b = decoder.current_block()
        if b is None:
            break
        keep = [i for i, r in enumerate(report.rows) if not streamer.row_done(r)] if droppable else []
        if droppable and len(keep) < len(report.rows):
            _write_back(canvas, decoder.canvas, report.rows)  # the leaving rows' cells, as they are now
            decoder = _without_rows(decoder, keep, b, report)
        decoder.step()
        report()
    _write_back(canvas, decoder.canvas, report.rows)


def _write_back(canvas: Canvas, small: Canvas, rows: list[int]) -> None:
    """Copy the rows of `small` (a cut-down canvas) back to rows `rows` of `canvas`."""
    if small is not canvas:
        canvas.x[rows] = small.x


def _without_rows(decoder: BlockDecoder, keep: list[int], block: int, report: CanvasReporter) -> BlockDecoder:
    """The decoder of rows `keep` of `decoder`'s canvas: at a block start a fresh decoder (it rebuilds
    what the old one would), inside a block the old one cut down to those rows (`keep_rows`)."""
    c = decoder.canvas
    idx = torch.tensor(keep, dtype=torch.long, device=c.x.device)
    small = Canvas(c.x[idx].clone(), c.attention_mask[idx].clone(), c.prompt_len, c.gen_length, c.mask_id)
    if block != decoder.block:
        decoder = BlockDecoder(decoder.model, small, decoder.cfg, decoder.generator)
    elif not keep_rows(decoder, small, idx):
        return decoder  # a cache whose state cannot be cut: the rows stay
    report.keep(keep, small)
    return decoder


def keep_rows(decoder: BlockDecoder, canvas: Canvas, idx: Tensor) -> bool:
    """Cut a BlockDecoder down to the rows `idx` in the middle of a block, in place: its canvas becomes
    `canvas` (those rows), and its cache keeps exactly those rows' state. False (nothing changed) for
    a cache this does not know.

    Exact, because nothing in these decoders couples rows: without a cache the state is the canvas,
    the block and the step in it; the cached strategies keep K/V, validity and refresh clocks per
    row, and a row attends exactly to what it would attend to alone, whatever its companions need
    (`decoding.cache.KVStore`). Taking rows out leaves the others' state untouched."""
    cache = decoder.cache
    if type(cache) in (PrefixCache, DualCache, DKVDecode):
        store = cache.store
        store.k = [None if t is None else t[idx] for t in store.k]
        store.v = [None if t is None else t[idx] for t in store.v]
        store.valid, store.token = store.valid[idx], store.token[idx]
        cache.row_steps, cache.block_steps = cache.row_steps[idx], cache.block_steps[idx]
        cache.last_need = cache.last_need[idx]
    elif type(cache) is not NoCache:
        return False
    decoder.canvas = cache.canvas = canvas
    return True


def run_batches(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: DecodeConfig,
    meter: CostMeter,
    decode_batch: Callable[[Canvas, Streamer | None], None],
    desc: str,
    progress: bool = False,
    max_positions: int | None = None,
    streamer: Streamer | None = None,
) -> tuple[list[list[int]], list[str], list[list[int]]]:
    """The shared runner (`runner.run_prompts`) with each batch laid out on a canvas and filled in
    place by `decode_batch`; every masked-diffusion method decodes through it. Answers end at the
    config's single `eos_token_id`, as in LLaDA's and Dream's own code.

    Returns (ids cut at EOS, texts, raw generation ids)."""
    caps = capabilities(model)
    limit = max_positions or caps.max_positions
    device = model_device(model)
    pad_id = model.config.pad_token_id

    def decode(batch: list[list[int]], stream: Streamer | None = None) -> list[list[int]]:
        canvas = Canvas.from_prompts(batch, cfg.gen_length, caps.mask_id, pad_id, limit, device)
        decode_batch(canvas, stream)
        return canvas.generated().tolist()

    return run_prompts(model, tokenizer, prompts, decode, gen_length=cfg.gen_length, batch_size=cfg.batch_size,
                       meter=meter, desc=desc, progress=progress, eos=caps.eos_ids, limit=limit,
                       streamer=streamer)


@torch.inference_mode()
def diffusion_generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: DecodeConfig,
    progress: bool = False,
    meter: CostMeter | None = None,
    streamer: Streamer | None = None,
) -> GenerationResult:
    """Decode `prompts` with a masked diffusion model in batches of `cfg.batch_size`."""
    meter, metered = meter_primary(model, meter)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    token_ids, texts, raw = run_batches(
        model, tokenizer, prompts, cfg, meter,
        lambda canvas, stream: decode_canvas(metered, canvas, cfg, generator, stream),
        desc=f"decode[{cfg.policy},{cfg.cache}]", progress=progress, streamer=streamer)
    return GenerationResult(token_ids, texts, meter, cfg, raw)
