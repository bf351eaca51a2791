"""DualDiffusion: a cheap drafter runs a few steps, a full verifier checks, a rule decides.

The loop on one canvas (`dual_decode_canvas`), per iteration:

1. draft: the drafter (any `DecodeConfig` cache × policy, on the verifier's
   own model or on a smaller MDM sharing its tokenizer) runs
   `num_drafter_steps` steps of its usual loop, each on the first block that
   still has a mask in some row;
2. verify: the verifier runs up to `num_verifier_steps` full bidirectional
   forwards (no cache) on the drafted canvas, seen through `verifier_view`
   ("drafted": as is, the paper's loop; "masked" (default): this
   iteration's drafts hidden; "stepwise": each draft scored on the canvas it was drafted from;
   "leftward": each draft scored with the drafts to its left filled; several views go in one
   batched forward). After each forward the rule
   (`speculative.rules`) re-masks or overwrites cells drafted in this iteration.
   As in the reference loop, the verifier also decodes: with
   `verifier_unmask` = k (default 1 for the reference's rules, 0 for ours)
   each forward proposes, per row, its k most confident masked cells within
   block_length of the row's first mask, and the rule judges them like
   drafts (`unmask_confidence` instead commits the confident masked cells of
   the drafter's current block). A forward that changes nothing ends the
   verification early: another one on the same canvas would say the same;
3. roll back (`rollback="discard"`, the default): in each row, every cell
   this iteration filled (drafts, and the verifier's own tokens) after the
   row's first rejected cell (re-masked, or overwritten by the verifier) is
   masked again, as speculative decoding discards everything after its first
   rejection; an overwritten cell keeps the verifier's token (the correction
   token). The reference truncates its state at the first mask (its
   Fast-dLLM drafter decodes left to right); our drafters decode a block in
   any order, so a truncation at the first mask would throw away, every
   iteration, drafts nobody rejected, and a drafter that never fills that
   mask would stall; hence the cut at the first *rejection*.
   `rollback="keep"` leaves accepted cells after a rejection on the canvas;
4. progress guard (on by default; `progress_guard=False` gives the bare
   loop): a row that had drafts re-masked and ends the iteration with no more
   decoded cells than it started with gets its leftmost re-masked cell filled
   with the verifier's argmax (AR speculative decoding's correction token),
   so a drafter that keeps proposing a rejected token cannot stall the row;
5. the drafter's cache: in every row the verifier changed, the drafter's KV
   cache is truncated at the row's first cell that is masked or was changed
   (those cells and all after them are recomputed at its next forward), its
   block step counter restarts, and it resumes on the first block with masks
   (re-entering an earlier block starts that block afresh, with the cache's
   block-start refresh). Rows the verifier left unchanged keep their cache, so
   a verifier that accepts everything leaves the drafter exactly as if it ran
   alone.

With `adaptive_drafter_steps` (beyond the paper) the drafter's steps per
iteration double after an iteration with no rejection and halve after one
with a rejection, starting from `num_drafter_steps`.

Iterations repeat until nothing is masked or `max_iterations` ran (default
gen_length). The finish is deterministic: if masks remain, one more verifier
forward on the canvas (charged to the verifier) fills every remaining mask
with its argmax. The mask token is never proposed, by drafter or verifier.

Cost: the meter has separate entries "drafter" and "verifier" and
`meter.primary = "verifier"` (tokens-per-forward is per verifier forward;
`tokens_per_forward_all` per any forward). The paper's "steps" are drafter +
verifier forwards: the meter's `nfe` (per prompt: `nfe_per_sequence`; a
batched multi-view verification counts one forward per prompt). FLOPs and
wall clock sit alongside, so a cheap drafter step is not counted like a
verifier step. `SpecStats` (in `GenerationResult.stats`) counts drafts,
re-masks, replacements, cells discarded by the rollback, the verifier's own
commits, guard fills and finish fills.

Batching: rows share the drafter's block position and the iteration
boundaries (as in every block decoder here), so when the verifier rejects
drafts a row's output can depend on its batch companions; with nothing
rejected (e.g. `no_verification`) a batch decodes exactly as each row alone.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch

from ..decoding.config import DecodeConfig, WrapsDecodeConfig, check_field_types, full_steps
from ..decoding.capabilities import capabilities
from ..decoding.diffusion import run_batches
from ..decoding.runner import GenerationResult, model_device
from ..decoding.meter import CostMeter, MeteredModel
from ..decoding.state import Canvas
from ..decoding.streamer import CanvasReporter, Streamer
from ..models.tokenizer import Tokenizer
from .core import VIEWS, DiffusionDrafter, FullForwardVerifier, apply_verdict, verifier_views
from .rules import Rule, VerifyInput, make_rule, resolve_threshold, resolve_verifier_unmask

SELF = "self"
ROLLBACKS = ("discard", "keep")


# The drafter's cache × policy, named apart from the verifier's (which always runs full forwards).
DRAFTER_OPTIONS = ("drafter_cache", "drafter_policy", "drafter_threshold")
# The drafter's decoding when nothing else is said: Fast-dLLM's dual cache + threshold 0.9.
DRAFTER_PRESET: dict[str, Any] = {"cache": "dual", "policy": "threshold", "threshold": 0.9}


@dataclass(frozen=True)
class DualConfig(WrapsDecodeConfig):
    """Options of a DualDiffusion run, validated on construction.

    `decode` is the drafter's DecodeConfig; it also fixes the canvas
    (gen_length, block_length), the seed and the batch size. `drafter` names
    the drafter model: "self" (the verifier's model) or a checkpoint path.
    """

    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(**DRAFTER_PRESET))
    drafter: str = SELF
    rule: str = "exact_match"
    rule_threshold: float | None = None  # None: the rule's default (see speculative.rules)
    num_drafter_steps: int = 4
    num_verifier_steps: int = 1
    max_iterations: int | None = None  # None: gen_length
    # "masked" by default: with "drafted" (the paper's loop) an MDM trained only on masked cells
    # judges visible drafts with untrained logits, and accuracy collapsed to 0 % on the bundled model
    # (README, DualDiffusion). The paper's view stays available by name.
    verifier_view: str = "masked"
    # Masked cells the verifier decodes itself per forward (the reference's k); None: the rule's
    # default (1 for the reference's rules, 0 for ours; unmask_confidence / no_verification take none).
    verifier_unmask: int | None = None
    # "discard": cells filled after a row's first rejection are masked again; "keep": they stay.
    rollback: str = "discard"
    progress_guard: bool = True
    # Beyond the paper: double the drafter's steps after an iteration whose drafts were all
    # accepted (up to gen_length), halve them (down to 1) after one with a rejection. When the
    # drafter agrees with the verifier the verifier is consulted less often; when it does not,
    # less drafting is thrown away. num_drafter_steps is the starting length.
    adaptive_drafter_steps: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        if not isinstance(self.decode, DecodeConfig):
            raise ValueError(f"decode must be a DecodeConfig, got {type(self.decode).__name__}")
        if not str(self.drafter).strip():
            raise ValueError("drafter must be 'self' or a checkpoint directory")
        object.__setattr__(self, "rule_threshold", resolve_threshold(self.rule, self.rule_threshold))
        object.__setattr__(self, "verifier_unmask", resolve_verifier_unmask(self.rule, self.verifier_unmask))
        if self.rollback not in ROLLBACKS:
            raise ValueError(f"unknown rollback {self.rollback!r}; choose one of {', '.join(ROLLBACKS)} "
                             "(discard: re-mask what was filled after a row's first rejection; keep: leave it)")
        for name in ("num_drafter_steps", "num_verifier_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1 (or unset for gen_length), got {self.max_iterations}")
        if self.verifier_view not in VIEWS:
            raise ValueError(f"unknown verifier_view {self.verifier_view!r}; choose one of {', '.join(VIEWS)}")

    @property
    def iterations(self) -> int:
        return self.max_iterations or self.decode.gen_length

    def replace(self, **kw: Any) -> "DualConfig":
        if "rule" in kw:  # a new rule starts from its own defaults
            kw.setdefault("rule_threshold", None)
            kw.setdefault("verifier_unmask", None)
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decode"] = self.decode.to_dict()
        return d


@dataclass
class SpecStats:
    """What happened to the drafts, summed over rows (and batches)."""

    iterations: int = 0
    drafter_steps: int = 0
    drafted: int = 0  # cells the drafter committed (re-drafts of re-masked cells count again)
    remasked: int = 0
    replaced: int = 0  # drafted cells overwritten with the verifier's token
    discarded: int = 0  # drafted cells the verifier let stand, masked again by rollback="discard"
    verifier_unmasked: int = 0  # masked cells the verifier committed (and the rollback kept)
    guard_fills: int = 0
    finish_filled: int = 0  # masks left after max_iterations, filled by the final verifier forward

    def add(self, other: "SpecStats") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        rejected = self.remasked + self.replaced + self.discarded
        d["acceptance_rate"] = 1 - rejected / self.drafted if self.drafted else 0.0
        accepted = self.drafted - rejected
        d["accepted_per_iteration"] = accepted / self.iterations if self.iterations else 0.0
        return d


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's first True, or the row length when there is none."""
    T = mask.shape[1]
    cols = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, cols, torch.full_like(cols, T)).min(dim=1).values


def dual_decode_canvas(
    drafter: DiffusionDrafter,
    verifier: FullForwardVerifier,
    rule: Rule,
    canvas: Canvas,
    cfg: DualConfig,
    streamer: Streamer | None = None,
) -> SpecStats:
    """Fill every masked cell of `canvas` in place by draft / verify / roll-back iterations. A cell
    filled when an iteration begins is final (only that iteration's own cells are re-masked), so
    `streamer` hears them then."""
    stats = SpecStats()
    P, bl = canvas.prompt_len, cfg.decode.block_length
    n_steps = cfg.num_drafter_steps
    k = rule.verifier_unmask
    report = CanvasReporter(streamer, canvas) if streamer is not None else None
    while canvas.masked().any() and stats.iterations < cfg.iterations:
        if report is not None and report.tick():
            return stats
        stats.iterations += 1
        decoded_before = (~canvas.masked()).sum(1)
        draft = drafter.draft(n_steps)
        stats.drafter_steps += draft.steps_run
        stats.drafted += int(draft.cells.sum())
        if not rule.spec.needs_verifier:
            continue
        drafted_x = canvas.x.clone()
        rejected_before = stats.remasked + stats.replaced
        review = draft.cells.clone()  # drafts still under review
        remasked = torch.zeros_like(review)
        rejected = torch.zeros_like(review)  # drafts re-masked or overwritten by the verifier
        filled = draft.cells.clone()  # cells this iteration filled: drafts, then the verifier's commits
        unmasked = torch.zeros_like(review)  # masked cells the verifier committed
        last_logits = None
        for _ in range(cfg.num_verifier_steps):
            if not review.any() and not (rule.spec.unmasks or k):
                break
            hide, pick = verifier_views(cfg.verifier_view, review, draft.step, with_plain=rule.spec.unmasks)
            logits = verifier.score(canvas, hide)  # (K, B, L, V)
            logits = torch.gather(logits, 0, pick[None, :, P:, None].expand(1, -1, -1, logits.shape[-1]))[0]
            last_logits = logits
            gen_review = review[:, P:]
            verdict = rule(VerifyInput(
                tokens=canvas.x[:, P:],
                drafted=gen_review,
                verifier_logits=logits,
                drafter_logprobs=draft.logprobs_at(review) if rule.spec.needs_drafter_logprobs else None,
                may_unmask=_current_block_masks(canvas, bl) if rule.spec.unmasks else None,
                candidates=_verifier_candidates(canvas, logits, k, bl) if k else None,
            ))
            changed = apply_verdict(canvas, verdict)
            stats.remasked += int(verdict.remask.sum())
            stats.replaced += int((verdict.commit & gen_review & changed).sum())
            stats.verifier_unmasked += int((verdict.commit & ~gen_review).sum())
            unmasked[:, P:] |= verdict.commit & ~gen_review
            remasked[:, P:] |= verdict.remask
            rejected[:, P:] |= verdict.remask | (verdict.commit & gen_review & changed)
            filled[:, P:] |= verdict.commit
            review[:, P:] &= ~verdict.remask
            if cfg.rollback == "discard":
                dropped = _discard_after_first_rejection(canvas, filled, rejected)
                stats.discarded += int((dropped & draft.cells & ~rejected).sum())
                stats.verifier_unmasked -= int((dropped & unmasked).sum())
                review &= ~dropped
                filled &= ~dropped
                unmasked &= ~dropped
                changed = changed | dropped[:, P:]
            if not changed.any():
                break
        if cfg.adaptive_drafter_steps:
            n_rejected = stats.remasked + stats.replaced - rejected_before
            n_steps = max(1, n_steps // 2) if n_rejected else min(cfg.decode.gen_length, 2 * n_steps)
        if cfg.progress_guard and last_logits is not None:
            stats.guard_fills += _guard(canvas, remasked, decoded_before, last_logits)
        _roll_back_drafter(drafter, canvas, drafted_x)
    if canvas.masked().any():  # max_iterations ran out: one verifier forward fills the rest
        _fill_rest(verifier, canvas, stats)
    if report is not None:
        report()
    return stats


def _roll_back_drafter(drafter: DiffusionDrafter, canvas: Canvas, drafted_x: torch.Tensor) -> None:
    """The verifier changed some rows of the drafted canvas `drafted_x`: the drafter drops its
    cached state of each such row from the row's first changed or masked cell on."""
    changed_rows = (canvas.x != drafted_x).any(1)
    if changed_rows.any():
        start = _first_true(canvas.masked() | (canvas.x != drafted_x))
        start = torch.where(changed_rows, start, torch.full_like(start, canvas.length))
        drafter.rollback(start)


def _fill_rest(verifier: FullForwardVerifier, canvas: Canvas, stats: SpecStats) -> None:
    """One verifier forward fills every cell still masked with its argmax."""
    P = canvas.prompt_len
    logits = verifier.score(canvas, torch.zeros_like(canvas.x, dtype=torch.bool)[None])[0]
    gen = canvas.x[:, P:]
    left = gen == canvas.mask_id
    stats.finish_filled += int(left.sum())
    canvas.x[:, P:] = torch.where(left, logits.argmax(-1), gen)


def _discard_after_first_rejection(canvas: Canvas, filled: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """rollback="discard": in each row, mask again the filled cells after the first rejected one.

    filled, rejected: bool (B, T). The rejected cell itself stays as the verifier left it (masked,
    or holding its correction token). Returns the bool (B, T) cells masked here."""
    cut = _first_true(rejected)  # T where the row has no rejection
    cols = torch.arange(canvas.length, device=canvas.x.device)
    drop = filled & (cols[None, :] > cut[:, None]) & ~canvas.masked()
    canvas.x[drop] = canvas.mask_id
    return drop


def _verifier_candidates(canvas: Canvas, logits: torch.Tensor, k: int, block_length: int) -> torch.Tensor:
    """Bool (B, L): per row, the k masked cells the verifier is most confident about, within
    block_length of the row's first masked cell: one low-confidence step of LLaDA's sampler with k
    cells a step, as the reference's verifier runs it with the row's first mask as its block start.
    `logits` (B, L, V) are the ones the rule reads (a masked cell reads the view `verifier_views`
    gives undrafted cells: the drafted canvas, or this iteration's drafts hidden)."""
    gen = canvas.x[:, canvas.prompt_len :] == canvas.mask_id
    first = _first_true(gen)
    cols = torch.arange(gen.shape[1], device=gen.device)
    window = gen & (cols[None, :] < first[:, None] + block_length)
    lf = logits[window].float()  # only the window's cells: (n, V), not (B, L, V)
    conf = torch.full(gen.shape, -1.0, device=gen.device)
    conf[window] = (lf.max(-1).values - torch.logsumexp(lf, -1)).exp()  # max softmax prob
    top = conf.topk(min(k, gen.shape[1]), dim=-1).indices
    return torch.zeros_like(gen).scatter(1, top, True) & window


def _current_block_masks(canvas: Canvas, block_length: int) -> torch.Tensor:
    """Bool (B, L): masked cells in each row's block of its first masked cell (the drafter's frontier)."""
    gen = canvas.x[:, canvas.prompt_len :] == canvas.mask_id
    first = _first_true(gen)
    block = torch.div(first, block_length, rounding_mode="floor")
    cols = torch.arange(gen.shape[1], device=gen.device)
    return gen & (torch.div(cols, block_length, rounding_mode="floor")[None, :] == block[:, None])


def _guard(canvas: Canvas, remasked: torch.Tensor, decoded_before: torch.Tensor, logits: torch.Tensor) -> int:
    """Fill the leftmost re-masked cell of rows that made no progress with the verifier's argmax."""
    P = canvas.prompt_len
    still = remasked & canvas.masked()
    stuck = ((~canvas.masked()).sum(1) <= decoded_before) & still.any(1)
    if not stuck.any():
        return 0
    rows = stuck.nonzero()[:, 0]
    cols = _first_true(still)[rows]
    canvas.x[rows, cols] = logits.argmax(-1)[rows, cols - P]
    return len(rows)


# ---------------------------------------------------------------- models and generation

def check_compatible(drafter: torch.nn.Module, verifier: torch.nn.Module,
                     drafter_tokenizer: Tokenizer | None = None, verifier_tokenizer: Tokenizer | None = None) -> None:
    """Drafter and verifier must read and write the same token ids. Dream's shifted network is fine:
    its full forward returns aligned logits, and the drafter's cached forwards shift over canvas
    columns (`decoding.cache.CachedDecoding`)."""
    d, v = drafter.config, verifier.config
    if (d.vocab_size, d.embedding_size) != (v.vocab_size, v.embedding_size):
        raise ValueError(
            f"drafter and verifier vocabularies differ (drafter vocab_size {d.vocab_size} / {d.embedding_size} logits, "
            f"verifier {v.vocab_size} / {v.embedding_size}); the drafter must share the verifier's tokenizer"
        )
    for name in ("mask_token_id", "eos_token_id"):
        if getattr(d, name) != getattr(v, name):
            raise ValueError(f"drafter and verifier disagree on {name} (drafter {getattr(d, name)}, "
                             f"verifier {getattr(v, name)}); they must share a tokenizer and its special tokens")
    for who, m in (("drafter", drafter), ("verifier", verifier)):
        if capabilities(m).mask_id is None:
            raise ValueError(f"the {who} ({type(m).__name__}) has no mask token; DualDiffusion needs masked "
                             "diffusion models (LLaDA, Dream)")
    if drafter_tokenizer is not None and verifier_tokenizer is not None \
            and drafter_tokenizer.fingerprint() != verifier_tokenizer.fingerprint():
        raise ValueError("drafter and verifier tokenizers differ (tokenizer.json vocabularies do not match); "
                         "train the drafter with the verifier's tokenizer")


@torch.inference_mode()
def dualdiffusion_generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: DualConfig,
    drafter_model: torch.nn.Module | None = None,
    drafter_tokenizer: Tokenizer | None = None,
    progress: bool = False,
    meter: CostMeter | None = None,
    streamer: Streamer | None = None,
) -> GenerationResult:
    """Decode `prompts` with DualDiffusion: `model` verifies, `drafter_model` (default: `model`) drafts.
    On a block-causal model (LLaDA2, SDAR) the model drafts for itself within each block, on the exact
    block cache (`speculative.block`)."""
    from .block import dual_block_generate, is_block_causal

    if is_block_causal(model):
        if drafter_model is not None and drafter_model is not model:
            raise ValueError("dualdiffusion on a block-causal model drafts with the model itself (drafter self); "
                             "a separate drafter model is not supported there")
        return dual_block_generate(model, tokenizer, prompts, cfg, progress=progress, meter=meter, streamer=streamer)
    drafter_model = model if drafter_model is None else drafter_model
    check_compatible(drafter_model, model, drafter_tokenizer, tokenizer)
    if model_device(drafter_model) != model_device(model):
        raise ValueError(f"drafter is on {model_device(drafter_model)} but the verifier is on {model_device(model)}")
    rule = make_rule(cfg.rule, cfg.rule_threshold, cfg.verifier_unmask)
    dcfg = cfg.decode
    meter = meter or CostMeter(primary="verifier")
    meter.primary = "verifier"
    d_metered = MeteredModel(drafter_model, meter, "drafter")
    verifier = FullForwardVerifier(MeteredModel(model, meter, "verifier"))
    generator = torch.Generator(device=model_device(model)).manual_seed(dcfg.seed)
    stats = SpecStats()

    def decode_batch(canvas: Canvas, stream: Streamer | None) -> None:
        drafter = DiffusionDrafter(d_metered, canvas, dcfg, generator, keep_logprobs=rule.spec.needs_drafter_logprobs)
        stats.add(dual_decode_canvas(drafter, verifier, rule, canvas, cfg, stream))

    token_ids, texts, raw = run_batches(
        model, tokenizer, prompts, dcfg, meter, decode_batch,
        desc=f"dualdiffusion[{cfg.rule},N={cfg.num_drafter_steps}]", progress=progress,
        max_positions=min(model.config.max_sequence_length, drafter_model.config.max_sequence_length),
        streamer=streamer)
    return GenerationResult(token_ids, texts, meter, cfg, raw, stats=stats.summary())


def build_dual_config(base: DualConfig | DecodeConfig | None = None, **options: Any) -> DualConfig:
    """DualDiffusion options -> DualConfig (None means 'not given').

    DecodeConfig fields (gen_length, block_length, steps, seed, batch_size,
    temperature...) shape the canvas and the drafter; `drafter_cache`,
    `drafter_policy`, `drafter_threshold` pick the drafter's cache × policy
    (default dual + threshold 0.9). The verifier always runs full forwards,
    so plain `cache` / `policy` / `threshold` are rejected as ambiguous.
    """
    given = {k: v for k, v in options.items() if v is not None}
    ambiguous = sorted({"cache", "policy", "threshold"} & set(given))
    if ambiguous:
        raise ValueError(
            f"method 'dualdiffusion' does not take {', '.join(ambiguous)}: the verifier always runs full forwards; "
            f"set the drafter's with {', '.join('drafter_' + k for k in ambiguous)} "
            f"(--{' / --'.join('drafter-' + k for k in ambiguous)})"
        )
    decode_fields = set(DecodeConfig.__dataclass_fields__)
    loop_fields = set(DualConfig.__dataclass_fields__) - {"decode"}
    own = loop_fields | set(DRAFTER_OPTIONS)
    unknown = set(given) - decode_fields - own
    if unknown:
        raise ValueError(f"unknown dualdiffusion option(s) {sorted(unknown)}; valid: "
                         f"{sorted((decode_fields - {'cache', 'policy', 'threshold'}) | own)}")
    if isinstance(base, DualConfig):
        decode, loop = base.decode.to_dict(), {k: getattr(base, k) for k in loop_fields}
    else:
        decode, loop = {**(base.to_dict() if base else {}), **DRAFTER_PRESET}, {}
    for k in ("cache", "policy", "threshold"):
        if f"drafter_{k}" in given:
            decode[k] = given[f"drafter_{k}"]
    decode.update({k: v for k, v in given.items() if k in decode_fields})
    loop.update({k: v for k, v in given.items() if k in loop_fields})
    if "drafter" in loop:
        loop["drafter"] = str(loop["drafter"])
    if "rule" in given:  # a new rule starts from its own defaults
        for k in ("rule_threshold", "verifier_unmask"):
            if k not in given:
                loop[k] = None
    full_steps(decode, given, base)
    try:
        drafter_decode = DecodeConfig(**decode)
    except ValueError as e:  # name the option the caller gave, not the field it became
        for k in ("cache", "policy", "threshold"):
            if f"drafter_{k}" in given and re.search(rf"(?<!\w){k}(?!\w)", str(e)):
                raise ValueError(f"drafter_{k}: {e}") from None
        raise
    return DualConfig(decode=drafter_decode, **loop)
