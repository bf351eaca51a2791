"""Log-likelihood of a continuation given a context, for both model families.

* AR targets (Llama / Qwen2 / Qwen3): the exact sum of the continuation's token
  log-probabilities, and `is_greedy` (every continuation token is the argmax),
  as lm-evaluation-harness computes them. Rolling (perplexity) windows too.
* Masked diffusion models (LLaDA, Dream): LLaDA's Monte-Carlo estimate of the
  ELBO (ML-GSAI/LLaDA `get_log_likelihood.py`, Appendix B.5 of the paper): per
  draw, mask k of the L continuation tokens (k uniform in 1..L, the masked set
  uniform among the k-subsets), sum the masked cells' cross-entropy and divide
  by k/L; the estimate is minus the mean over `mc_num` draws. As in LLaDA's
  `forward_process` the draws' k are stratified: a random k, then evenly spaced
  counts from it (LLaDA does this within each mini-batch; here over the
  `mc_num` draws of a request, so the estimate does not depend on the batch
  size). `cfg_scale` > 0 applies LLaDA's unsupervised classifier-free guidance
  (the context masked in the unconditional row). `is_greedy` is LLaDA's
  `suffix_greedy_prediction`: start from the context and L masks, commit the
  single most confident masked cell per forward, and compare with the target
  (the mask token is never proposed, as in diffspec's decoders).

Every request draws from its own generator, seeded by `seed` and its token ids,
so its estimate is the same whatever the batch it lands in, the order of the
requests or the process of a data-parallel run that scores it. When L = 1 the
ELBO is exact (k = 1: one masked cell, weight 1), so one forward serves every
draw and the greedy check.

Rows of different requests share a forward: right-padded, with an attention
mask over keys (positions stay 0..n-1, so padding changes nothing but float
rounding). Forwards are charged to a `CostMeter` when one is given.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..decoding.capabilities import capabilities
from ..decoding.meter import CostMeter, MeteredModel
from ..decoding.runner import max_positions, model_device

Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


# ---------------------------------------------------------------- tokenization and model facts


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context move to the continuation, the
    whole string is encoded once and the continuation is what follows the context's own encoding
    (so BPE merges across the boundary count for the continuation)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    cont = whole[len(ctx):]
    if whole[: len(ctx)] != ctx or not cont:  # a merge across the boundary: score the continuation alone
        cont = tokenizer.encode(continuation)
    return list(ctx), list(cont)


def _pad_id(model: Any) -> int:
    cfg = model.config
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(cfg, name, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if isinstance(v, int):
            return v
    return 0


def _prefix_id(model: Any) -> int:
    """The token an AR model conditions on when the context is empty: BOS, else EOS (lm-eval's
    `prefix_token_id`)."""
    cfg = model.config
    bos = getattr(cfg, "bos_token_id", None)
    if isinstance(bos, int):
        return bos
    eos = getattr(cfg, "eos_token_ids", None) or (getattr(cfg, "eos_token_id", None),)
    if eos and isinstance(eos[0], int):
        return eos[0]
    return _pad_id(model)


def _check_pairs(pairs: Sequence[Pair]) -> list[tuple[list[int], list[int]]]:
    out = []
    for i, (ctx, cont) in enumerate(pairs):
        if len(cont) == 0:
            raise ValueError(f"request {i} has an empty continuation; there is nothing to score")
        out.append((list(ctx), list(cont)))
    return out


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


def _metered(model: Any, meter: CostMeter | None) -> Any:
    return MeteredModel(model, meter, meter.primary) if meter is not None else model


# ---------------------------------------------------------------- AR: exact


@torch.inference_mode()
def ar_loglikelihood(model: Any, pairs: Sequence[Pair], batch_size: int = 8,
                     meter: CostMeter | None = None) -> list[tuple[float, bool]]:
    """(sum of the continuation's token log-probs, whether each is the argmax) per (context,
    continuation) pair; an empty context conditions on BOS (else EOS). Inputs longer than the
    model's positions keep their last tokens, as lm-eval does."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = _check_pairs(pairs)
    limit, pad, prefix, device = max_positions(model), _pad_id(model), _prefix_id(model), model_device(model)
    run = _metered(model, meter)
    inputs = []
    for i, (ctx, cont) in enumerate(pairs):
        if len(cont) > limit:
            raise ValueError(f"request {i}: the continuation has {len(cont)} tokens, more than the model's "
                             f"{limit} positions")
        full = (ctx or [prefix]) + cont
        inputs.append(full[-(limit + 1):][:-1])
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))  # long first: less padding per batch
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for chunk in _chunks(order, batch_size):
        T = max(len(inputs[i]) for i in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, : len(inputs[i])] = torch.tensor(inputs[i])
        # Right padding under a causal mask: no real position ever sees a pad.
        logits = run(ids.to(device)).logits
        for r, i in enumerate(chunk):
            n, cont = len(inputs[i]), pairs[i][1]
            lp = logits[r, n - len(cont) : n].float().log_softmax(-1)
            target = torch.tensor(cont, device=lp.device)
            out[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    if meter is not None:
        meter.sequences += len(pairs)
    return out


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows (`get_rolling_token_windows` + `make_disjoint_window`,
    context_len 1): every token is predicted exactly once, each window with as much context as fits."""
    tokens = list(tokens)
    if not tokens:
        return []
    pred_len = max_len
    first = min(max_len, len(tokens))
    windows = [([prefix_id] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        windows.append((tokens[max(0, end - max_len - 1) : end - 1], tokens[end - n : end]))
        done += n
    # disjoint: the context keeps only what precedes the predicted tokens
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


def ar_loglikelihood_rolling(model: Any, documents: Sequence[Sequence[int]], batch_size: int = 8,
                             meter: CostMeter | None = None) -> list[float]:
    """Each document's total log-likelihood (for perplexity), scored in windows of the model's length."""
    limit, prefix = max_positions(model), _prefix_id(model)
    windows, owner = [], []
    for d, toks in enumerate(documents):
        for w in rolling_windows(toks, prefix, limit):
            windows.append(w)
            owner.append(d)
    totals = [0.0] * len(documents)
    for d, (lp, _) in zip(owner, ar_loglikelihood(model, windows, batch_size, meter)):
        totals[d] += lp
    return totals


# ---------------------------------------------------------------- masked diffusion: Monte-Carlo ELBO


def request_seed(seed: int, ctx: Sequence[int], cont: Sequence[int]) -> int:
    """A per-request seed from the run's seed and the token ids: the same draws wherever it is scored."""
    h = hashlib.sha256(f"{seed}|{','.join(map(str, ctx))}|{','.join(map(str, cont))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def mask_draws(length: int, mc_num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(mc_num, length) bool masks and their mask ratios k/L, LLaDA's `forward_process`: a k uniform
    in 1..L, evenly spaced counts k, k + L/m, ... (wrapped into 1..L), each a uniformly random
    subset of that many cells."""
    k = int(torch.randint(1, length + 1, (1,), generator=generator))
    counts = torch.round(torch.linspace(float(k), k + (mc_num - 1) * (length / mc_num), steps=mc_num)).long()
    counts = ((counts - 1) % length) + 1
    masks = torch.zeros(mc_num, length, dtype=torch.bool)
    for j in range(mc_num):
        masks[j, torch.randperm(length, generator=generator)[: int(counts[j])]] = True
    return masks, counts.double() / length


@dataclass
class _Row:
    request: int
    ids: list[int]  # context + continuation with some continuation cells masked
    ctx_len: int
    ratio: float  # k / L
    greedy: bool = False  # L = 1: this row's forward is also the greedy check


def _guided_logits(run: Any, ids: Tensor, attn: Tensor | None, ctx_lens: Sequence[int], mask_id: int,
                   cfg_scale: float) -> Tensor:
    """Logits of one batch; with cfg_scale > 0, LLaDA's guidance: un + (s + 1)(cond - un), the
    unconditional rows having their context masked, in the same forward."""
    if cfg_scale <= 0:
        return run(ids, attention_mask=attn).logits
    un = ids.clone()
    for r, n in enumerate(ctx_lens):
        un[r, :n] = mask_id
    both = run(torch.cat([ids, un]), attention_mask=None if attn is None else torch.cat([attn, attn])).logits
    cond, uncond = both.chunk(2, dim=0)
    return uncond + (cfg_scale + 1) * (cond - uncond)


def _batch(rows: Sequence[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = True
    return ids.to(device), (None if bool(attn.all()) else attn.to(device))


@torch.inference_mode()
def mc_loglikelihood(model: Any, pairs: Sequence[Pair], mc_num: int = 128, batch_size: int = 32,
                     cfg_scale: float = 0.0, seed: int = 0, check_greedy: bool = True,
                     meter: CostMeter | None = None) -> list[tuple[float, bool]]:
    """(Monte-Carlo ELBO of the continuation, is_greedy) per pair for a masked diffusion model; see
    the module docstring. `batch_size` is rows (draws) per forward."""
    if mc_num < 1:
        raise ValueError(f"mc_num must be >= 1, got {mc_num}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg must be >= 0, got {cfg_scale}")
    pairs = _check_pairs(pairs)
    mask_id = capabilities(model).mask_id
    limit, pad, device = max_positions(model), _pad_id(model), model_device(model)
    run = _metered(model, meter)
    rows: list[_Row] = []
    for i, (ctx, cont) in enumerate(pairs):
        if mask_id in ctx or mask_id in cont:
            raise ValueError(f"request {i} contains the mask token id {mask_id}")
        if len(cont) > limit:
            raise ValueError(f"request {i}: the continuation has {len(cont)} tokens, more than the model's "
                             f"{limit} positions")
        ctx = ctx[max(0, len(ctx) + len(cont) - limit):]  # keep the context's end, as lm-eval does
        pairs[i] = (ctx, cont)
        L = len(cont)
        if L == 1:  # k = 1 in every draw: the estimate is exact, one forward is every draw
            rows.append(_Row(i, ctx + [mask_id], len(ctx), 1.0, greedy=True))
            continue
        g = torch.Generator().manual_seed(request_seed(seed, ctx, cont))
        masks, ratios = mask_draws(L, mc_num, g)
        target = torch.tensor(cont)
        for m, ratio in zip(masks, ratios.tolist()):
            rows.append(_Row(i, ctx + torch.where(m, mask_id, target).tolist(), len(ctx), ratio))

    loss = [0.0] * len(pairs)
    draws = [0] * len(pairs)
    greedy = [False] * len(pairs)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r].ids))
    for chunk in _chunks(order, batch_size):
        batch = [rows[r] for r in chunk]
        ids, attn = _batch([b.ids for b in batch], pad, device)
        logits = _guided_logits(run, ids, attn, [b.ctx_len for b in batch], mask_id, cfg_scale)
        masked = ids == mask_id
        if attn is not None:
            masked &= attn
        target = torch.zeros_like(ids)
        for r, b in enumerate(batch):
            cont = pairs[b.request][1]
            target[r, b.ctx_len : b.ctx_len + len(cont)] = torch.tensor(cont, device=device)
        where = masked.nonzero(as_tuple=True)
        picked = logits[where].float()
        ce = F.cross_entropy(picked, target[where], reduction="none").double()
        per_row = torch.zeros(len(batch), dtype=torch.float64, device=ce.device).index_add_(0, where[0], ce)
        # greedy (L = 1 rows): the argmax among real tokens, never the mask token itself
        picked[:, mask_id] = -torch.inf
        hit = (picked.argmax(-1) == target[where]).tolist()
        for r, b in enumerate(batch):
            loss[b.request] += float(per_row[r]) / b.ratio
            draws[b.request] += 1
        for row_index, ok in zip(where[0].tolist(), hit):
            if batch[row_index].greedy:
                greedy[batch[row_index].request] = bool(ok)
    longer = [i for i, (_, cont) in enumerate(pairs) if len(cont) > 1]
    if check_greedy and longer:
        for i, ok in zip(longer, _greedy_fill(run, [pairs[i] for i in longer], mask_id, pad, device,
                                              batch_size, cfg_scale)):
            greedy[i] = ok
    if meter is not None:
        meter.sequences += len(pairs)
    return [(-loss[i] / draws[i], greedy[i] if check_greedy else False) for i in range(len(pairs))]


def _greedy_fill(run: Any, pairs: Sequence[tuple[list[int], list[int]]], mask_id: int, pad: int,
                 device: torch.device, batch_size: int, cfg_scale: float) -> list[bool]:
    """LLaDA's `suffix_greedy_prediction`, batched: from context + L masks, commit the single most
    confident masked cell per forward until none is left; True where the result is the target."""
    out: list[bool] = []
    for chunk in _chunks(list(pairs), batch_size):
        seqs = [ctx + [mask_id] * len(cont) for ctx, cont in chunk]
        ids, attn = _batch(seqs, pad, device)
        ctx_lens = [len(ctx) for ctx, _ in chunk]
        for _ in range(max(len(cont) for _, cont in chunk)):
            masked = ids == mask_id
            if attn is not None:
                masked &= attn
            if not masked.any():
                break
            logits = _guided_logits(run, ids, attn, ctx_lens, mask_id, cfg_scale)
            where = masked.nonzero(as_tuple=True)
            picked = logits[where].float()
            picked[:, mask_id] = -torch.inf
            prob = picked.softmax(-1)
            conf, tok = prob.max(-1)
            best = torch.full((ids.shape[0],), -1.0, dtype=conf.dtype, device=conf.device)
            best = best.scatter_reduce(0, where[0], conf, reduce="amax")
            for n in range(len(where[0])):  # the first (leftmost) cell reaching its row's best confidence
                r, c = int(where[0][n]), int(where[1][n])
                if best[r] >= 0 and conf[n] == best[r]:
                    ids[r, c] = tok[n]
                    best[r] = -1.0
        for r, (ctx, cont) in enumerate(chunk):
            out.append(ids[r, len(ctx) : len(ctx) + len(cont)].tolist() == list(cont))
    return out


# ---------------------------------------------------------------- one entry point for both families


def loglikelihood(model: Any, pairs: Sequence[Pair], *, batch_size: int = 32, mc_num: int = 128,
                  cfg_scale: float = 0.0, seed: int = 0, check_greedy: bool = True,
                  meter: CostMeter | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) per (context ids, continuation ids): exact for AR targets, the MC
    ELBO for masked diffusion models (`mc_num`, `cfg_scale`, `seed` apply to those only)."""
    if capabilities(model).is_ar:  # exact likelihood; masked diffusion models: MC ELBO
        return ar_loglikelihood(model, pairs, batch_size=batch_size, meter=meter)
    return mc_loglikelihood(model, pairs, mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale, seed=seed,
                            check_greedy=check_greedy, meter=meter)


def score_choices(model: Any, tokenizer: Any, items: Sequence[tuple[str, Sequence[str]]], **kw: Any
                  ) -> list[list[float]]:
    """Per (context, choices) item, each choice's log-likelihood (lm-eval's multiple choice: the
    prediction is the argmax). Keyword arguments go to `loglikelihood`."""
    pairs, owner = [], []
    for i, (context, choices) in enumerate(items):
        for c in choices:
            pairs.append(encode_pair(tokenizer, context, c))
            owner.append(i)
    scores: list[list[float]] = [[] for _ in items]
    for i, (lp, _) in zip(owner, loglikelihood(model, pairs, **kw)):
        scores[i].append(lp)
    return scores
