"""DFlash single-draft speculative decoding and D²SD (draft trees from a block-diffusion drafter).

Both decode an AR target losslessly. Greedy (temperature 0): every emitted
token is the target's own argmax, so the output equals `ar_generate`'s greedy
output token for token. Sampled (temperature T > 0): every emitted token is
distributed exactly as the target's softmax(logits / T) at its prefix, so the
output has `ar_generate`'s sampling distribution (not its random stream); a
seeded generator (`cfg.seed`) makes a run reproducible. The drafters only
change how many tokens one target forward yields.

Per-row state between rounds (`_TargetState`): `seq` = prompt + generated;
the target's KV cache holds every committed token *except the anchor*
(seq[-1], whose K/V are computed as the first query of the next
verification), and a buffer holds the target hidden states (at the drafters'
`target_layers`) of exactly those cached tokens: the drafters' context.

DFlash round: the drafter fills [anchor, mask×(γ−1)] in one forward →
drafts d_1..d_{γ−1} → the target scores [anchor, d_1..] in one causal forward
over its cache → greedy: the longest prefix equal to the target's argmax is
accepted, plus the target's next token (bonus); sampled: the drafts are drawn
from the drafter's tempered distributions q_j and accepted by the standard
speculative-sampling rule (`speculative.ar.rejection_accept`) → the K/V and hidden
states of anchor + accepted drafts are kept, the rest dropped.

D²SD round: the block drafter gives drafts d (its argmax, at any temperature)
and confidences c (the drafter's probability of each, tempered when sampling)
→ `rejection_posterior(c)` over the rejection boundaries 0..n−1 → the K most
likely boundaries i (clipped to n) → the variable-prefix (VP) drafter fills
every window [anchor, d_1..d_i, mask…] of length γ₂, plus the window of the
whole first draft (extended to γ₂ as in the reference; not a K slot), in ONE
batched call → the branches are merged into a `DraftTree` → ONE target
forward over all tree nodes, with a tree attention mask (the committed prefix
from the cache + each node's own ancestors) and positions cache length +
depth → `tree.walk` with the target's argmax, or with one draw from the
target per visited node when sampling (recursive rejection sampling for
deterministic drafts, see `DraftTree.walk`) → the cache is compacted to the
anchor and the accepted path (`CausalKVCache.keep`), the bonus becomes the
new anchor. A single-branch tree is a chain, which is verified with the plain
causal mask, so greedy DFlash is literally D²SD with one branch and no VP drafter.

Rows are decoded one at a time (batch 1): rows accept different numbers of
tokens per round, so a batch would need ragged caches; as in `spec_generate`,
the per-row cost is what we measure. The VP drafter's batch is the number of
branches of one row.

Budget and EOS follow `ar_generate`: at most `gen_length` tokens per row
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
round, drafter/VP forwards and batch sizes, tree sizes, D²SD's anchored
boundaries per round and which branch each round's accepted path came from
(`BlockSpecStats`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from ..decoding.meter import CostMeter, MeteredModel
from ..decoding.runner import GenerationResult, eos_ids, model_device
from ..decoding.streamer import Streamer
from ..models.causal import CausalKVCache
from ..models.dflash import ContextKV, DFlashDrafter, check_target
from ..models.tokenizer import Tokenizer
from .ar import ARConfig, check_ar, probs, rejection_accept, run_rows, sample
from .round import Acceptance, Proposal, speculate, through_eos
from .sizing import (AUTO, CANDIDATES, DEFAULT_K, DRAFT_CANDIDATES, SHORTENED, SMALL_TREES, Candidate, auto_run,
                     calibration_context, candidates, forward_seconds, verified)
from .tree import DraftTree, rejection_posterior, top_prefix_lengths

__all__ = ["DFlashSpecConfig", "D2SDConfig", "BlockSpecStats", "dflash_generate", "d2sd_generate", "check_drafter"]

@dataclass(frozen=True)
class DFlashSpecConfig(ARConfig):
    """ARConfig plus `gamma`, the drafter's window γ (anchor + γ−1 drafts per round).

    temperature 0 is greedy and reproduces the target's greedy output token for
    token; temperature > 0 samples, with every token distributed exactly as the
    target's softmax(logits / T) (speculative sampling, seeded by `seed`).
    `batch_size` only matters for the AR baseline run with the same options;
    speculative rows are decoded one at a time.
    """

    gamma: int = 16
    # Drafts the target verifies a round (the first `drafts` of the window's γ − 1; 0: all of them).
    # On a CPU a verification costs by its length (benchmarks/verify-cost-cpu: 16 tokens 1.6x one
    # token at two threads), so drafts the drafter rarely gets right cost more than they return.
    # "auto": the count with the most tokens/s on this device (`speculative.sizing`).
    drafts: int | str = 0
    # A round verifies only its first draft when the drafter's confidence that its first two are
    # right (the product of their probabilities) is below this (0: never). On a CPU a verification
    # of two tokens costs about one token's forward and five cost ~1.3x (benchmarks/verify-cost-cpu),
    # so a round the drafter is unsure of is cheaper short. drafts=auto chooses it with the count.
    shorten_below: float = 0.0
    AUTO_FIELDS: ClassVar[tuple[str, ...]] = ("drafts",)

    def __post_init__(self) -> None:
        if self.gamma == AUTO:
            raise ValueError("gamma=auto sizes ar-spec's chain; dflash and d2sd keep the drafter's block γ and "
                             "size their rounds with drafts=auto (dflash) or k=auto (d2sd)")
        super().__post_init__()
        if self.gamma < 2:
            raise ValueError(f"gamma must be >= 2 (the anchor plus at least one draft), got {self.gamma}")
        if self.drafts != AUTO and not 0 <= self.drafts <= self.gamma - 1:
            raise ValueError(f"drafts (drafts verified a round) must be in 0..gamma-1 = 0..{self.gamma - 1} "
                             f"(0: all), got {self.drafts}")
        if not 0.0 <= self.shorten_below <= 1.0:
            raise ValueError(f"shorten_below (a confidence) must be in [0, 1], got {self.shorten_below}")
        if self.shorten_below and self.drafts == AUTO:
            raise ValueError("drafts=auto chooses shorten_below with the count; to set shorten_below, give drafts "
                             "as a number")
        if self.shorten_below and self.drafts == 1:
            raise ValueError("shorten_below shortens a round to its first draft: it needs drafts >= 2 (or 0: all)")

    @property
    def n_drafts(self) -> int:
        """Drafts a full round proposes: `drafts`, or all γ − 1 of the window."""
        if self.drafts == AUTO:
            raise ValueError("drafts='auto' is resolved when decoding starts (dflash_generate)")
        return self.drafts or self.gamma - 1


@dataclass(frozen=True)
class D2SDConfig(DFlashSpecConfig):
    """DFlashSpecConfig plus D²SD's `gamma2` (γ₂, the VP drafter's window, >= γ) and
    `k`, how many rejection boundaries (the most likely places where the target
    first rejects the block draft) are re-anchored by the VP drafter. A round has
    at most γ − 1 boundaries, so k is clipped to the round's number of drafts.
    The first draft's own branch (extended to γ₂) comes on top, so a tree has at
    most k + 1 branches."""

    gamma2: int = 32
    k: int | str = 4  # or "auto": the K with the most tokens/s on this device (`speculative.sizing`)
    # The most tokens a branch holds past the round's anchor (0: γ₂ − 1, the VP window's). The VP
    # drafter still fills its whole trained window; a cap only keeps the tree small where every
    # node costs (a CPU verifies 63 nodes at about 3.5x one token, benchmarks/verify-cost-cpu).
    branch: int = 0
    AUTO_FIELDS: ClassVar[tuple[str, ...]] = ("k", "drafts")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.drafts == AUTO:
            raise ValueError("drafts=auto sizes DFlash's chain; D²SD sizes its tree with k=auto (give drafts as a "
                             "number, or leave it at 0: all)")
        if self.shorten_below:
            raise ValueError("shorten_below shortens DFlash's chain; D²SD's tree re-anchors the drafts instead "
                             "(leave it at 0)")
        if self.k != AUTO and self.k < 1:
            raise ValueError(f"k (rejection boundaries re-anchored by the VP drafter) must be >= 1, got {self.k}")
        if self.gamma2 < self.gamma:
            raise ValueError(f"gamma2 (γ₂ = {self.gamma2}) must be >= gamma (γ = {self.gamma}): the VP drafter "
                             "extends prefixes of the first draft")
        if self.branch != 0 and not self.n_drafts <= self.branch <= self.gamma2 - 1:
            raise ValueError(f"branch (tokens a branch holds) must be 0 (γ₂ − 1) or in drafts..γ₂ − 1 = "
                             f"{self.n_drafts}..{self.gamma2 - 1}: a branch extends the verified drafts, got "
                             f"{self.branch}")


FIRST_DRAFT, NONE = "first_draft", "none"


def anchor_label(rank: int) -> str:
    """Stats label of the branch re-anchored at the rank-th most likely boundary (1 = most likely)."""
    return f"anchor_{rank}"


def _label_order(label: str) -> tuple[int, int]:
    if label == FIRST_DRAFT:
        return (0, 0)
    if label == NONE:
        return (2, 0)
    return (1, int(label.rsplit("_", 1)[1]))


@dataclass
class BlockSpecStats:
    """Per-run counters of DFlash / D²SD rounds; `summary()` adds the derived rates.

    Which branch won: the accepted path of a round is credited to the first
    branch containing it, the first-draft branch before the re-anchored ones
    (in posterior rank), so a re-anchored branch wins only when it got tokens
    accepted that the first draft did not offer; "none" is a round that
    accepted no draft (a correction token only).
    """

    rounds: int = 0  # target verification forwards (prefill excluded)
    drafted: int = 0  # draft tokens verified (tree nodes besides the anchor)
    accepted: int = 0
    drafter_forwards: int = 0
    vp_forwards: int = 0
    vp_windows: int = 0  # sum of VP batch sizes
    tree_nodes: int = 0  # sum over rounds, anchor included
    max_tree_nodes: int = 0
    anchored: int = 0  # D²SD: rejection boundaries re-anchored, summed over rounds with a block draft
    anchored_rounds: dict[str, int] = field(default_factory=dict)  # D²SD: rounds by boundaries anchored
    wins: dict[str, int] = field(default_factory=dict)  # rounds by winning branch (first_draft, anchor_r, none)
    win_accepted: dict[str, int] = field(default_factory=dict)  # accepted drafts by winning branch

    def record_anchored(self, n: int) -> None:
        self.anchored += n
        self.anchored_rounds[str(n)] = self.anchored_rounds.get(str(n), 0) + 1

    def record_win(self, label: str, n_accepted: int) -> None:
        self.wins[label] = self.wins.get(label, 0) + 1
        self.win_accepted[label] = self.win_accepted.get(label, 0) + n_accepted

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["acceptance_length"] = (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0
        d["mean_vp_batch"] = self.vp_windows / self.vp_forwards if self.vp_forwards else 0.0
        d["mean_tree_nodes"] = self.tree_nodes / self.rounds if self.rounds else 0.0
        anchored_rounds = sum(self.anchored_rounds.values())
        d["mean_anchored"] = self.anchored / anchored_rounds if anchored_rounds else 0.0
        d["anchored_rounds"] = dict(sorted(self.anchored_rounds.items(), key=lambda kv: int(kv[0])))
        order = sorted(self.wins, key=_label_order)
        d["wins"] = {b: self.wins[b] for b in order}
        d["win_accepted"] = {b: self.win_accepted[b] for b in order}
        d["mean_accepted_by_winner"] = {b: self.win_accepted[b] / self.wins[b] for b in order}
        return d


def check_drafter(target: torch.nn.Module, drafter: Any, who: str = "drafter") -> None:
    """The drafter must be a DFlashDrafter fitting the target (hidden size, vocab, layers) on its device."""
    check_ar(target, "target")
    if not isinstance(drafter, DFlashDrafter):
        raise ValueError(f"the {who} must be a DFlashDrafter, got {type(drafter).__name__}")
    try:
        check_target(drafter.config, target)
    except ValueError as e:
        raise ValueError(f"{who}: {e}") from None
    if model_device(drafter) != model_device(target):
        raise ValueError(f"the {who} is on {model_device(drafter)} but the target is on {model_device(target)}")


class _MeteredDrafter:
    """Calls a DFlash drafter and charges the meter with what it computed: the context cells new to
    the row's ContextKV, every window cell through the layers, and the `read` cells through the head."""

    def __init__(self, drafter: DFlashDrafter, meter: CostMeter, name: str):
        self.model, self.meter, self.name = drafter, meter, name
        self.params = drafter.num_params()  # counted once, not in every round

    def __call__(self, block_ids: Tensor, block_positions: Tensor, ctx_hidden: Tensor, ctx_positions: Tensor,
                 cache: ContextKV, read: Tensor, compact: bool = False) -> Tensor:
        """Logits (N, V) of the N cells of `read` (a CPU bool mask (B, W), so counting it never syncs);
        with `compact`, (N, Vd) over the draft vocabulary (`ids` maps their argmax to target ids)."""
        before = cache.length
        logits = self.model(block_ids, block_positions, ctx_hidden, ctx_positions, ctx_cache=cache,
                            read=read.to(block_ids.device, non_blocking=True), compact=compact)
        B, W = block_ids.shape
        n_keys = ctx_hidden.shape[1] + W
        # One row's windows share its context (computed once) and advance one sequence; the batch
        # size is recorded as max_batch.
        n_logits = self.model.head_rows(int(read.sum()), read.numel())
        flops = self.model.forward_flops(W, n_keys, windows=B, n_ctx=cache.length - before, n_logits=n_logits)
        self.meter.record(self.name, B, W, n_keys, flops, sequences=1, params=self.params)
        return logits

    def ids(self, columns: Tensor) -> Tensor:
        """Target ids of columns of `compact` logits."""
        vocab = self.model.compact_ids()
        return columns if vocab is None else vocab[columns]


class _TargetState:
    """One row: committed tokens, the target cache (all but the anchor) and their hidden states."""

    def __init__(self, target: MeteredModel, prompt: list[int], layers: list[int], capacity: int,
                 temperature: float, generator: torch.Generator, drafters: Sequence[_MeteredDrafter] = ()):
        self.target, self.layers = target, layers
        # each drafter's context keys/values, extended as tokens are committed
        self.ctx_kv = {id(d.model): ContextKV(d.model, capacity) for d in drafters}
        device = model_device(target.model)
        self.cache = CausalKVCache.for_model(target.model, 1, capacity)
        H = target.config.hidden_size
        w = target.model.model.embed_tokens.weight
        self.hidden = torch.zeros(capacity, len(layers), H, device=device, dtype=w.dtype)
        out = target(torch.tensor([prompt], device=device), kv_cache=self.cache, hidden_layers=layers)
        self._store(0, torch.stack(out.hidden_states, dim=2)[0])
        self.first = int(sample(out.logits[0, -1], temperature, generator))
        self.seq = prompt + [self.first]
        self._scored: tuple[int, Any] | None = None  # the last `score`: cache length and hidden states

    @property
    def n_cached(self) -> int:
        return self.cache.length

    def _store(self, start: int, hidden: Tensor) -> None:
        self.hidden[start:start + hidden.shape[0]] = hidden

    def context(self, drafter: DFlashDrafter) -> tuple[Tensor, Tensor]:
        """(1, C, L·H) hidden states at this drafter's target_layers, and positions 0..C-1."""
        C = self.n_cached
        cols = [self.layers.index(i) for i in drafter.config.target_layers]
        if cols == list(range(cols[0], cols[0] + len(cols))):  # a view, no copy (~0.7 ms at C = 300)
            ctx = self.hidden[:C, cols[0]:cols[0] + len(cols)].reshape(1, C, -1)
        else:
            ctx = self.hidden[:C, cols].reshape(1, C, -1)
        return ctx, torch.arange(C, device=ctx.device)

    def score(self, tree: DraftTree) -> Tensor:
        """One target forward over all tree nodes: logits (N, V). A single branch is verified with
        the plain causal mask and positions, which are the tree's."""
        device = self.hidden.device
        C = self.n_cached
        ids = torch.tensor([tree.tokens], device=device)
        is_chain = all(p == n - 1 for n, p in enumerate(tree.parent))
        if is_chain:
            out = self.target(ids, kv_cache=self.cache, hidden_layers=self.layers)
        else:
            out = self.target(ids, positions=tree.positions(C, device), kv_cache=self.cache,
                              attn_mask_override=tree.attention_mask(C, device)[None, None],
                              hidden_layers=self.layers)
        self._scored = (C, out.hidden_states)
        return out.logits[0]

    def commit(self, path: list[int], new: list[int]) -> None:
        """Keep the anchor and the accepted `path` (K/V and hidden states), append `new` to the row."""
        if self._scored is None:
            raise RuntimeError("commit before score")
        (C, hidden), self._scored = self._scored, None
        nodes = [0] + path
        self.cache.keep(C, [C + n for n in nodes])
        self._store(C, torch.stack(hidden, dim=2)[0, nodes])
        self.seq += new


# ---------------------------------------------------------------- drafting


def _block_logits(drafter: _MeteredDrafter, st: _TargetState, gamma: int, n_draft: int,
                  compact: bool = False) -> Tensor:
    """The block drafter's logits (n_draft, V) for the n_draft positions after the anchor (the only ones
    that go through its head); `compact`: over its draft vocabulary (`_MeteredDrafter.ids`)."""
    d = drafter.model
    C = st.n_cached
    block = torch.full((1, gamma), d.config.mask_token_id, device=st.hidden.device)
    block[0, 0] = st.seq[-1]
    read = torch.zeros(1, gamma, dtype=torch.bool)
    read[0, 1:1 + n_draft] = True
    return drafter(block, torch.arange(C, C + gamma, device=block.device), *st.context(d), st.ctx_kv[id(d)], read,
                   compact)


def _pick_drafts(logits: Tensor, temperature: float, sampled: bool, generator: torch.Generator,
                 to_ids: Callable[[Tensor], Tensor] | None = None) -> tuple[list[int], Tensor, Tensor | None]:
    """(drafts, conf, q): the drafted tokens, the drafter's probability of each, and q (n, V).

    Greedy, or `sampled` False: the argmax, with softmax(logits / T) confidences
    (T = 1 when greedy) and q None, i.e. a deterministic draft. `sampled` (DFlash
    at T > 0): each position drawn independently from q_j = softmax(logits_j / T).
    The block drafter fills all positions in one forward from [anchor, mask…], so
    q_j does not depend on d_1..d_{j−1}: d_j ~ q_j is what the speculative-sampling
    rule needs at every step of the chain. `to_ids` maps the argmax columns of compact
    (draft-vocabulary) logits to target ids; sampling needs q over the whole vocabulary.
    """
    if temperature == 0 or not sampled:
        conf, ids = probs(logits, temperature or 1.0).max(dim=-1)
        return (ids if to_ids is None else to_ids(ids)).tolist(), conf, None
    if to_ids is not None:
        raise ValueError("sampled drafts need the drafter's logits over the whole vocabulary, not compact ones")
    q = probs(logits, temperature)
    ids = sample(logits, temperature, generator)
    return ids.tolist(), q.gather(-1, ids[:, None])[:, 0], q


def _vp_branches(vp: _MeteredDrafter, st: _TargetState, drafts: list[int], lengths: list[int], gamma2: int,
                 max_branch: int) -> list[list[int]]:
    """For each prefix length i: d_1..d_i then the VP drafter's fill (argmax), all windows in one batched call."""
    d = vp.model
    C = st.n_cached
    mask = d.config.mask_token_id
    windows = [[st.seq[-1]] + drafts[:i] + [mask] * (gamma2 - 1 - i) for i in lengths]
    ids = torch.tensor(windows, device=st.hidden.device)
    read = torch.zeros(len(lengths), gamma2, dtype=torch.bool)  # the cells a branch keeps: 1 + i .. max_branch
    for b, i in enumerate(lengths):
        read[b, 1 + i:1 + max_branch] = True
    flat = vp.ids(vp(ids, torch.arange(C, C + gamma2, device=ids.device), *st.context(d), st.ctx_kv[id(d)],
                     read, compact=True).argmax(-1)).tolist()
    out, at = [], 0
    for i in lengths:
        n = max(0, min(gamma2, 1 + max_branch) - (1 + i))
        out.append((drafts[:i] + flat[at:at + n])[:max_branch])
        at += n
    return out


def _d2sd_branches(vp: _MeteredDrafter, st: _TargetState, drafts: list[int], conf: Tensor, cfg: D2SDConfig,
                   remaining: int, eos: frozenset[int], stats: BlockSpecStats) -> tuple[list[list[int]], list[str]]:
    """The first-draft branch, then one VP branch per anchored boundary (most likely first), and their labels.

    The K anchors are true rejection boundaries i in 0..n−1 (n = len(drafts)),
    clipped to n, as in the paper (Eq. 5) and the D2-SD reference; the first
    draft's own branch is d_1..d_n extended by the VP drafter, added on top and
    never competing for a K slot (in the reference too: its top-k runs over the
    n boundaries only, and the full draft is prepended as one more window).
    Boundaries are all < n, so no anchor duplicates the first-draft branch. The
    whole-draft window is skipped when nothing can follow it (the draft ended in
    an EOS, or it already fills the VP window or the budget); the first-draft
    branch is then the draft itself, as in the reference when γ₂ = γ.
    """
    full = len(drafts)
    boundaries = top_prefix_lengths(rejection_posterior(conf)[None], cfg.k)[0]
    max_branch = min(cfg.branch or cfg.gamma2 - 1, remaining - 1)  # a round emits at most max_branch + 1 tokens
    ended = cfg.stop_at_eos and drafts[-1] in eos  # an EOS ends it: nothing to extend
    extend = not ended and full < max_branch
    windows = ([full] if extend else []) + boundaries
    filled = _vp_branches(vp, st, drafts, windows, cfg.gamma2, max_branch)
    if cfg.stop_at_eos:
        filled = [through_eos(b, eos) for b in filled]
    stats.vp_forwards += 1
    stats.vp_windows += len(windows)
    stats.record_anchored(len(boundaries))
    first = filled.pop(0) if extend else drafts
    return [first] + filled, [FIRST_DRAFT] + [anchor_label(r) for r in range(1, len(boundaries) + 1)]


# ---------------------------------------------------------------- verification rules


def _greedy_walk(tree: DraftTree, logits: Tensor) -> tuple[list[int], int]:
    """Follow the target's argmax through the tree (lossless for greedy decoding)."""
    return tree.accept(logits.argmax(-1).tolist())


def _chain_accept(tree: DraftTree, logits: Tensor, q: Tensor, temperature: float,
                  generator: torch.Generator) -> tuple[list[int], int]:
    """DFlash at T > 0: a chain of drafts d_j ~ q_j, accepted by the standard speculative-sampling rule."""
    k, token = rejection_accept(probs(logits, temperature), q, tree.tokens[1:], generator)
    return list(range(1, k + 1)), token


def _sampled_walk(tree: DraftTree, logits: Tensor, temperature: float,
                  generator: torch.Generator) -> tuple[list[int], int]:
    """D²SD at T > 0: recursive rejection sampling over each node's children with one-hot q.

    D²SD's drafts are deterministic (argmax). That is a choice for exactness:
    with sampled drafts, which boundaries get a branch depends on the drafted
    tokens' own probabilities, and branches that repeat a token merge in the
    trie, so a first-draft token met again after a re-anchored branch was taken
    would no longer be distributed as its q, and the recursive rule would be
    biased. With deterministic drafts each child is proposed with q = one-hot,
    which the rule handles exactly for any tree (see `DraftTree.walk`): one
    target draw per visited node.
    """
    return tree.walk(lambda n: int(sample(logits[n], temperature, generator)))


def _acceptance(tree: DraftTree, temperature: float, chain_q: Tensor | None, generator: torch.Generator) -> Acceptance:
    if temperature == 0:
        return lambda logits: _greedy_walk(tree, logits)
    if chain_q is not None:
        return lambda logits: _chain_accept(tree, logits, chain_q, temperature, generator)
    return lambda logits: _sampled_walk(tree, logits, temperature, generator)


# ---------------------------------------------------------------- the decoding loop


def _decode_row(target: MeteredModel, drafter: _MeteredDrafter, vp: _MeteredDrafter | None, prompt: list[int],
                cfg: DFlashSpecConfig, eos: frozenset[int], stats: BlockSpecStats,
                generator: torch.Generator, streamer: Streamer | None = None) -> list[int]:
    """Speculatively decode one row (DFlash when vp is None, else D²SD); returns its generated ids.
    `streamer` hears each round's accepted tokens (as row 0) and may end the row early."""
    layers = sorted(set(drafter.model.config.target_layers) |
                    (set(vp.model.config.target_layers) if vp is not None else set()))
    d2 = cfg if vp is not None and isinstance(cfg, D2SDConfig) else None
    if vp is not None and d2 is None:
        raise ValueError("D²SD (a vp_drafter) needs a D2SDConfig")
    T, budget = cfg.temperature, cfg.gen_length
    max_nodes = 1 + ((d2.k + 1) * (d2.branch or d2.gamma2 - 1) if d2 is not None else cfg.n_drafts)  # tree bound
    st = _TargetState(target, prompt, layers, len(prompt) + budget + max_nodes, T, generator,
                      [drafter] + ([vp] if vp is not None else []))
    spec = _BlockSpeculator(st, drafter, vp, cfg, d2, eos, stats, generator, streamer)
    return speculate(spec, st.first, budget, eos=eos, stop_at_eos=cfg.stop_at_eos, stats=stats, streamer=streamer,
                     on_round=spec.record)


class _BlockSpeculator:
    """DFlash's and D²SD's side of a round (`speculative.round`): the block drafter's first draft,
    and for D²SD the VP drafter's re-anchored branches, as one tree over the row's `_TargetState`."""

    def __init__(self, st: _TargetState, drafter: _MeteredDrafter, vp: _MeteredDrafter | None, cfg: DFlashSpecConfig,
                 d2: D2SDConfig | None, eos: frozenset[int], stats: BlockSpecStats, generator: torch.Generator,
                 streamer: Streamer | None = None):
        self.st, self.drafter, self.vp, self.cfg, self.d2 = st, drafter, vp, cfg, d2
        self.eos, self.stats, self.generator, self.streamer = eos, stats, generator, streamer

    def propose(self, remaining: int) -> Proposal:
        cfg, d2, T = self.cfg, self.d2, self.cfg.temperature
        n_draft = min(cfg.n_drafts, remaining - 1)  # a round emits at most n_draft + 1 tokens
        branches: list[list[int]] = []
        labels: list[str] = []
        q: Tensor | None = None
        if n_draft > 0:
            sampled = d2 is None and T > 0  # DFlash's sampled chain needs q over the whole vocabulary
            logits = _block_logits(self.drafter, self.st, cfg.gamma, n_draft, compact=not sampled)
            drafts, conf, q = _pick_drafts(logits, T, sampled, self.generator,
                                           None if sampled else self.drafter.ids)
            self.stats.drafter_forwards += 1
            if self.streamer is not None:
                self.streamer.on_draft(0, conf.tolist())
            if cfg.shorten_below:  # unsure of the first two: verify one (see DFlashSpecConfig; 0 for D²SD)
                n = verified(len(drafts), cfg.shorten_below, conf[:2].tolist())
                drafts, conf = drafts[:n], conf[:n]
                q = q[:n] if q is not None else None
            if cfg.stop_at_eos:  # decoding stops at an EOS, so nothing drafted after one can be emitted
                drafts = through_eos(drafts, self.eos)
                conf = conf[:len(drafts)]
                q = q[:len(drafts)] if q is not None else None
            if d2 is None:
                branches, labels = [drafts], [FIRST_DRAFT]
            else:
                assert self.vp is not None
                branches, labels = _d2sd_branches(self.vp, self.st, drafts, conf, d2, remaining, self.eos, self.stats)
        tree = DraftTree.from_branches(self.st.seq[-1], branches)
        return Proposal(tree, _acceptance(tree, T, q, self.generator), labels)

    def score(self, proposal: Proposal) -> Tensor:
        return self.st.score(proposal.tree)

    def commit(self, proposal: Proposal, path: list[int], new: list[int]) -> None:
        self.st.commit(path, new)

    def record(self, proposal: Proposal, path: list[int]) -> None:
        self.stats.tree_nodes += len(proposal.tree)
        self.stats.max_tree_nodes = max(self.stats.max_tree_nodes, len(proposal.tree))
        winner = proposal.tree.branch_of(path)
        self.stats.record_win(NONE if winner is None else proposal.labels[winner], len(path))


def _run(target: torch.nn.Module, drafter: DFlashDrafter, vp_drafter: DFlashDrafter | None, tokenizer: Tokenizer,
         prompts: Sequence[str], cfg: DFlashSpecConfig, meter: CostMeter | None, progress: bool,
         desc: str, streamer: Streamer | None = None) -> GenerationResult:
    check_drafter(target, drafter, "drafter")
    if vp_drafter is not None:
        check_drafter(target, vp_drafter, "vp_drafter")
    meter = meter or CostMeter(primary="target")
    meter.primary = "target"
    t_metered = MeteredModel(target, meter, "target")
    d_metered = _MeteredDrafter(drafter, meter, "drafter")
    vp_metered = _MeteredDrafter(vp_drafter, meter, "vp_drafter") if vp_drafter is not None else None
    eos = eos_ids(target)
    generator = torch.Generator(device=model_device(target)).manual_seed(cfg.seed)
    stats = BlockSpecStats()
    with torch.inference_mode():
        res = run_rows(target, tokenizer, prompts, cfg, meter,
                       lambda rows, stream=None: [_decode_row(t_metered, d_metered, vp_metered, rows[0], cfg, eos,
                                                              stats, generator, stream)],
                       desc, progress, batch_size=1, streamer=streamer)
    res.stats = stats.summary()
    return res


def dflash_generate(
    target: torch.nn.Module,
    drafter: DFlashDrafter,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: DFlashSpecConfig,
    meter: CostMeter | None = None,
    *,
    progress: bool = False,
    streamer: Streamer | None = None,
) -> GenerationResult:
    """Decode `target` with one DFlash block draft (γ = cfg.gamma) per round, row by row: greedy at
    temperature 0, exact speculative sampling (drafts drawn from the drafter) otherwise."""
    if not isinstance(cfg, DFlashSpecConfig):
        raise ValueError(f"dflash_generate needs a DFlashSpecConfig (or D2SDConfig), got {type(cfg).__name__}")
    if cfg.drafts != AUTO:
        return _run(target, drafter, None, tokenizer, prompts, cfg, meter, progress, f"dflash[γ={cfg.gamma}]",
                    streamer)
    layers = list(drafter.config.target_layers)  # a verification also returns these hidden states

    def verify_seconds(ns: list[int]) -> dict[int, float]:  # n drafts: a verification of n + 1 tokens
        t = forward_seconds(target, calibration_context(tokenizer.encode(prompts[0])), [n + 1 for n in ns],
                            hidden_layers=layers)
        return {n: t[n + 1] for n in ns}

    shortened = [(("drafts", n), ("shorten_below", t)) for n, t in SHORTENED if n <= cfg.gamma - 1]
    return auto_run(target, [drafter], prompts, cfg, "drafts",
                     [*candidates(cfg.gamma, DRAFT_CANDIDATES, most=True), *shortened], cfg.gamma - 1,
                     lambda ps, c, m, p=False, s=None: dflash_generate(target, drafter, tokenizer, ps, c, m,
                                                                       progress=p, streamer=s),
                     meter, progress, streamer, verify_seconds)


def tree_candidates(cfg: D2SDConfig) -> list[Candidate]:
    """What k=auto times: each K (a round has n_drafts boundaries, so a larger K only repeats
    K = n_drafts) and, when drafts and branch are left at their defaults, the small trees of
    `sizing.SMALL_TREES` that fit the windows: the device picks between a GPU's wide tree and a
    CPU's narrow one."""
    out: list[Candidate] = list(candidates(cfg.n_drafts + 1, CANDIDATES))
    if cfg.drafts == 0 and cfg.branch == 0:
        out += [(("k", k), ("drafts", d), ("branch", b)) for k, d, b in SMALL_TREES
                if d <= cfg.gamma - 1 and k <= d and d <= b <= cfg.gamma2 - 1]
    return out


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
    streamer: Streamer | None = None,
) -> GenerationResult:
    """D²SD: block draft → top-k rejection boundaries → VP branches → one tree verification per round
    (greedy at temperature 0, exact recursive rejection sampling over the tree otherwise)."""
    if not isinstance(cfg, D2SDConfig):
        raise ValueError(f"d2sd_generate needs a D2SDConfig, got {type(cfg).__name__}")
    if vp_drafter is None:
        raise ValueError("d2sd_generate needs a vp_drafter (use dflash_generate for a single draft)")
    if cfg.k != AUTO:
        return _run(target, drafter, vp_drafter, tokenizer, prompts, cfg, meter, progress,
                    f"d2sd[γ={cfg.gamma},γ₂={cfg.gamma2},k={cfg.k}]", streamer)
    return auto_run(target, [drafter, vp_drafter], prompts, cfg, "k", tree_candidates(cfg), DEFAULT_K,
                     lambda ps, c, m, p=False, s=None: d2sd_generate(target, drafter, vp_drafter, tokenizer, ps, c, m,
                                                                     progress=p, streamer=s),
                     meter, progress, streamer)
