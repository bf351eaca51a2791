"""Fast-dLLM v2's block-diffusion sampler: blocks, sub-blocks, an exact K/V cache of finished blocks.

The reference, read from the Hub checkpoint's `modeling.py` (`Fast_dLLM_QwenForCausalLM.generate`, which
NVlabs/Fast-dLLM's `v2/run_chatbot.py` calls) and `v2/generation_functions.py` (`batch_sample`, which
`v2/eval.py` calls), for one prompt of P tokens, blocks of `block_size` L, sub-blocks of
`small_block_size` S:

1. **Prefill.** When P > L, one forward over the prompt's whole blocks (columns 0 .. L·⌊P/L⌋, under
   the block-causal mask) stores their K/V in the cache (`past_key_values`); when P is a multiple of
   L, the argmax of its last logit (an AR next-token prediction) is appended as the next token.
2. **A block** is the canvas padded with masks to the next multiple of L (so the prompt's partial
   block is the first block, and a block after a finished one starts with that block's AR token).
   Its sub-blocks are decoded left to right; a sub-block is decoded until it has no masked cell,
   each step being one forward of the whole block against the cache, logits shifted by one inside
   the fed block (cell j reads the output at j − 1, cell 0 its own), candidates by
   `sample_with_top_p` (argmax and its softmax probability at temperature 0, else a draw from the
   top-p-filtered softmax(logits / T) with its renormalised probability), and the commit rule:
   every masked cell of the sub-block whose probability is **above** `threshold`, and always the
   most probable one.
3. **A finished block** is fed once more (`update_past_key_values=True`): its K/V join the cache, and
   the argmax of its last logit (greedy whatever the temperature) is appended: the next block's
   first cell.
4. **Stop**: before every step, when the first `stop_token` (151645, config.json's EOS) in the
   generated cells has no masked cell before it; after `max_new_tokens // L` blocks otherwise. The
   answer is cut after the first stop token.
5. **`use_block_cache`** (off by default): within a block, a step whose sub-block's first cell is
   still masked (or the block's first step) runs the whole block and keeps its K/V as a "block
   cache"; the other steps feed the sub-block alone, overwrite its K/V in that block cache and
   attend to the prefix cache plus the whole block cache (the rest of the block's K/V stale: an
   approximation). `sub_block_cache=True` here.

What is the same here, step for step: all of the above, on the exact cache (the finished blocks' K/V
are final, as the mask is block-causal), with the cost meter charging every forward the keys it
attends to (cache included).

What is ours, and why:
- `gen_length` G replaces `max_new_tokens`: the blocks run until the G answer cells (columns P ..
  P + G) hold tokens (or the stop rule fires); cells decoded beyond them are dropped. The reference's
  `max_new_tokens` M returns M − (P mod L) + 1 tokens (its last block's AR token included): the same
  ids and forwards as G = M − (P mod L) + 1 here.
- A prompt of exactly L tokens is prefilled like any prompt of whole blocks: the reference's test is
  P > L, so at P = L it caches nothing and decodes the first block at positions 0..L−1 without the
  prompt (a test shows it).
- The reference's denoising forwards build the block-causal mask with the forward's default block size
  32, not the sampler's; for block sizes that divide 32 (its default 32 included) that is the same
  mask; here the sampler's block size is used throughout.
- A step that would commit only the mask token (the model may propose it; a committed mask leaves the
  cell masked) commits the most confident masked cell's best other token instead: at temperature 0
  the reference would repeat that step forever.
- `batch_sample` (the eval path) stops only at a block's end after a committed stop token; `generate`
  (used here) stops mid-block: the ids up to the first stop token are the same, with fewer forwards.
- `factor` swaps in Fast-dLLM's factor rule (`decoding.policies.select_factor`) for the threshold,
  still at least one cell a step (issue #39); rows are decoded one at a time; one seeded generator.
- `cache="none"` recomputes the window (prompt and blocks, block-causal) at every forward instead of
  using the cache, for comparison. On a bidirectional model (LLaDA, Dream) the same block, sub-block,
  threshold and stop rules run over the whole canvas with full attention and no cache, without AR
  tokens (those models read cell i at i): `cache="auto"` resolves to "none" there.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import Any, Callable, Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.tokenizer import Tokenizer
from .capabilities import unwrapped
from .llada2 import (CACHES, BlockKVCache, check_cache, check_counts, check_factor, choose_cells, run_block_sampler,
                     sample_candidates)
from .meter import CostMeter, MeteredModel
from .runner import GenerationResult, eos_ids
from .streamer import RowReporter, Streamer

__all__ = ["FastDLLMv2DecodeConfig", "SubBlockKVCache", "fastdllm_v2_generate", "fastdllm_v2_decode_row", "CACHES"]

METHOD = "fast-dllm-v2"


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class FastDLLMv2DecodeConfig:
    """Options of Fast-dLLM v2's `generate`: block 32, sub-blocks of 8, threshold 0.9 (the model card's,
    `v2/eval.py`'s and `v2/run_chatbot.py`'s value; the function's own default is 1, one cell a step),
    top-p 0.95 when sampling, the sub-block cache off. `gen_length`, `factor`, `cache`, `seed` and
    `batch_size` are ours."""

    gen_length: int = 128
    block_length: int = 32
    small_block_size: int = 8
    threshold: float = 0.9
    factor: float | None = None
    temperature: float = 0.0
    top_p: float = 0.95
    sub_block_cache: bool = False
    cache: str = "auto"
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_counts(self, ("gen_length", "block_length", "small_block_size", "batch_size"))
        if self.block_length % self.small_block_size:
            raise ValueError(f"small_block_size ({self.small_block_size}) must divide block_length "
                             f"({self.block_length}): a block is decoded as whole sub-blocks")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not _real(self.threshold) or not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if not _real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_factor(self)
        if not isinstance(self.sub_block_cache, bool):
            raise ValueError(f"sub_block_cache must be true or false, got {self.sub_block_cache!r}")
        check_cache(self.cache, METHOD)
        if self.sub_block_cache and self.cache == "none":
            raise ValueError("sub_block_cache sits on the cache of finished blocks: use cache block or auto with it")

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, **asdict(self)}

    def replace(self, **kw: Any) -> "FastDLLMv2DecodeConfig":
        return replace(self, **kw)


class SubBlockKVCache:
    """The reference's `use_block_cache` (a `layers.KVCacheHook`) over the exact cache of finished blocks.

    `full()` before a forward of the whole current block: its K/V are kept as the block cache.
    `partial(offset)` before a forward of one sub-block starting `offset` columns into the block: its
    fresh K/V overwrite those columns of the block cache, and it attends to every column of it (the
    others as of the last full forward: stale, as in the reference). Both attend to the finished
    blocks through `blocks` (nothing is committed there)."""

    def __init__(self, blocks: BlockKVCache):
        self.blocks = blocks
        self.k: list[Tensor | None] = [None] * len(blocks.k)
        self.v: list[Tensor | None] = [None] * len(blocks.v)
        self._offset: int | None = None

    @property
    def last_n_keys(self) -> int:
        return self.blocks.last_n_keys

    def full(self) -> None:
        self._offset = None

    def partial(self, offset: int) -> None:
        self._offset = offset

    def layer(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self._offset is None:
            self.k[index], self.v[index] = k, v
        else:
            end = self._offset + k.shape[2]
            self.k[index][:, :, self._offset:end] = k
            self.v[index][:, :, self._offset:end] = v
            k, v = self.k[index], self.v[index]
        return self.blocks.layer(index, k, v)


def _shifted_rows(a: int, z: int, device: torch.device) -> Tensor:
    """Which rows of a fed slice's raw outputs give cells a..z-1 of it: cell j reads j − 1, cell 0 itself
    (the reference's `torch.cat([logits[:, :1], logits[:, :-1]], 1)` over the fed slice)."""
    return (torch.arange(a, z, device=device) - 1).clamp(min=0)


def _block_causal(q_pos: Tensor, k_pos: Tensor, block_length: int) -> Tensor:
    from ..models.llada2 import block_causal_mask

    return block_causal_mask(q_pos, k_pos, block_length)


class _Row:
    """One prompt's decode (the module docstring's loop). `mode`: "block" (exact cache), "none"
    (recompute the window) or "bidirectional" (a LLaDA / Dream model: full attention, no AR tokens)."""

    def __init__(self, model: MeteredModel, prompt: Sequence[int], cfg: FastDLLMv2DecodeConfig, *, mode: str,
                 stop_ids: Collection[int], mask_id: int, sample: Callable[[Tensor], tuple[Tensor, Tensor]],
                 device: torch.device, report: RowReporter | None):
        self.model, self.cfg, self.mode, self.mask_id = model, cfg, mode, mask_id
        self.sample, self.choose, self.report = sample, choose_cells(cfg), report
        self.P, self.L, self.G = len(prompt), cfg.block_length, cfg.gen_length
        self.n_blocks = -(-(self.P + self.G) // self.L)
        self.x = torch.full((self.n_blocks * self.L,), mask_id, dtype=torch.long, device=device)
        self.x[:self.P] = torch.tensor(list(prompt), dtype=torch.long, device=device)
        self.pos = torch.arange(len(self.x), device=device)
        self.stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.kv = BlockKVCache(model.config.n_layers) if mode == "block" else None
        self.sub = SubBlockKVCache(self.kv) if cfg.sub_block_cache and self.kv is not None else None
        self.block_cached = False  # the sub-block cache holds the current block

    def run(self) -> list[int]:
        """The answer's G ids, the first stop id repeated after itself."""
        if not self._prefill():
            for b in range(self.P // self.L, self.n_blocks):
                if self._decode_block(b) or self._finish_block(b):
                    break
        out = self.x[self.P:self.P + self.G].clone()
        at = torch.isin(out, self.stops).nonzero()
        if len(at):
            out[int(at[0]) + 1:] = out[int(at[0])]
        return out.tolist()

    # ------------------------------------------------------------ stopping and reporting

    def _after_commit(self) -> bool:
        """Report the new tokens; whether decoding is over: the answer cells all hold tokens, its first
        stop id has no masked cell before it, or the streamer asks to stop."""
        gen = self.x[self.P:self.P + self.G]
        if self.report is not None and self.report.tick(gen):
            return True
        masked = gen == self.mask_id
        if not bool(masked.any()):
            return True
        hits = torch.isin(gen, self.stops).nonzero()
        return bool(len(hits)) and not bool(masked[:int(hits[0])].any())

    # ------------------------------------------------------------ forwards

    def _raw(self, start: int, end: int, commit: int = 0, kv: Any = None) -> Tensor:
        """Raw outputs (end − start, V) of columns start..end (output i predicts token i + 1). "block":
        fed alone against the cache (`commit` of them stored), "none": the window 0..end recomputed."""
        if self.mode == "none":
            pos = self.pos[:end]
            out = self.model(self.x[None, :end], positions=pos, attention_mask=_block_causal(pos, pos, self.L),
                             shift=False)
            return out.logits[0, start:end]
        pos = self.pos[start:end]
        one_block = start // self.L == (end - 1) // self.L  # it sees every cached key and every fed one
        mask = None if one_block else _block_causal(pos, self.pos[:end], self.L)  # the prefill, from column 0
        self.kv.commit(commit)
        out = self.model(self.x[None, start:end], positions=pos, attention_mask=mask,
                         kv_cache=self.kv if kv is None else kv, shift=False)
        return out.logits[0]

    def _prefill(self) -> bool:
        """Cache the prompt's whole blocks; when the prompt ends on a block boundary, its AR token opens
        the first block. Whether decoding is already over."""
        P, L = self.P, self.L
        if self.mode == "bidirectional" or P < L or (self.mode == "none" and P % L):
            return False
        n = P // L * L
        raw = self._raw(0, n, commit=n)
        if P % L:
            return False
        self.x[P] = raw[-1].argmax()
        return self._after_commit()

    def _finish_block(self, b: int) -> bool:
        """Store the finished block's K/V and write its AR token into the next block's first cell."""
        s, e = b * self.L, (b + 1) * self.L
        if self.mode == "bidirectional" or e >= len(self.x):
            return False
        self.x[e] = self._raw(s, e, commit=self.L)[-1].argmax()
        return self._after_commit()

    def _logits(self, s: int, a: int, z: int) -> Tensor:
        """The logits (z − a, V) of cells a..z-1 of the block starting at column s."""
        if self.mode == "bidirectional":
            return self.model(self.x[None], positions=self.pos).logits[0, s + a:s + z]
        if self.sub is None:
            return self._raw(s, s + self.L)[_shifted_rows(a, z, self.x.device)]
        if not self.block_cached or bool(self.x[s + a] == self.mask_id):
            self.sub.full()
            self.block_cached = True
            return self._raw(s, s + self.L, kv=self.sub)[_shifted_rows(a, z, self.x.device)]
        self.sub.partial(a)
        return self._raw(s + a, s + z, kv=self.sub)[_shifted_rows(0, z - a, self.x.device)]

    # ------------------------------------------------------------ steps

    def _decode_block(self, b: int) -> bool:
        """Decode block b's sub-blocks left to right, each until it has no masked cell; whether decoding
        is over."""
        s, S = b * self.L, self.cfg.small_block_size
        self.block_cached = False
        for a in range(0, self.L, S):
            while bool((self.x[s + a:s + a + S] == self.mask_id).any()):
                if self._step(s, a, a + S):
                    return True
        return False

    def _step(self, s: int, a: int, z: int) -> bool:
        """One forward and commit in the sub-block of cells a..z-1 of the block at column s."""
        logits = self._logits(s, a, z)
        tokens, probs = self.sample(logits)
        cells = self.x[s + a:s + z]
        active = cells == self.mask_id
        conf = torch.where(active, probs.float(), torch.tensor(-torch.inf, device=probs.device))
        chosen = self.choose(conf, active, 1)
        if not bool((tokens[chosen] != self.mask_id).any()):  # only the mask token: no progress
            best = int(conf.argmax())
            tokens = tokens.clone()
            tokens[best] = logits[best].float().index_fill(0, torch.tensor([self.mask_id], device=logits.device),
                                                           -torch.inf).argmax()
        self.x[s + a:s + z] = torch.where(chosen, tokens, cells)
        return self._after_commit()


def _sampler(cfg: FastDLLMv2DecodeConfig, generator: torch.Generator) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """The reference's `sample_with_top_p`: argmax and its softmax probability at temperature 0, else a
    draw from the top-p-filtered softmax(logits / T) and the drawn token's renormalised probability."""
    if cfg.temperature == 0:
        def greedy(logits: Tensor) -> tuple[Tensor, Tensor]:
            logits = logits.float()
            tok = logits.argmax(-1)
            return tok, F.softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1)

        return greedy
    sampling = SimpleNamespace(temperature=cfg.temperature, top_k=None, top_p=cfg.top_p)
    return lambda logits: sample_candidates(logits, sampling, generator)


def fastdllm_v2_decode_row(model: MeteredModel, prompt: Sequence[int], cfg: FastDLLMv2DecodeConfig, *,
                           stop_ids: Collection[int], mask_id: int, generator: torch.Generator,
                           device: torch.device, bidirectional: bool = False,
                           report: RowReporter | None = None) -> list[int]:
    """Decode one prompt (cfg.cache already resolved to "block" or "none"); its `gen_length` ids."""
    mode = "bidirectional" if bidirectional else cfg.cache
    return _Row(model, prompt, cfg, mode=mode, stop_ids=stop_ids, mask_id=mask_id, sample=_sampler(cfg, generator),
                device=device, report=report).run()


@torch.inference_mode()
def fastdllm_v2_generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str],
                         cfg: FastDLLMv2DecodeConfig, progress: bool = False, meter: CostMeter | None = None,
                         streamer: Streamer | None = None) -> GenerationResult:
    """Decode `prompts` one at a time with Fast-dLLM v2's rules (see the module docstring). Answers end at
    the model's stop id. Another block-causal family (LLaDA2, SDAR: logits not shifted, no AR token)
    is refused; a bidirectional model (LLaDA, Dream) runs the same rules without a cache."""
    from ..models.llada2 import check_block_causal_method, model_block_family

    family = model_block_family(unwrapped(model))
    if family is not None:
        check_block_causal_method(METHOD, f"the model ({type(unwrapped(model)).__name__})", family)
    elif cfg.sub_block_cache:
        raise ValueError(f"sub_block_cache needs the cache of finished blocks, which only a block-causal Fast-dLLM "
                         f"v2 model has; {type(unwrapped(model)).__name__} attends bidirectionally")
    stops = eos_ids(model)
    if not stops:
        raise ValueError(f"method {METHOD!r} needs a stop id: the model's config names no eos_token_id")
    mask_id = model.config.mask_token_id

    def row(metered: MeteredModel, p: Sequence[int], cfg: FastDLLMv2DecodeConfig, generator: torch.Generator,
            device: torch.device, bidirectional: bool, report: RowReporter | None) -> list[int]:
        return fastdllm_v2_decode_row(metered, p, cfg, stop_ids=stops, mask_id=mask_id, generator=generator,
                                      device=device, bidirectional=bidirectional, report=report)

    return run_block_sampler(model, tokenizer, prompts, cfg, row, method=METHOD,
                             needs="Fast-dLLM v2, model_type 'Fast_dLLM_Qwen'", eos=tuple(sorted(stops)),
                             progress=progress, meter=meter, streamer=streamer)
