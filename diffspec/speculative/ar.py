"""Autoregressive decoding and classic speculative decoding (Leviathan et al. 2023; Chen et al. 2023).

`ar_generate` is the baseline every AR speculative method must reproduce: a
KV-cached loop (prefill the prompt, then one token per forward), greedy or
temperature sampling. Batches are left-padded, with per-row RoPE positions and
a key mask, so a batch decodes exactly as its rows would alone.

`spec_generate` is the textbook drafter/target loop with a small AR drafter
that shares the target's tokenizer. Per round the drafter proposes γ tokens
with its own cache; the target scores [last token, d_1..d_γ] in one forward
over its cache (γ+1 queries, logit j predicting position j+1); the acceptance
rule keeps a prefix d_1..d_k and adds one token of the target's own (the
correction at the first rejection, or a bonus after all γ); both caches are
cropped to the accepted length. Greedy acceptance (longest prefix equal to the
target's argmax) makes the output token-for-token `ar_generate`'s greedy
output; with temperature > 0 the rejection rule (`rejection_accept`) makes
every emitted token exactly distributed as the target's sampler.

Speculative rows are decoded one at a time: rows accept different numbers of
tokens per round, so a batch would need ragged caches (or padding inside the
cache) for a CPU-scale baseline whose per-row cost is what we measure.

Cost: `MeteredModel`s named "drafter" and "target", meter.primary = "target",
so `meter.tokens_per_forward` is generated tokens per target forward (the
prefill forward, which yields the first token, included). `stats` reports the
acceptance per verification round: rounds, drafted, accepted, and
acceptance_length τ = (accepted + rounds) / rounds.

Generation stops for a row after it emits an EOS id of the model config
(`stop_at_eos`); `token_ids` are cut before the first EOS, `raw_ids` keep it.
`tokens_generated` counts tokens actually produced (EOS included), so AR
decoding has exactly one token per forward.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..decoding.config import check_field_types, check_finite_floats
from ..decoding.capabilities import capabilities
from ..decoding.meter import CostMeter, MeteredModel, meter_primary
from ..decoding.runner import GenerationResult, eos_ids, max_positions, model_device, run_prompts
from ..decoding.streamer import Streamer, commit_tail
from ..models.causal import CausalKVCache
from ..models.tokenizer import Tokenizer
from .round import Proposal, chain, speculate, through_eos
from .sizing import AUTO, DEFAULT_GAMMA, GAMMA_CANDIDATES, auto_run

__all__ = ["ARConfig", "SpecConfig", "ar_generate", "spec_generate", "ar_batch", "greedy_accept",
           "rejection_accept", "check_compatible", "through_eos", "run_rows"]


@dataclass(frozen=True)
class ARConfig:
    """Options of plain AR decoding, validated on construction.

    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / T)
    with a generator seeded from `seed` (so a run is reproducible, though a
    different batch_size draws the random numbers in a different order).
    """

    gen_length: int = 48  # new tokens at most per row (Hugging Face's max_new_tokens)
    temperature: float = 0.0
    seed: int = 0
    stop_at_eos: bool = True
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.gen_length < 1:
            raise ValueError(f"gen_length must be >= 1, got {self.gen_length}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        check_finite_floats(self)  # +inf would divide every logit to 0 or NaN
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def replace(self, **kw: Any) -> "ARConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SpecConfig(ARConfig):
    """ARConfig plus `gamma`, the tokens the drafter proposes per round.

    Rows are decoded one at a time, so `batch_size` only matters for the AR
    baseline run with the same options.
    """

    # "auto": the γ with the most tokens/s on this device (`speculative.sizing`): each draft costs a
    # drafter forward, and on a CPU the verification's width has an uneven cost of its own.
    gamma: int | str = 4
    AUTO_FIELDS: ClassVar[tuple[str, ...]] = ("gamma",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma != AUTO and self.gamma < 1:
            raise ValueError(f"gamma must be >= 1 or 'auto', got {self.gamma}")


# ---------------------------------------------------------------- sampling and acceptance (unit-tested)


def probs(logits: Tensor, temperature: float) -> Tensor:
    """softmax(logits / T) in fp32: the distribution a sampler at temperature T draws from."""
    return F.softmax(logits.float() / temperature, dim=-1)


def sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """(..., V) logits -> (...) token ids: argmax when temperature is 0, else a softmax(l / T) draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    p = probs(logits, temperature)
    return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).reshape(p.shape[:-1])


def greedy_accept(target_logits: Tensor, drafts: Sequence[int]) -> tuple[int, int]:
    """(k, token): the longest draft prefix equal to the target's argmax, and the target's next token.

    target_logits (γ+1, V): row j predicts the token after d_j (row 0: after
    the last verified token). The token is the argmax at row k: the
    correction of d_{k+1}, or the bonus when all γ drafts match.
    """
    best = target_logits.argmax(dim=-1).tolist()
    k = 0
    while k < len(drafts) and drafts[k] == best[k]:
        k += 1
    return k, best[k]


def rejection_accept(p: Tensor, q: Tensor, drafts: Sequence[int], generator: torch.Generator | None) -> tuple[int, int]:
    """(k, token) by the speculative-sampling rule, so every emitted token is distributed as p.

    p (γ+1, V): target probabilities; q (γ, V): the drafter's, from which
    d_j was drawn. Draft d_j is kept with probability min(1, p_j(d)/q_j(d));
    at the first rejection the token is drawn from normalize(max(0, p_j - q_j)),
    and after γ acceptances it is a bonus draw from p_γ. (If p and q agree to
    rounding, the residual can vanish; then p itself is used.)
    """
    for j, d in enumerate(drafts):
        u = torch.rand((), generator=generator, device=p.device, dtype=p.dtype)
        if u * q[j, d] <= p[j, d]:  # u < p/q without dividing by a tiny q
            continue
        residual = (p[j] - q[j]).clamp_min(0)
        if not residual.sum() > 0:
            residual = p[j]
        return j, int(torch.multinomial(residual, 1, generator=generator))
    k = len(drafts)
    return k, int(torch.multinomial(p[k], 1, generator=generator))


# ---------------------------------------------------------------- shared checks


def check_ar(model: torch.nn.Module, who: str, drafts: bool = False) -> None:
    """An AR model; unless it only `drafts`, one whose head covers the whole vocabulary: a model
    narrowed to a draft vocabulary would decode or verify silently different text."""
    if not capabilities(model).logits_shifted:
        raise ValueError(f"the {who} ({type(model).__name__}) is not an autoregressive model: "
                         "AR decoding needs logit i to predict token i+1 (e.g. a Qwen3Model)")
    if not drafts and getattr(model, "draft_vocab", None) is not None:
        raise ValueError(f"the {who} has a draft vocabulary ({model.draft_vocab.numel()} ids), which only a "
                         "drafter may have: call set_draft_vocab(None) on it, or load it as a model, not a drafter")


def check_compatible(target: torch.nn.Module, drafter: torch.nn.Module) -> None:
    """The drafter must be AR, on the target's device, and read/write the same token ids."""
    check_ar(target, "target")
    check_ar(drafter, "drafter", drafts=True)
    tv, dv = target.config.vocab_size, drafter.config.vocab_size
    if tv != dv:
        raise ValueError(f"drafter and target vocabularies differ (drafter vocab_size {dv}, target {tv}); "
                         "the drafter must share the target's tokenizer")
    if eos_ids(target) != eos_ids(drafter):
        raise ValueError(f"drafter and target disagree on eos ids (drafter {sorted(eos_ids(drafter))}, "
                         f"target {sorted(eos_ids(target))}); they must share a tokenizer and its special tokens")
    if model_device(drafter) != model_device(target):
        raise ValueError(f"drafter is on {model_device(drafter)} but the target is on {model_device(target)}")


def run_rows(target: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], cfg: ARConfig, meter: CostMeter,
             decode: Callable[..., list[list[int]]], desc: str, progress: bool,
             batch_size: int | None = None, limit: int | None = None,
             streamer: Streamer | None = None) -> GenerationResult:
    """The shared runner for the AR-target methods: answers end at any of the target's EOS ids
    (when `cfg.stop_at_eos`); speculative methods pass batch_size=1 (one row at a time)."""
    token_ids, texts, raw = run_prompts(
        target, tokenizer, prompts, decode, gen_length=cfg.gen_length, batch_size=batch_size or cfg.batch_size,
        meter=meter, desc=desc, progress=progress, limit=limit, cut=cfg.stop_at_eos, streamer=streamer)
    return GenerationResult(token_ids, texts, meter, cfg, raw)


# ---------------------------------------------------------------- plain AR decoding


def ar_batch(model: MeteredModel, rows: list[list[int]], cfg: ARConfig, eos: frozenset[int],
             generator: torch.Generator, hidden_layers: Sequence[int] | None = None,
             hidden_out: list[torch.Tensor] | None = None, streamer: Streamer | None = None) -> list[list[int]]:
    """Decode left-padded rows together; a row stops growing after its EOS, the batch when all stopped
    (or when `streamer`, which hears every token as it is sampled, says stop).

    Finished rows are still fed (their tokens are ignored) but are not counted
    as sequences advanced, so tokens per forward stays exactly 1. Greedy
    batches without step-level joins drop finished rows once a quarter of the
    batch has finished: answers end at very different lengths (SmolLM2's GSM8K
    answers: median 148 tokens, a quarter at the 256 cap), and feeding finished rows
    to the end wasted about 40 % of every batch's forwards.

    With `hidden_layers`, `hidden_out` receives per row the hidden states at
    those layers (concatenated, (T, len·H), on the CPU) of every token fed:
    the prompt and each answer token but the last. Drafter training reads them,
    so the target's continuations and its features come from one pass.
    """
    if (hidden_layers is None) != (hidden_out is None):
        raise ValueError("ar_batch: pass hidden_layers and hidden_out together")
    taps = list(hidden_layers) if hidden_layers is not None else None
    fed: list[list[torch.Tensor]] = [[] for _ in rows]  # per row, the hidden states of what it was fed

    def keep(out: Any, at: list[int]) -> Any:
        if taps is not None:
            h = torch.cat(out.hidden_states, dim=-1).cpu()
            for j, r in enumerate(at):
                fed[r].append(h[j])
        return out.logits[:, -1]

    device = model_device(model.model)
    B, W = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(B, W, dtype=torch.long, device=device)
    mask = torch.zeros(B, W, dtype=torch.bool, device=device)
    for r, row in enumerate(rows):
        ids[r, W - len(row):] = torch.tensor(row, device=device)
        mask[r, W - len(row):] = True
    padded = not bool(mask.all())
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = CausalKVCache.for_model(model.model, B, W + cfg.gen_length)

    at = list(range(B))  # each batch row's index in `rows`
    logits = keep(model(ids, positions=positions, attention_mask=mask if padded else None, kv_cache=cache,
                        hidden_layers=taps), at)
    pos = positions[:, -1:] + 1
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    # Step-level batching: a greedy loop with a streamer may take rows in after any forward (`_ARRows`).
    joins = _ARRows(model, cfg, streamer, [W - len(r) for r in rows]) \
        if streamer is not None and cfg.temperature == 0 and taps is None else None
    row_ids, live = list(range(B)), list(out)  # each batch row's streamer row, and its answer so far
    shrink = joins is None and cfg.temperature == 0  # sampling draws per row: keep its batch shape
    while True:
        tok = sample(logits, cfg.temperature, generator)
        stop = False
        for i, t in enumerate(tok.tolist()):
            if not done[i]:
                live[i].append(t)
                done[i] = (cfg.stop_at_eos and t in eos) or len(live[i]) >= cfg.gen_length
                stop = commit_tail(streamer, row_ids[i], live[i], 1)
        if all(done) or stop:
            break
        if padded:
            mask = torch.cat([mask, mask.new_ones(len(row_ids), 1)], dim=1)
        if shrink and 4 * done.count(True) >= len(done):
            kept = [i for i, d in enumerate(done) if not d]
            cache.select_rows(kept)
            tok, mask, pos = tok[kept], mask[kept], pos[kept]
            at, row_ids, live, done = [at[i] for i in kept], [row_ids[i] for i in kept], [live[i] for i in kept], \
                [False] * len(kept)
        logits = keep(model(tok[:, None], positions=pos, attention_mask=mask if padded else None, kv_cache=cache,
                            sequences=done.count(False), hidden_layers=taps), at)
        pos = pos + 1
        if joins is not None and (joined := joins.step(cache, logits, mask, pos, row_ids, live, done)):
            logits, mask, pos = joined
            padded = True
    if hidden_out is not None:
        for r, row in enumerate(rows):  # (W + answer steps fed, len·H) per row
            hidden_out.append(torch.cat(fed[r])[W - len(row):W + len(out[r]) - 1])
    return out


class _ARRows:
    """Step-level batching for `ar_batch`: after a forward, the rows the streamer admits join the batch.
    A joining prompt is prefilled alone, exactly as `ar_batch` prefills a batch of one, and its K/V are
    placed in the batch's cache so that they end at the current column (left padding before them),
    with its first answer token still to be sampled from its own prefill's logits: from there it
    decodes as alone. When rows join, the rows whose answers are done leave the cache, and so do the
    columns no remaining row reads, so the cache stays as wide as its live rows need however long
    the batch lives."""

    def __init__(self, model: MeteredModel, cfg: ARConfig, streamer: Streamer, starts: list[int]):
        self.model, self.cfg, self.streamer = model, cfg, streamer
        self.starts = starts  # each batch row's first cache column (its left padding), kept on the host

    def step(self, cache: CausalKVCache, logits: Tensor, mask: Tensor, pos: Tensor, rows: list[int],
             live: list[list[int]], done: list[bool]) -> tuple[Tensor, Tensor, Tensor] | None:
        """Take in the rows the streamer admits now; the batch's new (logits, mask, pos), or None when
        nobody joined (then nothing changed, and nothing was asked of the device)."""
        L, device = cache.length, logits.device
        keep = [i for i, d in enumerate(done) if not d]
        first = min((self.starts[i] for i in keep), default=L)  # the first column a live row reads
        new = self.streamer.admit(L - first, len(keep))
        if not new:
            return None
        if mask.shape[1] < L:  # an unpadded batch kept no mask: every column it has is real
            mask = torch.cat([mask, mask.new_ones(len(rows), L - mask.shape[1])], dim=1)
        if len(keep) < len(done):  # done rows leave: nothing they hold is read again
            cache.select_rows(keep)
            logits, mask, pos = logits[keep], mask[keep], pos[keep]
            rows[:], live[:], done[:] = [rows[i] for i in keep], [live[i] for i in keep], [False] * len(keep)
        cache.drop_front(first)
        mask, L = mask[:, first:], cache.length
        self.starts = [self.starts[i] - first for i in keep]
        for row, prompt in new:
            p = len(prompt)
            if p > L:
                raise ValueError(f"a joining prompt of {p} tokens does not fit the batch's {L} columns")
            alone = CausalKVCache.for_model(self.model.model, 1, p, dtype=cache.k[0].dtype)
            first_logits = self.model(torch.tensor([prompt], device=device),
                                      positions=torch.arange(p, device=device)[None], kv_cache=alone).logits[:, -1]
            cache.grow(1, L + self.cfg.gen_length)
            for buf, src in zip((*cache.k, *cache.v), (*alone.k, *alone.v)):
                buf[-1, :, L - p:L] = src[0, :, :p]
            logits = torch.cat([logits, first_logits])
            mask = torch.cat([mask, torch.arange(L, device=device)[None] >= L - p])
            pos = torch.cat([pos, pos.new_full((1, 1), p)])
            rows.append(row)
            live.append([])
            done.append(False)
            self.starts.append(L - p)
        return logits, mask, pos


@torch.inference_mode()
def ar_generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: ARConfig,
    meter: CostMeter | None = None,
    *,
    progress: bool = False,
    streamer: Streamer | None = None,
) -> GenerationResult:
    """Decode `prompts` autoregressively with a KV cache, in left-padded batches of `cfg.batch_size`."""
    check_ar(model, "model")
    meter, metered = meter_primary(model, meter)
    eos = eos_ids(model)
    generator = torch.Generator(device=model_device(model)).manual_seed(cfg.seed)
    return run_rows(model, tokenizer, prompts, cfg, meter,
                    lambda rows, stream=None: ar_batch(metered, rows, cfg, eos, generator, streamer=stream),
                    "ar", progress, streamer=streamer)


# ---------------------------------------------------------------- speculative decoding


@dataclass
class ARSpecStats:
    rounds: int = 0  # target verification forwards (the prefill forward is not a round)
    drafted: int = 0
    accepted: int = 0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["acceptance_length"] = (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0
        d["acceptance_rate"] = self.accepted / self.drafted if self.drafted else 0.0
        return d


def _draft(drafter: MeteredModel, cache: CausalKVCache, seq: list[int], n: int, temperature: float,
           generator: torch.Generator) -> tuple[list[int], Tensor | None]:
    """n drafter tokens after `seq`, feeding first whatever of `seq` its cache lacks; q (n, V) when sampling."""
    device = model_device(drafter.model)
    feed, drafts, qs = seq[cache.length:], [], []
    for _ in range(n):
        logits = drafter(torch.tensor([feed], device=device), kv_cache=cache).logits[0, -1]
        if temperature == 0:
            d = int(logits.argmax())
        else:
            q = probs(logits, temperature)
            d = int(torch.multinomial(q, 1, generator=generator))
            qs.append(q)
        drafts.append(d)
        feed = [d]
    return drafts, (torch.stack(qs) if qs else None)


class _ChainSpeculator:
    """AR speculative decoding's side of a round (`speculative.round`) on one row: the drafter
    proposes a chain of γ tokens with its own cache; the target scores [anchor, d_1..d_γ] causally.

    Invariants between rounds: `seq` = prompt + generated; the target cache holds seq[:-1] (the
    last token is the first query of the next verification); the drafter cache holds some prefix
    of seq."""

    def __init__(self, target: MeteredModel, drafter: MeteredModel, prompt: list[int], cfg: SpecConfig,
                 generator: torch.Generator):
        self.target, self.drafter, self.cfg, self.generator = target, drafter, cfg, generator
        self.device = model_device(target.model)
        self.t_cache = CausalKVCache.for_model(target.model, 1, len(prompt) + cfg.gen_length)
        self.d_cache = CausalKVCache.for_model(drafter.model, 1, len(prompt) + cfg.gen_length)
        first = target(torch.tensor([prompt], device=self.device), kv_cache=self.t_cache).logits[0, -1]
        self.first = int(sample(first, cfg.temperature, generator))
        self.seq = prompt + [self.first]

    def propose(self, remaining: int) -> Proposal:
        T = self.cfg.temperature
        gamma = min(self.cfg.gamma, remaining - 1)  # never draft past the budget
        drafts, q = _draft(self.drafter, self.d_cache, self.seq, gamma, T, self.generator)

        def accept(logits: Tensor) -> tuple[list[int], int]:
            if T == 0:
                k, token = greedy_accept(logits, drafts)
            else:
                p = probs(logits, T)
                k, token = rejection_accept(p, q if q is not None else p[:0], drafts, self.generator)
            return list(range(1, k + 1)), token  # the chain's nodes 1..k

        return Proposal(chain(self.seq[-1], drafts), accept)

    def score(self, proposal: Proposal) -> Tensor:
        return self.target(torch.tensor([proposal.tree.tokens], device=self.device), kv_cache=self.t_cache).logits[0]

    def commit(self, proposal: Proposal, path: list[int], new: list[int]) -> None:
        kept = len(self.seq) + len(path)
        self.t_cache.crop(kept)
        self.d_cache.crop(min(self.d_cache.length, kept))
        self.seq += new


def _spec_row(target: MeteredModel, drafter: MeteredModel, prompt: list[int], cfg: SpecConfig,
              eos: frozenset[int], generator: torch.Generator, stats: ARSpecStats,
              streamer: Streamer | None = None) -> list[int]:
    """Speculatively decode one row; returns its generated ids (EOS included when it stopped there).
    `streamer` hears each round's accepted tokens (as row 0) and may end the row early."""
    spec = _ChainSpeculator(target, drafter, prompt, cfg, generator)
    return speculate(spec, spec.first, cfg.gen_length, eos=eos, stop_at_eos=cfg.stop_at_eos, stats=stats,
                     streamer=streamer)


@torch.inference_mode()
def spec_generate(
    target: torch.nn.Module,
    drafter: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: SpecConfig,
    meter: CostMeter | None = None,
    *,
    progress: bool = False,
    streamer: Streamer | None = None,
) -> GenerationResult:
    """Decode `prompts` with `target`, speculating `cfg.gamma` tokens per round with `drafter`, row by row
    (γ = "auto": chosen on this device first, `speculative.sizing`)."""
    if not isinstance(cfg, SpecConfig):
        raise ValueError(f"spec_generate needs a SpecConfig, got {type(cfg).__name__}")
    check_compatible(target, drafter)
    if cfg.gamma == AUTO:  # timed γ by γ: the chain estimate chose too long a chain here (`sizing`)
        return auto_run(target, [drafter], prompts, cfg, "gamma", GAMMA_CANDIDATES, DEFAULT_GAMMA,
                        lambda ps, c, m, p=False, s=None: spec_generate(target, drafter, tokenizer, ps, c, m,
                                                                        progress=p, streamer=s),
                        meter, progress, streamer)
    meter = meter or CostMeter(primary="target")
    meter.primary = "target"
    t_metered, d_metered = MeteredModel(target, meter, "target"), MeteredModel(drafter, meter, "drafter")
    eos = eos_ids(target)
    generator = torch.Generator(device=model_device(target)).manual_seed(cfg.seed)
    stats = ARSpecStats()
    res = run_rows(target, tokenizer, prompts, cfg, meter,
                   lambda rows, stream=None: [_spec_row(t_metered, d_metered, rows[0], cfg, eos, generator, stats,
                                                        stream)],
                   f"spec[γ={cfg.gamma}]", progress, batch_size=1,
                   limit=min(max_positions(target), max_positions(drafter)), streamer=streamer)
    res.stats = stats.summary()
    return res
