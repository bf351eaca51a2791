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
from .state import Block, Canvas
from .streamer import CanvasReporter, Streamer

# The caches whose decoder state is rebuilt from scratch at every block start and kept per row in
# between, so a row may leave the canvas at any step without changing what the others decode.
ROW_DROP_CACHES = ("none", "prefix", "dual", "dkv-decode")
# The caches rows may join at a block start (step-level batching): a late row starts with nothing
# cached and its clocks at zero, as alone, and the others keep their state. dkv-prefill joins too
# (the late row's prompt is prefilled at its first step, against its all-masked answer, as alone),
# though its rows cannot leave at a block start: a rebuilt decoder would prefill them again.
JOIN_CACHES = (*ROW_DROP_CACHES, "dkv-prefill")


def _greedy(cfg: DecodeConfig) -> bool:
    """No random draws: their order would depend on the batch's shape, so rows could not come or go."""
    return cfg.temperature == 0 and cfg.remasking != "random"


def joinable(cfg: DecodeConfig) -> bool:
    """Whether rows may join a running batch of `cfg` (greedy, and a cache in JOIN_CACHES)."""
    return _greedy(cfg) and cfg.cache in JOIN_CACHES


@dataclass
class StepOutput:
    """What one decoding step did to the current block [s, e) of the canvas.

    s and e are every row's block while no row joined late (the speculative methods, which
    never add rows); `block` holds each row's own."""

    s: int
    e: int
    chosen: Tensor  # bool (B, e - s): cells committed by this step
    logits: Tensor  # (B, e - s, V): the logits the step decided on (mask token at -inf)
    block: Block


class BlockDecoder:
    """The decoding loop of one canvas, runnable one step at a time.

    `step()` performs one iteration on the first block that still has masks
    in any row, keeping the cache strategy alive between calls, so a
    speculative method can run a few drafter steps, change the canvas, roll
    the decoder back and go on. `run()` is the plain loop (`decode_canvas`).

    The per-block step counter drives the schedule policy's plan; it restarts
    when the decoder enters a block and after a `rollback`, so a block whose
    cells were re-masked is decoded again at the same rate.

    Rows advance in rounds: in round r, row i decodes its block r - offset[i],
    and the next round begins once no row has a masked cell in its block. A
    plain batch has every offset 0 (round = block). Step-level batching adds
    rows at a round's start (`add_rows`) with offset r, so a late row decodes
    its first block while its companions decode their (r+1)-th, with its own
    cache clocks starting at zero: as it would alone, at the same rate.
    """

    def __init__(self, model: MeteredModel, canvas: Canvas, cfg: DecodeConfig, generator: torch.Generator | None):
        if canvas.gen_length != cfg.gen_length:
            raise ValueError(f"canvas has {canvas.gen_length} generation slots but gen_length is {cfg.gen_length}")
        self.model, self.canvas, self.cfg, self.generator = model, canvas, cfg, generator
        self.cache = make_cache(cfg, model, canvas, generator)
        self.plan = num_transfer_tokens(cfg.block_length, cfg.steps // cfg.num_blocks)
        self.block: int | None = None  # the round being decoded (the block, without late rows)
        self.step_in_block = 0
        self.offset = torch.zeros(canvas.batch_size, dtype=torch.long, device=canvas.x.device)
        self.late = False  # whether rows joined late (then offsets differ and blocks are found per row)
        self._mask_index = torch.tensor([canvas.mask_id], device=canvas.x.device)
        mc = model.config
        self._eos_index = torch.tensor([mc.eos_token_id], device=canvas.x.device)
        self._end_ids = tuple(i for i in (mc.eos_token_id, getattr(mc, "eot_token_id", None)) if i is not None)

    def current_block(self) -> int | None:
        """The round to decode: the first in which some row's block still has a masked cell (None when
        done). Without late rows, the first block in which some row still has a masked cell."""
        c, cfg = self.canvas, self.cfg
        gen = c.masked()[:, c.prompt_len :].reshape(c.batch_size, cfg.num_blocks, cfg.block_length).any(-1)
        todo = gen.any(1)
        if not bool(todo.any()):
            return None
        return int((gen.float().argmax(1) + self.offset)[todo].min())

    def blocks(self, r: int) -> Block:
        """Each row's block in round `r` (a row that finished sits on its last block)."""
        cfg = self.cfg
        if not self.late:  # no late rows: round r is block r for every row
            return self.canvas.block(r, cfg.block_length)
        index = (r - self.offset).clamp(0, cfg.num_blocks - 1)
        return Block(self.canvas.prompt_len + index * cfg.block_length, cfg.block_length)

    def at_round_start(self, r: int | None = None) -> bool:
        """Whether the next step begins a round (where rows may join); `r`: `current_block()`, if known."""
        return self.block is None or (self.current_block() if r is None else r) != self.block

    def add_rows(self, canvas: Canvas) -> None:
        """Rows joining at a round's start: `canvas` holds them (same prompt and generation widths),
        masked and with nothing cached; they decode their first block in the coming round."""
        c = self.canvas
        if not self.at_round_start():
            raise RuntimeError("rows join a running batch only where a round (block) begins")
        if canvas.prompt_len != c.prompt_len or canvas.gen_length != c.gen_length:
            raise ValueError(f"joining rows need the canvas's layout: prompt {c.prompt_len}, answer {c.gen_length} "
                             f"columns; got {canvas.prompt_len}, {canvas.gen_length}")
        r = self.current_block()
        if r is None:
            raise RuntimeError("the batch is done; start a new one instead of joining it")
        self.canvas = Canvas(torch.cat([c.x, canvas.x]), torch.cat([c.attention_mask, canvas.attention_mask]),
                             c.prompt_len, c.gen_length, c.mask_id)
        self.offset = torch.cat([self.offset, self.offset.new_full((canvas.batch_size,), r)])
        self.late = True
        self.cache.canvas = self.canvas
        self.cache.add_rows(canvas.batch_size)
        self.block = None  # the round (re)starts with every row in it

    def step(self) -> StepOutput | None:
        """One forward and one commit on the current block; None when nothing is masked."""
        b = self.current_block()
        if b is None:
            return None
        c, cfg, model = self.canvas, self.cfg, self.model
        blk = self.blocks(b)
        if b != self.block:
            self.block, self.step_in_block = b, 0
            self.cache.begin_block(blk)
        step = self.step_in_block
        masked = blk.take(c.x) == c.mask_id
        logits = self.cache.block_logits(step)
        if cfg.cfg_scale > 0:
            uncond = c.x.clone()
            uncond[:, : c.prompt_len] = torch.where(
                c.attention_mask[:, : c.prompt_len], c.mask_id, uncond[:, : c.prompt_len]
            )
            un = blk.take(model(uncond, attention_mask=c.attention_mask).logits)
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
        blk.put(c.x, torch.where(chosen, x0, blk.take(c.x)))
        self.cache.after_commit(chosen, step)
        self.step_in_block += 1
        if self.step_in_block > cfg.block_length:  # every policy commits >= 1 per row and step
            raise RuntimeError(f"block {b} still has masks after {self.step_in_block} steps; "
                               "the logits may contain NaN")
        s = blk.uniform if blk.uniform is not None else -1
        return StepOutput(s, s + cfg.block_length, chosen, logits, blk)

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
    # Rows may leave, or join at a round's start, only where that changes nothing for the others: a
    # cache rebuilt at every block start and kept per row in between, and no random draws (their
    # order depends on the batch's shape).
    droppable, joins = _greedy(cfg) and cfg.cache in ROW_DROP_CACHES, joinable(cfg)
    while not streamer.should_stop():
        b = decoder.current_block()
        if b is None:
            break
        keep = [i for i, r in enumerate(report.rows) if not streamer.row_done(r)] if droppable else []
        if droppable and len(keep) < len(report.rows):
            if not keep:  # every row is done: nothing left to decode, nor to join
                break
            _write_back(canvas, decoder.canvas, report.rows)  # the leaving rows' cells, as they are now
            decoder = _without_rows(decoder, keep, b, report)
            b = decoder.current_block()  # the leaving rows may have held the round open
        if joins and decoder.at_round_start(b):
            _join(decoder, streamer, report)
        decoder.step()
        report()
    _write_back(canvas, decoder.canvas, report.rows)


def _join(decoder: BlockDecoder, streamer: Streamer, report: CanvasReporter) -> None:
    """Step-level batching: the rows the streamer admits now join the canvas (`BlockDecoder.add_rows`)."""
    c = decoder.canvas
    new = streamer.admit(c.prompt_len, c.batch_size)
    if not new:
        return
    prompts = [ids for _, ids in new]
    if any(len(p) > c.prompt_len for p in prompts):
        raise ValueError(f"a joining prompt is longer than the canvas's {c.prompt_len} prompt columns")
    # laid out as the canvas: left-padded to its prompt width
    decoder.add_rows(Canvas.from_prompts(prompts, c.gen_length, c.mask_id, decoder.model.config.pad_token_id,
                                         c.length, c.x.device, min_prompt_len=c.prompt_len))
    report.add([row for row, _ in new], decoder.canvas)


def _write_back(canvas: Canvas, small: Canvas, rows: list[int]) -> None:
    """Copy the rows of `small` (a cut-down or grown canvas) back to rows `rows` of `canvas`, those
    of them that `canvas` has (rows that joined late reach their listener through the streamer only)."""
    if small is not canvas:
        pairs = [(i, r) for i, r in enumerate(rows) if r < canvas.batch_size]
        if pairs:
            canvas.x[[r for _, r in pairs]] = small.x[[i for i, _ in pairs]]


def _without_rows(decoder: BlockDecoder, keep: list[int], block: int, report: CanvasReporter) -> BlockDecoder:
    """The decoder of rows `keep` of `decoder`'s canvas: at a block start a fresh decoder (it rebuilds
    what the old one would), inside a block the old one cut down to those rows (`keep_rows`)."""
    c = decoder.canvas
    idx = torch.tensor(keep, dtype=torch.long, device=c.x.device)
    small = Canvas(c.x[idx].clone(), c.attention_mask[idx].clone(), c.prompt_len, c.gen_length, c.mask_id)
    if block != decoder.block:
        offset, late = decoder.offset[idx], decoder.late
        decoder = BlockDecoder(decoder.model, small, decoder.cfg, decoder.generator)
        decoder.offset, decoder.late = offset, late
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
    cache.block = Block(cache.block.starts[idx], cache.block.length, cache.block.uniform)
    decoder.canvas = cache.canvas = canvas
    decoder.offset = decoder.offset[idx]
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
    joins: bool = False,
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
        # only a loop that takes rows in (`joins`) reserves prompt columns for them
        width = stream.prompt_width if stream is not None and joins else 0
        canvas = Canvas.from_prompts(batch, cfg.gen_length, caps.mask_id, pad_id, limit, device, width)
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
        desc=f"decode[{cfg.policy},{cfg.cache}]", progress=progress, streamer=streamer, joins=joinable(cfg))
    return GenerationResult(token_ids, texts, meter, cfg, raw)
