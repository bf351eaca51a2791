"""DFlash single-draft speculative decoding and D²SD (draft trees from a block-diffusion drafter).

Both decode an AR target greedily and losslessly: every emitted token is the
target's own argmax, so the output equals `ar_generate`'s greedy output token
for token; the drafters only change how many tokens one target forward yields.

Per-row state between rounds (`_TargetState`): `seq` = prompt + generated;
the target's KV cache holds every committed token *except the anchor*
(seq[-1], whose K/V are computed as the first query of the next
verification), and a buffer holds the target hidden states (at the drafters'
`target_layers`) of exactly those cached tokens: the drafters' context.

DFlash round: the drafter fills [anchor, mask×(γ−1)] in one forward →
drafts d_1..d_{γ−1} (argmax) → the target scores [anchor, d_1..] in one
causal forward over its cache → the longest prefix equal to the target's
argmax is accepted, plus the target's next token (bonus) → the K/V and hidden
states of anchor + accepted drafts are kept, the rest dropped.

D²SD round: the block drafter gives drafts d and confidences c (softmax
probability of each argmax) → `rejection_posterior(c)` → the K most likely
accepted-prefix lengths i, plus the full draft → the variable-prefix (VP)
drafter fills every window [anchor, d_1..d_i, mask…] of length γ₂ in ONE
batched call → the branches are merged into a `DraftTree` → ONE target
forward over all tree nodes, with a tree attention mask (the committed prefix
from the cache + each node's own ancestors) and positions cache length +
depth → the greedy walk `tree.accept` → the cache is compacted to the anchor
and the accepted path (`CausalKVCache.keep`), the bonus becomes the new anchor.
A single-branch tree is a chain, which is verified with the plain causal mask,
so DFlash is literally D²SD with one branch and no VP drafter.

Rows are decoded one at a time (batch 1): rows accept different numbers of
tokens per round, so a batch would need ragged caches; as in `spec_generate`,
the per-row cost is what we measure. The VP drafter's batch is the number of
branches of one row.

Budget and EOS follow `ar_generate`: at most `max_new_tokens` tokens per row
(drafts are never longer than what is left), stop after an EOS of the target
config when `stop_at_eos`; `token_ids` are cut before the first EOS, `raw_ids`
keep it. With `stop_at_eos`, every draft and branch is also cut after its
first EOS before verification: those tokens could never be emitted, and on
short answers they would be most of a γ₂-long tree.

Cost: `MeteredModel` "target" (primary, so tokens per forward = generated
tokens per target forward, the prefill included), "drafter" and "vp_drafter"
charged per call with their context keys (the drafters recompute the context
K/V every call; see models/dflash.py). Stats: rounds, drafted (tree nodes
besides the anchor), accepted, acceptance_length τ = tokens per verification
round, drafter/VP forwards and batch sizes, tree sizes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..decoding.diffusion import GenerationResult
from ..decoding.meter import CostMeter, MeteredModel
from ..models.dflash import DFlashDrafter, check_target
from ..models.tokenizer import Tokenizer
from .ar import (ARConfig, _Cache, _check_ar, _device, _encode, _eos_ids, _finish, _max_positions,
                 _through_eos)
from .tree import DraftTree, rejection_posterior, top_prefix_lengths

__all__ = ["DFlashSpecConfig", "D2SDConfig", "dflash_generate", "d2sd_generate", "check_drafter"]


@dataclass(frozen=True)
class DFlashSpecConfig(ARConfig):
    """ARConfig plus `gamma`, the drafter's window γ (anchor + γ−1 drafts per round).

    Greedy only: losslessness here rests on matching the target's argmax
    (temperature must stay 0). `batch_size` only matters for the AR baseline
    run with the same options; speculative rows are decoded one at a time.
    """

    gamma: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma < 2:
            raise ValueError(f"gamma must be >= 2 (the anchor plus at least one draft), got {self.gamma}")
        if self.temperature != 0:
            raise ValueError(f"DFlash / D²SD decoding is greedy only; temperature must be 0, got {self.temperature}")


@dataclass(frozen=True)
class D2SDConfig(DFlashSpecConfig):
    """DFlashSpecConfig plus D²SD's `gamma2` (γ₂, the VP drafter's window, >= γ) and
    `k` (how many likely accepted-prefix lengths get a VP branch; the full first
    draft always gets one too, so a tree has at most k + 1 branches)."""

    gamma2: int = 32
    k: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k (branches re-anchored by the VP drafter) must be >= 1, got {self.k}")
        if self.gamma2 < self.gamma:
            raise ValueError(f"gamma2 (γ₂ = {self.gamma2}) must be >= gamma (γ = {self.gamma}): the VP drafter "
                             "extends prefixes of the first draft")


@dataclass
class BlockSpecStats:
    rounds: int = 0  # target verification forwards (prefill excluded)
    drafted: int = 0  # draft tokens verified (tree nodes besides the anchor)
    accepted: int = 0
    drafter_forwards: int = 0
    vp_forwards: int = 0
    vp_windows: int = 0  # sum of VP batch sizes
    tree_nodes: int = 0  # sum over rounds, anchor included
    max_tree_nodes: int = 0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["acceptance_length"] = (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0
        d["mean_vp_batch"] = self.vp_windows / self.vp_forwards if self.vp_forwards else 0.0
        d["mean_tree_nodes"] = self.tree_nodes / self.rounds if self.rounds else 0.0
        return d


def check_drafter(target: torch.nn.Module, drafter: Any, who: str = "drafter") -> None:
    """The drafter must be a DFlashDrafter fitting the target (hidden size, vocab, layers) on its device."""
    _check_ar(target, "target")
    if not isinstance(drafter, DFlashDrafter):
        raise ValueError(f"the {who} must be a DFlashDrafter, got {type(drafter).__name__}")
    try:
        check_target(drafter.config, target)
    except ValueError as e:
        raise ValueError(f"{who}: {e}") from None
    if _device(drafter) != _device(target):
        raise ValueError(f"the {who} is on {_device(drafter)} but the target is on {_device(target)}")


class _MeteredDrafter:
    """Calls a DFlash drafter and charges the meter with its context keys (C + W per window)."""

    def __init__(self, drafter: DFlashDrafter, meter: CostMeter, name: str):
        self.model, self.meter, self.name = drafter, meter, name

    def __call__(self, block_ids: Tensor, block_positions: Tensor, ctx_hidden: Tensor, ctx_positions: Tensor) -> Tensor:
        logits = self.model(block_ids, block_positions, ctx_hidden, ctx_positions)
        B, W = block_ids.shape
        n_keys = ctx_hidden.shape[1] + W
        # One row's windows share its context (computed once) and advance one sequence; the batch
        # size is recorded as max_batch.
        self.meter.record(self.name, B, W, n_keys, self.model.forward_flops(W, n_keys, windows=B), sequences=1)
        return logits


class _TargetState:
    """One row: committed tokens, the target cache (all but the anchor) and their hidden states."""

    def __init__(self, target: MeteredModel, prompt: list[int], layers: list[int], capacity: int):
        self.target, self.layers = target, layers
        device = _device(target.model)
        self.cache = _Cache.for_model(target.model, 1, capacity)
        H = target.config.hidden_size
        w = target.model.model.embed_tokens.weight
        self.hidden = torch.zeros(capacity, len(layers), H, device=device, dtype=w.dtype)
        out = target(torch.tensor([prompt], device=device), kv_cache=self.cache, hidden_layers=layers)
        self._store(0, torch.stack(out.hidden_states, dim=2)[0])
        self.first = int(out.logits[0, -1].argmax())
        self.seq = prompt + [self.first]

    @property
    def n_cached(self) -> int:
        return self.cache.length

    def _store(self, start: int, hidden: Tensor) -> None:
        self.hidden[start:start + hidden.shape[0]] = hidden

    def context(self, drafter: DFlashDrafter) -> tuple[Tensor, Tensor]:
        """(1, C, L·H) hidden states at this drafter's target_layers, and positions 0..C-1."""
        C = self.n_cached
        cols = [self.layers.index(i) for i in drafter.config.target_layers]
        ctx = self.hidden[:C, cols].reshape(1, C, -1)
        return ctx, torch.arange(C, device=ctx.device)

    def verify(self, tree: DraftTree) -> tuple[list[int], int]:
        """One target forward over all tree nodes; commit the anchor + accepted path. Returns (path, bonus)."""
        device = self.hidden.device
        C = self.n_cached
        ids = torch.tensor([tree.tokens], device=device)
        is_chain = all(p == n - 1 for n, p in enumerate(tree.parent))
        if is_chain:  # a single branch: the default causal mask and positions are the tree's
            out = self.target(ids, kv_cache=self.cache, hidden_layers=self.layers)
        else:
            out = self.target(ids, positions=tree.positions(C, device), kv_cache=self.cache,
                              attn_mask_override=tree.attention_mask(C, device)[None, None],
                              hidden_layers=self.layers)
        path, bonus = tree.accept(out.logits[0].argmax(-1).tolist())
        nodes = [0] + path
        self.cache.keep(C, [C + n for n in nodes])
        self._store(C, torch.stack(out.hidden_states, dim=2)[0, nodes])
        return path, bonus


def _block_draft(drafter: _MeteredDrafter, st: _TargetState, gamma: int, n_draft: int) -> tuple[list[int], Tensor]:
    """The block drafter's first n_draft drafts after the anchor (argmax) and their probabilities."""
    d = drafter.model
    C = st.n_cached
    block = torch.full((1, gamma), d.config.mask_token_id, device=st.hidden.device)
    block[0, 0] = st.seq[-1]
    logits = drafter(block, torch.arange(C, C + gamma, device=block.device), *st.context(d))
    conf, ids = torch.softmax(logits[0, 1:1 + n_draft].float(), dim=-1).max(dim=-1)
    return ids.tolist(), conf


def _vp_branches(vp: _MeteredDrafter, st: _TargetState, drafts: list[int], lengths: list[int], gamma2: int,
                 max_branch: int) -> list[list[int]]:
    """For each prefix length i: d_1..d_i then the VP drafter's fill, all windows in one batched call."""
    d = vp.model
    C = st.n_cached
    mask = d.config.mask_token_id
    windows = [[st.seq[-1]] + drafts[:i] + [mask] * (gamma2 - 1 - i) for i in lengths]
    ids = torch.tensor(windows, device=st.hidden.device)
    fill = vp(ids, torch.arange(C, C + gamma2, device=ids.device), *st.context(d)).argmax(-1).tolist()
    return [(drafts[:i] + fill[b][1 + i:])[:max_branch] for b, i in enumerate(lengths)]


def _decode_row(target: MeteredModel, drafter: _MeteredDrafter, vp: _MeteredDrafter | None, prompt: list[int],
                cfg: DFlashSpecConfig, eos: frozenset[int], stats: BlockSpecStats) -> list[int]:
    """Speculatively decode one row (DFlash when vp is None, else D²SD); returns its generated ids."""
    layers = sorted(set(drafter.model.config.target_layers) |
                    (set(vp.model.config.target_layers) if vp is not None else set()))
    d2 = cfg if vp is not None and isinstance(cfg, D2SDConfig) else None
    if vp is not None and d2 is None:
        raise ValueError("D²SD (a vp_drafter) needs a D2SDConfig")
    budget = cfg.max_new_tokens
    max_nodes = 1 + ((d2.k + 1) * (d2.gamma2 - 1) if d2 is not None else cfg.gamma - 1)  # tree size bound
    st = _TargetState(target, prompt, layers, len(prompt) + budget + max_nodes)
    out = [st.first]
    while len(out) < budget and not (cfg.stop_at_eos and out[-1] in eos):
        remaining = budget - len(out)
        n_draft = min(cfg.gamma - 1, remaining - 1)  # a round emits at most n_draft + 1 tokens
        branches: list[list[int]] = []
        if n_draft > 0:
            drafts, conf = _block_draft(drafter, st, cfg.gamma, n_draft)
            stats.drafter_forwards += 1
            if cfg.stop_at_eos:  # decoding stops at an EOS, so nothing drafted after one can be emitted
                drafts = _through_eos(drafts, eos)
                conf = conf[:len(drafts)]
            if vp is None or d2 is None:
                branches = [drafts]
            else:
                full = len(drafts)
                lengths = top_prefix_lengths(rejection_posterior(conf)[None], d2.k)[0]
                if full not in lengths:
                    lengths.append(full)  # the full first draft is always extended too
                ended = cfg.stop_at_eos and drafts[-1] in eos
                vp_lengths = [i for i in lengths if not (ended and i == full)]  # an EOS ends it: nothing to extend
                branches = [drafts] if ended else []
                if vp_lengths:
                    max_branch = min(d2.gamma2 - 1, remaining - 1)
                    filled = _vp_branches(vp, st, drafts, vp_lengths, d2.gamma2, max_branch)
                    branches += [_through_eos(b, eos) for b in filled] if cfg.stop_at_eos else filled
                    stats.vp_forwards += 1
                    stats.vp_windows += len(vp_lengths)
        tree = DraftTree.from_branches(st.seq[-1], branches)
        path, bonus = st.verify(tree)
        stats.rounds += 1
        stats.drafted += len(tree) - 1
        stats.accepted += len(path)
        stats.tree_nodes += len(tree)
        stats.max_tree_nodes = max(stats.max_tree_nodes, len(tree))
        new = [tree.tokens[n] for n in path] + [bonus]
        if cfg.stop_at_eos:
            new = _through_eos(new, eos)
        out += new
        st.seq += new
    return out


def _run(target: torch.nn.Module, drafter: DFlashDrafter, vp_drafter: DFlashDrafter | None, tokenizer: Tokenizer,
         prompts: Sequence[str], cfg: DFlashSpecConfig, meter: CostMeter | None, progress: bool,
         desc: str) -> GenerationResult:
    check_drafter(target, drafter, "drafter")
    if vp_drafter is not None:
        check_drafter(target, vp_drafter, "vp_drafter")
    meter = meter or CostMeter(primary="target")
    meter.primary = "target"
    t_metered = MeteredModel(target, meter, "target")
    d_metered = _MeteredDrafter(drafter, meter, "drafter")
    vp_metered = _MeteredDrafter(vp_drafter, meter, "vp_drafter") if vp_drafter is not None else None
    eos = _eos_ids(target)
    encoded = _encode(tokenizer, prompts, cfg, target.config.vocab_size, _max_positions(target))
    stats = BlockSpecStats()
    raw: list[list[int]] = []
    with torch.inference_mode(), meter.timed(_device(target)), \
            tqdm(total=len(encoded), desc=desc, disable=not progress, leave=False) as bar:
        for ids in encoded:
            raw.append(_decode_row(t_metered, d_metered, vp_metered, ids, cfg, eos, stats))
            bar.update(1)
    token_ids, texts = _finish(tokenizer, raw, eos, cfg, meter)
    return GenerationResult(token_ids, texts, meter, cfg, raw, stats=stats.summary())


def dflash_generate(
    target: torch.nn.Module,
    drafter: DFlashDrafter,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: DFlashSpecConfig,
    meter: CostMeter | None = None,
    *,
    progress: bool = False,
) -> GenerationResult:
    """Greedy decoding of `target` with one DFlash block draft (γ = cfg.gamma) per round, row by row."""
    if not isinstance(cfg, DFlashSpecConfig):
        raise ValueError(f"dflash_generate needs a DFlashSpecConfig (or D2SDConfig), got {type(cfg).__name__}")
    return _run(target, drafter, None, tokenizer, prompts, cfg, meter, progress, f"dflash[γ={cfg.gamma}]")


def d2sd_generate(
    target: torch.nn.Module,
    drafter: DFlashDrafter,
    vp_drafter: DFlashDrafter,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: D2SDConfig,
    meter: CostMeter | None = None,
    *,
    progress: bool = False,
) -> GenerationResult:
    """Greedy D²SD: block draft → top-k prefix lengths → VP branches → one tree verification per round."""
    if not isinstance(cfg, D2SDConfig):
        raise ValueError(f"d2sd_generate needs a D2SDConfig, got {type(cfg).__name__}")
    if vp_drafter is None:
        raise ValueError("d2sd_generate needs a vp_drafter (use dflash_generate for a single draft)")
    return _run(target, drafter, vp_drafter, tokenizer, prompts, cfg, meter, progress,
                f"d2sd[γ={cfg.gamma},γ₂={cfg.gamma2},k={cfg.k}]")
