"""Train a DFlash block drafter (kind "dflash") or D²SD's variable-prefix drafter (kind "vp").

Data are the frozen target's OWN greedy continuations, since those are the
tokens the drafter must match at inference, with the target's hidden states
at the drafter's `target_layers` taken from the same KV-cached pass
(`train.distill`: generated once in chunks, cached in `data.cache`, default
`state_dir/continuations`, so a resume or a second drafter of the same target
does not regenerate; `data.hidden_dtype`, default float16). Prompts come from
`data.source`: the arith task, or GSM8K train questions in the target's chat
template (see `train.distill`). A target with its own tokenizer (SmolLM2)
needs no `tokenizer_from`; the drafter's mask cell is the token `mask_token`
names (default the arith tokenizer's mask; SmolLM2 has no mask token, so its
configs name an unused special token whose frozen embedding the drafter
learns to read as "to be drafted").

A training window starts at an anchor position a inside the answer (the last
committed token at inference) and is laid out exactly as `spec/d2sd.py`
builds it: positions a..a+W-1, context = target hidden states of tokens
0..a-1 (ctx_mask hides the rest of the padded sequence).
  dflash: [anchor, mask×(γ−1)], W = γ = model.block_size;
  vp:     [anchor, t_1..t_i, mask…], W = γ₂ = model.block_size, with i drawn
          uniformly from [0, data.gamma − 1] (the prefix lengths D²SD re-anchors).
Labels are the target's tokens at the masked positions; positions past the
end of the answer are ignored. Loss: cross-entropy on masked positions,
optionally weighted exp(−k / data.loss_decay) for the k-th masked position
(early drafts matter most for acceptance). Only the drafter's own weights
train; the target (and so the shared embedding / LM head) stays frozen.
With `data.draft_vocab` (a size N) the drafter trains and ships with a draft
vocabulary: the N tokens the target writes most often in its training answers
(plus EOS), written beside the weights as draft_vocab.json. Its head reads
N × hidden weights instead of the whole vocabulary's, at inference and in
every training step.

Validation: mean accepted length, i.e. how many leading masked positions
the drafter's argmax gets right against the target's tokens, over every
anchor of `eval_n` held-out prompts (for vp with a fixed seeded prefix length
per anchor). A DFlash round then yields about that many tokens plus one.

`train.stages` (see `train.common.stage_plan`) may give each stage its own
`train_pool`: a later stage trains on answers generated after the first
began, while the draft vocabulary stays the first stage's.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..decoding.runner import eos_ids
from ..models.checkpoint import DTYPES
from ..models.dflash import DFlashConfig, DFlashDrafter, save_dflash
from ..models.draft_vocab import DRAFT_VOCAB_FILE, read_draft_vocab
from ..models.tokenizer import MASK_TOKEN, Tokenizer
from .common import TOP_KEYS, TRAIN_KEYS, Schema, boolean, choice, dataclass_section, integer, number, setup, \
    stages_check, text, train_loop
from . import distill
from .distill import (SOURCES, Seq, cached_continuations, continuation_meta, load_target, source_prompts, target_dir,
                      target_tokenizer)

__all__ = ["train_dflash", "WindowData", "SCHEMA"]

KINDS = ("dflash", "vp")
# Every key `train_dflash` reads; anything else in a config is refused (see train.common).
# data.gamma (the prefix lengths D²SD re-anchors) belongs to kind vp only.
SCHEMA: Schema = {
    **TOP_KEYS,
    "target": text,
    "kind": choice(*KINDS),
    "mask_token": text,
    "save_dtype": choice(*DTYPES),
    "model": dataclass_section(DFlashConfig, derived={"hidden_size": "the target", "vocab_size": "the target",
                                                      "mask_token_id": "the tokenizer"}),
    "data": {"pool": integer(1), "gen_length": integer(1), "anchors_per_seq": integer(1), "gamma": integer(2),
             "loss_decay": number(0), "hidden_dtype": choice(*DTYPES), "source": choice(*SOURCES),
             "questions": text, "chat": boolean, "system": text, "cache": text, "gen_batch_size": integer(1),
             "manifest": text, "draft_vocab": integer(1), "train_pool": integer(1)},
    # A stage may train on more of the pool than the one before (data.train_pool is the default).
    "train": {**TRAIN_KEYS, "stages": stages_check({"train_pool": integer(1)})},
}


class WindowData:
    """Drafter windows over target continuations with their hidden states (see the module docstring)."""

    def __init__(self, seqs: list[Seq], hidden: list[Tensor], kind: str, width: int, gamma: int, mask_id: int,
                 seed: int):
        keep = [i for i, (p, a) in enumerate(seqs) if len(a) >= 2]  # an anchor needs one token after it
        self.seqs, self.hidden = [seqs[i] for i in keep], [hidden[i] for i in keep]
        self._kept_index = keep
        self.active = len(self.seqs)
        if not self.seqs:
            raise ValueError("no target continuation has two or more tokens; nothing to draft")
        self.kind, self.W, self.gamma, self.mask = kind, width, gamma, mask_id
        self.rng = random.Random(seed)

    def use_first(self, n: int) -> None:
        """Draw training batches from the sequences among the first `n` given (a stage's train_pool)."""
        self.active = sum(1 for i in self._kept_index if i < n)
        if not self.active:
            raise ValueError(f"none of the first {n} target continuations has two or more tokens")

    def _window(self, j: int, a: int, i: int) -> tuple[list[int], list[int]]:
        """(window ids, labels with -100 where there is no loss) for sequence j, anchor a, i visible drafts."""
        p, ans = self.seqs[j]
        full, end = p + ans, len(p) + len(ans)
        i = min(i, end - a - 2, self.W - 2)  # leave at least one labelled masked position
        ids, labels = [full[a]], [-100]
        for m in range(1, self.W):
            pos = a + m
            if m <= i:
                ids.append(full[pos])
                labels.append(-100)
            else:
                ids.append(self.mask)
                labels.append(full[pos] if pos < end else -100)
        return ids, labels

    def _prefix(self, rng: random.Random) -> int:
        return rng.randrange(self.gamma) if self.kind == "vp" else 0

    def batch(self, windows: list[tuple[int, int, int]], device: torch.device) -> dict[str, Tensor]:
        """Tensors for windows (sequence j, anchor a, visible prefix i), context padded to the longest."""
        seq_ids = sorted({j for j, _, _ in windows})
        slot = {j: s for s, j in enumerate(seq_ids)}
        T = max(self.hidden[j].shape[0] for j in seq_ids)
        ctx = torch.zeros(len(seq_ids), T, self.hidden[seq_ids[0]].shape[1])
        for s, j in enumerate(seq_ids):
            ctx[s, :self.hidden[j].shape[0]] = self.hidden[j].float()
        rows = [self._window(j, a, i) for j, a, i in windows]
        anchors = torch.tensor([a for _, a, _ in windows])
        return {
            "block_ids": torch.tensor([r[0] for r in rows]).to(device),
            "labels": torch.tensor([r[1] for r in rows]).to(device),
            "block_positions": (anchors[:, None] + torch.arange(self.W)).to(device),
            "ctx_hidden": ctx.to(device),  # one row per sequence, shared by its windows (ctx_index)
            "ctx_index": torch.tensor([slot[j] for j, _, _ in windows]).to(device),
            "ctx_positions": torch.arange(T, device=device),
            "ctx_mask": (torch.arange(T)[None, :] < anchors[:, None]).to(device),
        }

    def sample(self, n_seqs: int, per_seq: int, device: torch.device) -> dict[str, Tensor]:
        """A training batch: n_seqs random sequences × per_seq random anchors in each answer."""
        windows = []
        for j in self.rng.sample(range(self.active), min(n_seqs, self.active)):
            p, ans = self.seqs[j]
            for _ in range(per_seq):
                windows.append((j, self.rng.randrange(len(p), len(p) + len(ans) - 1), self._prefix(self.rng)))
        return self.batch(windows, device)

    def all_windows(self, seed: int = 0) -> list[list[tuple[int, int, int]]]:
        """Every anchor of every sequence, grouped by sequence (fixed prefix lengths for vp)."""
        rng = random.Random(seed)
        return [[(j, a, self._prefix(rng)) for a in range(len(p), len(p) + len(ans) - 1)]
                for j, (p, ans) in enumerate(self.seqs)]


def window_loss(drafter: DFlashDrafter, b: dict[str, Tensor], decay: float = 0.0) -> Tensor:
    """Cross-entropy on labelled (masked, in-answer) positions, weighted exp(-k/decay) by masked index k.

    With a draft vocabulary the head and the softmax run over its columns only (on SmolLM2 the full
    49 k-column head was most of a training step), and a label outside it is not trained on: the
    drafter can never propose it, and the target writes it in its own verification step."""
    small = getattr(drafter, "draft_vocab", None) is not None
    logits = drafter(b["block_ids"], b["block_positions"], b["ctx_hidden"], b["ctx_positions"], b["ctx_mask"],
                     b["ctx_index"], **({"draft_space": True} if small else {}))
    labels = b["labels"]
    if small:
        lut = labels.new_full((drafter.config.vocab_size,), -100)
        lut[drafter.draft_vocab] = torch.arange(len(drafter.draft_vocab), device=labels.device)
        labels = torch.where(labels == -100, labels, lut[labels.clamp(min=0)])
    valid = labels != -100
    if not valid.any():  # every label outside the draft vocabulary: nothing to learn from this batch
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits[valid].float(), labels[valid], reduction="none")
    if not decay:
        return ce.mean()
    masked = b["block_ids"] == drafter.config.mask_token_id
    k = (masked.long().cumsum(-1) - 1).clamp(min=0)  # 0 for the first masked position of each window
    w = torch.exp(-k[valid].float() / decay)
    return (ce * w).sum() / w.sum()


@torch.no_grad()
def accepted_length(drafter: DFlashDrafter, data: WindowData, device: torch.device) -> float:
    """Mean number of leading masked positions whose argmax equals the target's token, over all anchors."""
    total, n = 0, 0
    for windows in data.all_windows():
        b = data.batch(windows, device)
        pred = drafter(b["block_ids"], b["block_positions"], b["ctx_hidden"], b["ctx_positions"],
                       b["ctx_mask"], b["ctx_index"]).argmax(-1)
        masked = b["block_ids"] == drafter.config.mask_token_id
        hit = (pred == b["labels"]) | ~masked  # visible positions do not break the run
        run = hit.long().cumprod(-1)
        total += int((run.bool() & masked).sum())
        n += len(windows)
    return total / max(n, 1)


def training_vocab(dcfg: dict[str, Any], state_dir: Path, seqs: list[Seq], eos: frozenset[int], resume: bool
                   ) -> list[int] | None:
    """The draft vocabulary a drafter trains with (data.draft_vocab: its size), or None for the full one:
    the most frequent tokens of the target's own training answers, plus its EOS ids.

    It is kept in the state directory so that a resumed run, whose cache may have grown since, keeps
    the columns its head was trained on."""
    size = dcfg.get("draft_vocab")
    kept = Path(state_dir) / "training_vocab.json"  # not draft_vocab.json: out and state may share a folder
    if size is None:
        return None
    if resume and kept.is_file():
        saved = json.loads(kept.read_text())
        if saved.get("size") != size:
            raise ValueError(f"{kept} was made for data.draft_vocab {saved.get('size')}, the config now says {size}; "
                             "train from scratch (without --resume) to change the draft vocabulary")
        return read_draft_vocab(kept)
    counts: dict[int, int] = {}
    for _, ans in seqs:
        for t in ans:
            counts[t] = counts.get(t, 0) + 1
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    ids = list(dict.fromkeys([*ranked[:size], *sorted(eos)]))
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"size": size, "ids": ids}) + "\n")
    return ids


def pool_prompts(cfg: dict[str, Any], dcfg: dict[str, Any], n_val: int, seed: int, data_only: bool
                 ) -> tuple[list[str], list[str], list[int]]:
    """(train prompts to read, validation prompts, how many train answers each stage trains on):
    data.train_pool (or a stage's train_pool) trains on the pool's first answers (--data-only makes
    them all), read as whole cache chunks (a chunk is made for its 64 prompts) and cut after."""
    pool = int(dcfg.get("pool", 2000))
    train_prompts, val_prompts = source_prompts(dcfg, pool, n_val, seed, target_dir(cfg))
    n_train = len(train_prompts)
    default = dcfg.get("train_pool", n_train)  # a stage without train_pool trains on data.train_pool, else all
    pools = [stage.get("train_pool", default) for stage in cfg["train"].get("stages") or [{}]]
    if not data_only:
        if max(pools) > pool:
            raise ValueError(f"data.train_pool and train.stages' train_pool ({max(pools)}) must be <= data.pool "
                             f"({pool})")
        train_prompts = train_prompts[:-(-max(pools) // distill.CHUNK) * distill.CHUNK]
    return train_prompts, val_prompts, pools


def mask_id_of(cfg: dict[str, Any], tok: Tokenizer, target: torch.nn.Module) -> int:
    """The id of the drafter's mask cell: a special token of the target's tokenizer it never writes."""
    name = cfg.get("mask_token", MASK_TOKEN)
    mask_id = tok.token_to_id(name)
    if mask_id is None:
        raise ValueError(f"the tokenizer has no token {name!r} for the drafter's mask cell; set mask_token to one "
                         "of its special tokens that the target never writes")
    if mask_id in eos_ids(target):
        raise ValueError(f"mask_token {name!r} is one of the target's EOS ids; pick a token the target never writes")
    return mask_id


def train_dflash(config_path: str | Path, kind: str = "dflash", out: str | Path | None = None, resume: bool = False,
                 device: str | None = None, max_steps: int | None = None, data_only: bool = False,
                 shard: tuple[int, int] | None = None) -> Path:
    """Train a DFlash (kind "dflash") or variable-prefix (kind "vp") drafter for a frozen Qwen3 target.

    Config: {target, model (DFlashConfig fields besides the target-derived ones:
    n_layers, n_heads, n_kv_heads, intermediate_size, target_layers, block_size),
    data (pool, gen_length, anchors_per_seq, gamma for vp, loss_decay,
    hidden_dtype), train, out, state_dir, tokenizer_from, optional kind}.
    `shard` (i, n), with data_only: make only chunks c % n == i of the continuations, so n processes
    can fill the cache together.
    """
    if shard is not None and not data_only:
        raise ValueError("shard splits the continuation chunks among processes; it applies to data_only only")
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard (i, n) needs 0 <= i < n, got {shard}")
    if kind not in KINDS:
        raise ValueError(f"unknown drafter kind {kind!r}; use dflash or vp")
    cfg, tr, out_dir, state_path, dev = setup(config_path, out, device, SCHEMA)
    if cfg.get("kind", kind) != kind:
        raise ValueError(f"config {config_path} is for kind {cfg['kind']!r}, not {kind!r}")
    dcfg = cfg.get("data", {})
    if kind == "dflash" and "gamma" in dcfg:
        raise ValueError("data.gamma only applies to kind vp (the prefix lengths it re-anchors); a dflash drafter's "
                         "window is model.block_size")
    tok = target_tokenizer(cfg)
    target = load_target(cfg, tok, dev)
    mask_id = mask_id_of(cfg, tok, target)
    dconf = DFlashConfig.for_target(target, mask_id, **cfg["model"])
    drafter = DFlashDrafter(dconf, target).to(dev)
    W = dconf.block_size
    gamma = int(dcfg.get("gamma", W)) if kind == "vp" else W
    if not 2 <= gamma <= W:
        raise ValueError(f"data.gamma (γ of the block drafter) must be in [2, block_size={W}], got {gamma}")
    print(f"{kind} drafter: {drafter.num_params() / 1e6:.2f}M own params, window {W}, target layers "
          f"{list(dconf.target_layers)}, device {dev}")

    seed, gen_length = int(tr.get("seed", 0)), int(dcfg.get("gen_length", 48))
    n_val = int(tr.get("eval_n", 64))
    train_prompts, val_prompts, pools = pool_prompts(cfg, dcfg, n_val, seed, data_only)
    hdt = DTYPES.get(str(dcfg.get("hidden_dtype", "float16")))
    if hdt is None:
        raise ValueError(f"data.hidden_dtype must be one of {sorted(DTYPES)}, got {dcfg.get('hidden_dtype')!r}")
    layers = list(dconf.target_layers)
    cache = Path(dcfg.get("cache") or state_path.parent / "continuations")
    meta = continuation_meta(cfg, target, target_dir(cfg))
    gen_bs = int(dcfg.get("gen_batch_size", 64))
    manifest = Path(dcfg["manifest"]) if dcfg.get("manifest") else None
    train_seqs, train_hidden = cached_continuations(cache / "train", meta, target, tok, train_prompts, gen_length,
                                                    layers, hdt, gen_bs, manifest=manifest and manifest / "train",
                                                    shard=shard, only_new=data_only)
    val_seqs, val_hidden = cached_continuations(cache / "val", meta, target, tok, val_prompts, gen_length, layers,
                                                hdt, gen_bs, desc="validation continuations",
                                                manifest=manifest and manifest / "val", shard=shard,
                                                only_new=data_only)
    if data_only:
        return cache
    train_seqs, train_hidden = train_seqs[:max(pools)], train_hidden[:max(pools)]
    vocab = training_vocab(dcfg, state_path.parent, train_seqs[:pools[0]], eos_ids(target), resume)
    drafter.set_draft_vocab(vocab)
    data = WindowData(train_seqs, train_hidden, kind, W, gamma, mask_id, seed)
    val = WindowData(val_seqs, val_hidden, kind, W, gamma, mask_id, seed)
    n_seqs, per_seq = int(tr.get("batch_size", 16)), int(dcfg.get("anchors_per_seq", 4))
    decay = float(dcfg.get("loss_decay", 0.0))

    def save() -> None:
        save_dflash(drafter, out_dir, DTYPES[cfg["save_dtype"]] if "save_dtype" in cfg else None)
        if vocab is not None:
            (out_dir / DRAFT_VOCAB_FILE).write_text(json.dumps({"ids": vocab}) + "\n")
        (out_dir / "trained_for.json").write_text(json.dumps({"kind": kind, "target": str(cfg["target"]),
                                                              "gamma": gamma}, indent=2) + "\n")

    train_loop(kind, drafter, tr, int(max_steps or tr.get("steps", 2000)), state_path, resume, dev,
               lambda: window_loss(drafter, data.sample(n_seqs, per_seq, dev), decay),
               lambda: {"val_accept_len": accepted_length(drafter, val, dev)}, save,
               rngs=(data.rng,), on_stage=lambda i, _: data.use_first(pools[i]))
    return out_dir
