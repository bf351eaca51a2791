"""LLaDA2's block-diffusion sampler, with an exact K/V cache of finished blocks.

The published loop (`LLaDA2MoeModelLM.generate` in `modeling_llada2_moe.py`; the `dllm`
library's `pipelines/llada2/sampler.py` mirrors it), step for step:

- the canvas is the prompt followed by masks, rounded up to whole blocks of
  `block_length` counted from column 0 (the prompt's last, partial block is decoded as
  the first block; what lies beyond prompt + gen_length is decoded and dropped);
- `steps` = min(steps, gen_length // minimal_topk) steps per block, and an even transfer
  schedule over the block (`block_length // steps` per step, the first `block_length % steps`
  steps one more);
- each step: candidate = argmax of the logits with its softmax probability as confidence
  (temperature 0 and no top-k / top-p), or a draw from softmax(logits / T) after top-k and
  top-p filtering with the drawn token's probability; every masked cell whose confidence is
  **above** `threshold` is committed when there are at least as many as the schedule asks,
  otherwise the schedule's number of most confident masked cells; a block stops when it has
  no masked cell left (or after `steps` steps);
- after a block, decoding stops if an EOS appears in the generated columns so far; with
  `eos_early_stop`, also mid-block as soon as a committed EOS has no masked cell before it;
- the answer is cut after its first EOS.

What diffspec adds: the attention is block-causal (a block sees itself and the blocks
before it), so a finished block's keys and values never change. The reference recomputes
the whole window at every step; here (`cache="block"`, the default) each block's first
forward feeds the finished-but-uncached columns (the prompt's whole blocks, or the previous
block) together with the current block, with the block-causal mask, and stores the finished
columns' K/V in `BlockKVCache`; every other step feeds the current block only and attends
to the cache. The logits are those of the full recompute (equal up to float rounding;
`cache="none"` runs the reference's recompute and is what the tests compare against).

Also ours: rows are decoded one at a time (the reference takes one prompt; prompts of
different lengths put their block boundaries in different columns); the random draws come
from one seeded `torch.Generator` (the reference uses torch's global RNG), so sampled runs
are reproducible but not the reference's stream; EOS is looked for in the generated
columns only (the reference's mid-block check also scans the prompt); cells left after the
first EOS are filled with EOS in `raw_ids` (the reference returns the answer up to it).
As in the reference, the mask token itself may be proposed (a cell that gets it stays masked).

On a bidirectional model (LLaDA, Dream), which was never trained with the block-causal mask, the
same rules run over the whole canvas with full attention (later blocks' masks included, as those
models decode), without a cache.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Collection, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.tokenizer import Tokenizer
from .capabilities import capabilities, unwrapped
from .meter import CostMeter, MeteredModel, meter_primary
from .runner import GenerationResult, max_positions, model_device, run_prompts
from .streamer import RowReporter, Streamer

__all__ = ["LLaDA2DecodeConfig", "BlockKVCache", "llada2_generate", "llada2_decode_row", "even_schedule",
           "sample_candidates", "threshold_or_topk", "factor_or_topk", "choose_cells", "check_factor",
           "decode_block_causal_row", "run_block_sampler", "BlockForward", "BlockSteps", "schedule_steps", "check_counts",
           "check_sampling", "check_cache", "CACHES"]

CACHES = ("auto", "block", "none")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_counts(cfg: Any, names: Sequence[str]) -> None:
    """Each of `names` an integer >= 1."""
    for name in names:
        v = getattr(cfg, name)
        if not _int(v) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def check_sampling(cfg: Any) -> None:
    """The options LLaDA2's and SDAR's samplers share: threshold, temperature, top_k, top_p."""
    if not _real(cfg.threshold) or not 0 <= cfg.threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {cfg.threshold!r}")
    if not _real(cfg.temperature) or cfg.temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {cfg.temperature!r}")
    if cfg.top_k is not None and (not _int(cfg.top_k) or cfg.top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {cfg.top_k!r}")
    if cfg.top_p is not None and (not _real(cfg.top_p) or not 0 < cfg.top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {cfg.top_p!r}")


@dataclass(frozen=True)
class LLaDA2DecodeConfig:
    """Options of LLaDA2's `generate`, with its defaults (block 32, 32 steps, threshold 0.95,
    minimal_topk 1); `gen_length` and `batch_size` are ours, and `eos_early_stop` defaults to on
    (the model card's usage; the reference function's own default is off)."""

    gen_length: int = 128
    block_length: int = 32
    steps: int = 32
    threshold: float = 0.95
    factor: float | None = None  # ours: Fast-dLLM's factor rule instead of the threshold (issue #39)
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    minimal_topk: int = 1
    eos_early_stop: bool = True
    cache: str = "auto"  # block on a block-causal model (LLaDA2), none on a bidirectional one
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_counts(self, ("gen_length", "block_length", "steps", "minimal_topk", "batch_size"))
        if self.minimal_topk > self.gen_length:
            raise ValueError(f"minimal_topk ({self.minimal_topk}) exceeds gen_length ({self.gen_length}): "
                             "no step would be left per block")
        if not _int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        check_sampling(self)
        check_factor(self)
        if not isinstance(self.eos_early_stop, bool):
            raise ValueError(f"eos_early_stop must be true or false, got {self.eos_early_stop!r}")
        check_cache(self.cache, "llada2")

    @property
    def steps_per_block(self) -> int:
        return min(self.steps, self.gen_length // self.minimal_topk)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "llada2", **asdict(self)}

    def replace(self, **kw: Any) -> "LLaDA2DecodeConfig":
        return replace(self, **kw)


def even_schedule(block_length: int, steps: int) -> list[int]:
    """Cells to commit at each step: block_length // steps, the first block_length % steps one more."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def sample_candidates(logits: Tensor, cfg: LLaDA2DecodeConfig,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(token, its probability) per row of logits (N, V), as the reference's sampler: greedy when
    temperature is 0 and neither top-k nor top-p is set; otherwise logits / T (T > 0, T != 1),
    top-k, then top-p filtering, softmax and one draw."""
    logits = logits.float()
    if cfg.temperature == 0 and cfg.top_k is None and (cfg.top_p is None or cfg.top_p >= 1):
        tok = logits.argmax(-1)
        return tok, F.softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
    if cfg.temperature > 0 and cfg.temperature != 1:
        logits = logits / cfg.temperature
    if cfg.top_k is not None:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if cfg.top_p is not None and cfg.top_p < 1:
        srt, order = logits.sort(dim=-1, descending=True)
        drop = F.softmax(srt, dim=-1).cumsum(-1) > cfg.top_p
        drop[:, 1:] = drop[:, :-1].clone()  # keep the token that crosses p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -torch.inf)
    probs = F.softmax(logits, dim=-1)
    tok = torch.multinomial(probs, 1, generator=generator)
    return tok.squeeze(-1), probs.gather(-1, tok).squeeze(-1)


class BlockKVCache:
    """Exact K/V of finished blocks (a `layers.KVCacheHook`).

    Each forward feeds columns that come right after the stored ones; `commit(n)` before a
    forward says its first n fed columns are final (a finished block, or the prompt's whole
    blocks): `layer` stores their keys/values for good. Every layer attends to the stored
    keys followed by the fed ones; `last_n_keys` is that count, which the meter charges.
    """

    def __init__(self, n_layers: int):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.length = 0  # columns stored
        self._commit = 0
        self._last = 0

    @property
    def last_n_keys(self) -> int:
        return self._last

    def commit(self, n: int) -> None:
        self._commit = n

    def layer(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k[index] is not None:  # one stored copy, shared by every view of a batched forward
            k = torch.cat([self.k[index].expand(len(k), -1, -1, -1), k], dim=2)
            v = torch.cat([self.v[index].expand(len(v), -1, -1, -1), v], dim=2)
        if self._commit:  # the finished columns are the same in every view: keep the first
            keep = self.length + self._commit
            self.k[index], self.v[index] = k[:1, :, :keep], v[:1, :, :keep]
        self._last = k.shape[2]
        if index == len(self.k) - 1:  # the last layer: the forward's commit is done
            self.length += self._commit
            self._commit = 0
        return k, v


def _block_causal(q_pos: Tensor, k_pos: Tensor, block_length: int) -> Tensor:
    from ..models.llada2 import block_causal_mask

    return block_causal_mask(q_pos, k_pos, block_length)


def factor_or_topk(conf: Tensor, active: Tensor, k: int, factor: float) -> Tensor:
    """Fast-dLLM's factor rule on a block: the n most confident masked cells while (n + 1)(1 − c_n) <
    `factor` (`decoding.policies.select_factor`), and never fewer than the schedule's k, so a block
    still ends within its steps."""
    from .policies import select_factor

    return _at_least_topk(select_factor(conf[None], factor)[0], conf, active, k)


def choose_cells(cfg: Any) -> Callable[[Tensor, Tensor, int], Tensor]:
    """The commit rule of a block sampler's config: Fast-dLLM's factor rule when `cfg.factor` is
    set, else the threshold rule (every masked cell above `cfg.threshold`, else the top k)."""
    if cfg.factor is not None:
        return lambda conf, active, k: factor_or_topk(conf, active, k, cfg.factor)
    return lambda conf, active, k: threshold_or_topk(conf, active, k, cfg.threshold)


def check_cache(cache: Any, method: str) -> None:
    """The block samplers' `cache` option, named in the error with what each value means."""
    if cache not in CACHES:
        raise ValueError(f"method {method!r} takes cache {' / '.join(CACHES)} (block: the exact cache of finished "
                         f"blocks; none: recompute the window every step; auto: block when the model is "
                         f"block-causal); got {cache!r}")


def check_factor(cfg: Any) -> None:
    if cfg.factor is not None and (not _real(cfg.factor) or cfg.factor <= 0):
        raise ValueError(f"factor must be a finite number > 0 (or unset for the threshold rule), got {cfg.factor!r}")


def threshold_or_topk(conf: Tensor, active: Tensor, k: int, threshold: float) -> Tensor:
    """LLaDA2's (and SDAR's low_confidence_dynamic) rule: every masked cell above `threshold` when
    there are at least k of them, else the k most confident masked cells."""
    return _at_least_topk(conf > threshold, conf, active, k)


def _at_least_topk(chosen: Tensor, conf: Tensor, active: Tensor, k: int) -> Tensor:
    """`chosen` when it holds at least k cells, else the k most confident masked cells: the
    schedule's floor under every commit rule."""
    if int(chosen.sum()) >= k:
        return chosen
    chosen = torch.zeros_like(active)
    chosen[conf.topk(min(k, int(active.sum()))).indices] = True
    return chosen


class BlockForward:
    """The forwards of one row's current block, over the canvas `x`: what every step rule in a
    block-causal loop calls, so the exact cache, the reference's recompute and the bidirectional
    models' full canvas are handled once. `views` (n, L) scores n versions of the block in one batched
    forward (PSD's nested drafts, DualDiffusion's leftward views) against the same finished columns;
    the cache stores those columns from the first forward of each block (one copy, shared by every
    view). Such a forward advances one sequence: the meter counts it once per prompt, FLOPs for every view. `model` may name another metered wrapper of the same network (a drafter's meter entry)."""

    def __init__(self, model: MeteredModel, x: Tensor, block_length: int, cache: bool, bidirectional: bool):
        self.model, self.x, self.L, self.bidirectional = model, x, block_length, bidirectional
        self.positions = torch.arange(len(x), device=x.device)
        self.kv = BlockKVCache(model.config.n_layers) if cache else None
        self.s = self.e = 0

    def start_block(self, s: int, e: int) -> None:
        self.s, self.e = s, e

    def __call__(self, views: Tensor | None = None, model: MeteredModel | None = None) -> Tensor:
        """Logits (n, L, V) of the block's cells for each view (default: the block as it is, n = 1)."""
        model = model or self.model
        s, e, x = self.s, self.e, self.x
        rows = x[None] if views is None else x[None].expand(len(views), -1).clone()
        if views is not None:
            rows[:, s:e] = views
        if self.bidirectional:
            return model(rows, positions=self.positions, sequences=1).logits[:, s:e]
        if self.kv is None:  # the reference: the whole window, block-causal
            pos = self.positions[:e]
            mask = _block_causal(pos, pos, self.L)[None]
            return model(rows[:, :e], positions=pos, attention_mask=mask, sequences=1).logits[:, -self.L:]
        start = self.kv.length  # < s only at a block's first step: finished columns to store
        pos = self.positions[start:e]
        mask = None if start == s else _block_causal(pos, self.positions[:e], self.L)
        self.kv.commit(s - start)
        out = model(rows[:, start:e], positions=pos, attention_mask=mask, kv_cache=self.kv, sequences=1)
        return out.logits[:, -self.L:]


# A block's step rule: given the forwards, the canvas, the block's columns [s, e) and the mask id, it
# commits cells step by step and yields each step's committed tokens (so the loop can stream them and
# stop at an EOS), returning when the block is done.
BlockSteps = Callable[[BlockForward, Tensor, int, int, int], Iterator[Tensor]]


def schedule_steps(schedule: Sequence[int], choose: Callable[[Tensor, Tensor, int], Tensor],
                   sample: Callable[[Tensor], tuple[Tensor, Tensor]]) -> BlockSteps:
    """The block samplers' own rule: each of at most len(schedule) steps is one forward, `sample`
    (candidates and their probabilities), `choose(conf, active, k)` (conf is -inf off the masked
    cells; k = schedule[step]) and the commit; the block ends when no cell is masked."""

    def run(forward: BlockForward, x: Tensor, s: int, e: int, mask_id: int) -> Iterator[Tensor]:
        for k in schedule:
            active = x[s:e] == mask_id
            if not active.any():
                return
            tokens, probs = sample(forward()[0])
            conf = torch.where(active, probs, torch.tensor(-torch.inf, device=x.device))
            chosen = choose(conf, active, k)
            x[s:e] = torch.where(chosen, tokens, x[s:e])
            yield tokens[chosen]

    return run


def decode_block_causal_row(model: MeteredModel, prompt: Sequence[int], *, block_length: int, gen_length: int,
                            schedule: Sequence[int], choose: Callable[[Tensor, Tensor, int], Tensor],
                            sample: Callable[[Tensor], tuple[Tensor, Tensor]], stop_ids: Collection[int],
                            early_stop: bool, cache: bool, mask_id: int, device: torch.device,
                            bidirectional: bool = False, report: RowReporter | None = None,
                            steps: BlockSteps | None = None) -> list[int]:
    """The block-diffusion loop shared by LLaDA2's and SDAR's samplers (and PSD / DualDiffusion
    within a block), for one prompt.

    Blocks of `block_length` columns from column 0; the prompt's last partial block is the first
    one decoded. Each block runs `steps` (default `schedule_steps(schedule, choose, sample)`, the
    samplers' rule). After a block, decoding stops if a stop id appears in the generated columns;
    with `early_stop`, also mid-block once a committed stop id has no masked cell before it.
    `cache`: the exact K/V cache of finished blocks (else the reference's full recompute).
    `bidirectional`: a model trained with full attention (LLaDA, Dream) sees the whole canvas, later
    blocks' masks included, as it does in its own samplers (no mask, no cache). `report` hears each
    step's commits (a cell past the first stop id becomes that id in the result). Returns the
    `gen_length` generated ids, stop id repeated after the first one."""
    P, L, G = len(prompt), block_length, gen_length
    n_blocks = -(-(P + G) // L)
    x = torch.full((n_blocks * L,), mask_id, dtype=torch.long, device=device)
    x[:P] = torch.tensor(list(prompt), dtype=torch.long, device=device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    forward = BlockForward(model, x, L, cache, bidirectional)
    steps = steps or schedule_steps(schedule, choose, sample)
    stopped = False
    for b in range(P // L, n_blocks):
        s, e = b * L, (b + 1) * L
        forward.start_block(s, e)
        for committed in steps(forward, x, s, e, mask_id):
            if report is not None and report.tick(x[P:P + G]):
                stopped = True
                break
            if early_stop and bool(torch.isin(committed, stops).any()):
                gen = x[P:e]
                first = int(torch.isin(gen, stops).nonzero()[0])
                if not bool((gen[:first] == mask_id).any()):
                    stopped = True
                    break
        if stopped or bool(torch.isin(x[P:e], stops).any()):
            break
    out_ids = x[P:P + G].clone()
    at = torch.isin(out_ids, stops).nonzero()
    if len(at):
        first = int(at[0])
        out_ids[first + 1:] = out_ids[first]
    return out_ids.tolist()


def llada2_decode_row(model: MeteredModel, prompt: Sequence[int], cfg: LLaDA2DecodeConfig, mask_id: int,
                      eos_id: int, generator: torch.Generator | None, device: torch.device,
                      bidirectional: bool = False, report: RowReporter | None = None) -> list[int]:
    """Decode one prompt with LLaDA2's rules; returns its `gen_length` generated ids."""
    return decode_block_causal_row(
        model, prompt, block_length=cfg.block_length, gen_length=cfg.gen_length,
        schedule=even_schedule(cfg.block_length, cfg.steps_per_block),
        choose=choose_cells(cfg), sample=lambda logits: sample_candidates(logits, cfg, generator), stop_ids=(eos_id,),
        early_stop=cfg.eos_early_stop, cache=cfg.cache == "block", mask_id=mask_id, device=device,
        bidirectional=bidirectional, report=report)


@torch.inference_mode()
def llada2_generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: LLaDA2DecodeConfig,
                    progress: bool = False, meter: CostMeter | None = None,
                    streamer: Streamer | None = None) -> GenerationResult:
    """Decode `prompts` one at a time (see the module docstring). A bidirectional model (LLaDA, Dream)
    runs the same rules over its whole canvas with full attention, as its own samplers do, and
    without a cache (`cache="auto"` resolves to "none" there, "block" is refused)."""
    mcfg = model.config

    def row(metered: MeteredModel, p: Sequence[int], cfg: LLaDA2DecodeConfig, generator: torch.Generator,
            device: torch.device, bidirectional: bool, report: RowReporter | None) -> list[int]:
        return llada2_decode_row(metered, p, cfg, mcfg.mask_token_id, mcfg.eos_token_id, generator, device,
                                 bidirectional=bidirectional, report=report)

    return run_block_sampler(model, tokenizer, prompts, cfg, row, method="llada2",
                             needs="LLaDA2, model_type 'llada2_moe'", eos=(mcfg.eos_token_id,), progress=progress,
                             meter=meter, streamer=streamer)


def run_block_sampler(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: Any,
                      row: Callable[..., list[int]], *, method: str, needs: str, eos: Sequence[int],
                      progress: bool, meter: CostMeter | None,
                      streamer: Streamer | None = None) -> GenerationResult:
    """What LLaDA2's and SDAR's samplers share around the row loop: `cfg.cache` "auto" resolved
    ("block" on a block-causal model, else "none"; "block" refused on a bidirectional one, whose
    `needs` names the models that take it), a metered model, one seeded generator, and the
    prompts decoded one at a time by `row(metered, prompt, cfg, generator, device, bidirectional,
    report)` (`report`: a `RowReporter` for `streamer`, or None)."""
    from ..models.llada2 import check_block_causal_method, model_block_family

    family = model_block_family(unwrapped(model))
    if family is not None:  # another block family's model (Fast-dLLM v2's AR tokens) would decode wrong, silently
        check_block_causal_method(method, f"the model ({type(unwrapped(model)).__name__})", family)
    block_causal = bool(getattr(model, "block_causal", False))
    if cfg.cache == "auto":
        cfg = cfg.replace(cache="block" if block_causal else "none")
    elif cfg.cache == "block" and not block_causal:
        raise ValueError(f"method {method!r} with cache 'block' needs a block-causal model ({needs}); "
                         f"{type(model).__name__} attends bidirectionally: use cache none or auto")
    meter, metered = meter_primary(model, meter)
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    mask_id = capabilities(model).mask_id

    def decode(batch: list[list[int]], stream: Streamer | None = None) -> list[list[int]]:
        return [row(metered, p, cfg, generator, device, not block_causal,
                    None if stream is None else RowReporter(stream, i, mask_id)) for i, p in enumerate(batch)]

    token_ids, texts, raw = run_prompts(model, tokenizer, prompts, decode, gen_length=cfg.gen_length,
                                        batch_size=cfg.batch_size, meter=meter, desc=f"decode[{method},{cfg.cache}]",
                                        progress=progress, eos=eos, limit=max_positions(model), streamer=streamer)
    return GenerationResult(token_ids, texts, meter, cfg, raw)
