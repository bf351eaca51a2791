"""DualDiffusion's parts: a diffusion drafter proposes, a full-forward verifier scores, a rule decides.

The split follows vLLM's proposer / scorer / rejection-sampler. The parts
work on the one shared `Canvas` and charge the one `CostMeter` (through
`MeteredModel`s named "drafter" and "verifier"):

- `DiffusionDrafter` commits tokens on the canvas with the block decoder and
  says which cells it drafted, at which of its steps, and (if asked) with
  which distribution;
- `FullForwardVerifier` runs the accurate model on one or several *views* of
  the drafted canvas in a single (batched) forward and returns logits;
- an acceptance rule (`speculative.rules`) turns drafts + verifier logits into a
  `Verdict`: cells to re-mask and cells to overwrite, applied by `apply_verdict`.

AR speculative decoding, DFlash and D²SD share one round of another shape
(`speculative.round`: a draft tree appended to a causal K/V cache, one target
forward, an acceptance walk). PSD's drafts come from the verifier's own
ranking and are checked in place on the canvas (`psd.py`). All of them charge
the same cost meter.

Logits are aligned LLaDA-style everywhere: logit i predicts token i. Nothing
is shifted (the public DualDiffusion loop was off by one there).
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import Tensor

from ..decoding.config import DecodeConfig
from ..decoding.diffusion import BlockDecoder
from ..decoding.meter import MeteredModel
from ..decoding.state import Canvas

VIEWS = ("drafted", "masked", "stepwise", "leftward")


@dataclass
class Draft:
    """What the drafter proposed in one round, canvas-wide.

    cells: bool (B, T), the cells committed this round (their drafted token is
    in `canvas.x`). step: long (B, T), the drafter step (0-based, within the
    round) that committed each cell, -1 elsewhere. logprobs: the drafter's
    log-distribution at commit time, one row per drafted cell in
    `cells.nonzero()` order (row-major), kept only when a rule needs it.
    """

    cells: Tensor
    step: Tensor
    logprobs: Tensor | None = None
    steps_run: int = 0

    def logprobs_at(self, cells: Tensor) -> Tensor:
        """Drafter log-probs of `cells` (a subset of `self.cells`), in `cells.nonzero()` order."""
        if self.logprobs is None:
            raise ValueError("the drafter did not keep its distributions; build it with keep_logprobs=True")
        slot = torch.cumsum(self.cells.flatten().long(), 0) - 1  # row of each drafted cell in `logprobs`
        return self.logprobs[slot[cells.flatten()]]


@dataclass
class Verdict:
    """A rule's decision: re-mask `remask`, write `tokens` into `commit` (disjoint bool (B, L) masks)."""

    remask: Tensor
    commit: Tensor
    tokens: Tensor

    @classmethod
    def nothing(cls, like: Tensor) -> "Verdict":
        no = torch.zeros_like(like, dtype=torch.bool)
        return cls(no, no.clone(), like.clone())


def apply_verdict(canvas: Canvas, verdict: Verdict) -> Tensor:
    """Apply a verdict to the generation region in place; return the bool (B, L) cells that changed."""
    P = canvas.prompt_len
    gen = canvas.x[:, P:]
    new = torch.where(verdict.commit, verdict.tokens, gen)
    new = torch.where(verdict.remask, torch.full_like(gen, canvas.mask_id), new)
    changed = new != gen
    canvas.x[:, P:] = new
    return changed


class DiffusionDrafter:
    """Any masked-diffusion decoder (cache × policy) used as a drafter, a few steps at a time.

    Wraps a `BlockDecoder` on the shared canvas, so the drafter's cache lives
    across rounds and `rollback` truncates it where the canvas was changed.
    Run round after round with nobody changing the canvas, it is exactly the
    decoder alone.
    """

    def __init__(self, model: MeteredModel, canvas: Canvas, cfg: DecodeConfig, generator: torch.Generator | None,
                 keep_logprobs: bool = False):
        self.decoder = BlockDecoder(model, canvas, cfg, generator)
        self.canvas, self.keep_logprobs = canvas, keep_logprobs

    def draft(self, n_steps: int) -> Draft:
        c = self.canvas
        cells = torch.zeros_like(c.x, dtype=torch.bool)
        step = torch.full_like(c.x, -1)
        logps: list[Tensor] = []
        ran = 0
        for i in range(n_steps):
            out = self.decoder.step()
            if out is None:
                break
            ran += 1
            cells[:, out.s : out.e] |= out.chosen
            step[:, out.s : out.e][out.chosen] = i
            if self.keep_logprobs:
                # one block per step, so ordering by (step, row, column) would not be
                # row-major overall; keep (flat index, log-probs) and sort at the end
                flat = (torch.arange(c.batch_size, device=c.x.device)[:, None] * c.length
                        + torch.arange(out.s, out.e, device=c.x.device)[None, :])[out.chosen]
                logps.append((flat, F.log_softmax(out.logits[out.chosen].float(), dim=-1)))
        logprobs = None
        if self.keep_logprobs:
            V = self.decoder.model.config.embedding_size
            if logps:
                flat = torch.cat([f for f, _ in logps])
                lp = torch.cat([p for _, p in logps])
                logprobs = lp[flat.argsort()]
            else:
                logprobs = torch.empty(0, V, device=c.x.device)
        return Draft(cells, step, logprobs, ran)

    def rollback(self, start: Tensor) -> None:
        self.decoder.rollback(start)


class FullForwardVerifier:
    """The accurate model, full bidirectional forwards, no cache.

    `score(canvas, hide)` runs one forward over K views of the canvas at once
    (batched: one NFE that advances B sequences, with K·B rows of FLOPs and
    tokens, so a batched verification counts as one forward per prompt) where view k shows `canvas.x`
    with the cells of `hide[k]` masked, and returns the logits of the
    generation region (K, B, L, V) with the mask token at -inf (the verifier
    never proposes a mask).
    """

    def __init__(self, model: MeteredModel):
        self.model = model

    def score(self, canvas: Canvas, hide: Tensor) -> Tensor:
        K, (B, T) = hide.shape[0], canvas.x.shape
        x = torch.where(hide, canvas.mask_id, canvas.x.expand(K, B, T)).reshape(K * B, T)
        att = canvas.attention_mask.repeat(K, 1)
        logits = self.model(x, attention_mask=att, sequences=B).logits[:, canvas.prompt_len :]
        logits = logits.index_fill(-1, torch.tensor([canvas.mask_id], device=logits.device), -torch.inf)
        return logits.reshape(K, B, canvas.gen_length, -1)


def verifier_views(view: str, drafted: Tensor, step: Tensor, with_plain: bool) -> tuple[Tensor, Tensor]:
    """Which cells each view hides, and which view scores each cell.

    drafted: bool (B, T) drafts still under review; step: their drafter step.
    - "drafted": one view, the drafted canvas as is (the paper's loop);
    - "masked": one view hiding every draft, so each is scored as a masked
      prediction given what was accepted before this round;
    - "stepwise": view j hides the drafts of steps >= j, so a draft of step j
      is scored on exactly the canvas the drafter saw when it committed it (a
      verifier identical to the drafter then accepts everything);
    - "leftward" (beyond the paper, issue #23): view j hides a row's j-th
      draft (left to right) and every draft after it, so each draft is scored
      with the drafts to its left filled, as AR speculative decoding checks a
      draft; it catches drafts committed together that do not fit each other
      (a token repeated in two neighbouring cells), which the other views
      score from the same context the drafter used.
    `with_plain` adds the unhidden canvas as a last view (for rules that read
    the verifier at masked cells). Returns hide (K, B, T) and pick (B, T), the
    view whose logits a cell reads (undrafted cells read the plain view, or
    the last view when there is none).
    """
    if view not in VIEWS:
        raise ValueError(f"unknown verifier view {view!r}; choose one of {', '.join(VIEWS)}")
    none = torch.zeros_like(drafted)
    if view == "drafted":
        return none[None], torch.zeros_like(step)
    if view == "masked":
        hides = [drafted]
        pick = torch.zeros_like(step)
    elif view == "leftward":
        rank = drafted.long().cumsum(-1) - 1  # each draft's place among its row's drafts, left to right
        hides = [drafted & (rank >= j) for j in range(max(int(drafted.sum(-1).max()), 1))]
        pick = torch.where(drafted, rank, torch.zeros_like(rank))
    else:
        steps = sorted(set(step[drafted].tolist())) or [0]
        hides = [drafted & (step >= j) for j in steps]
        pick = torch.zeros_like(step)
        for k, j in enumerate(steps):
            pick[drafted & (step == j)] = k
    if with_plain:
        hides.append(none)
    last = len(hides) - 1
    pick = torch.where(drafted, pick, torch.full_like(pick, last))
    return torch.stack(hides), pick
