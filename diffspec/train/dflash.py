"""Train a DFlash block drafter (kind "dflash") or D²SD's variable-prefix drafter (kind "vp").

Data are the frozen target's OWN greedy continuations, since those are the
tokens the drafter must match at inference: for each training prompt the
target's greedy answer is generated once with `ar_generate` (cached in
`state_dir/targets.pt`, so a resume does not regenerate), then the target
runs once over prompt + answer to collect the hidden states at the drafter's
`target_layers` (kept in memory, `data.hidden_dtype`, default float16).

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

Validation: mean accepted length, i.e. how many leading masked positions
the drafter's argmax gets right against the target's tokens, over every
anchor of `eval_n` held-out prompts (for vp with a fixed seeded prefix length
per anchor). A DFlash round then yields about that many tokens plus one.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.causal import Qwen3Model, load_causal
from ..models.checkpoint import DTYPES, CheckpointError
from ..models.dflash import DFlashConfig, DFlashDrafter, save_dflash
from ..models.tokenizer import EOS_TOKEN, MASK_TOKEN
from ..speculative.ar import ARConfig, ar_generate
from ..tasks import arith_examples
from .common import TOP_KEYS, TRAIN_KEYS, Schema, choice, dataclass_section, integer, number, setup, \
    shared_tokenizer, text, train_loop

__all__ = ["train_dflash", "WindowData", "target_continuations", "SCHEMA"]

KINDS = ("dflash", "vp")
# Every key `train_dflash` reads; anything else in a config is refused (see train.common).
# data.gamma (the prefix lengths D²SD re-anchors) belongs to kind vp only.
SCHEMA: Schema = {
    **TOP_KEYS,
    "target": text,
    "kind": choice(*KINDS),
    "model": dataclass_section(DFlashConfig, derived={"hidden_size": "the target", "vocab_size": "the target",
                                                      "mask_token_id": "the tokenizer"}),
    "data": {"pool": integer(1), "gen_length": integer(1), "anchors_per_seq": integer(1), "gamma": integer(2),
             "loss_decay": number(0), "hidden_dtype": choice(*DTYPES)},
    "train": TRAIN_KEYS,
}
Seq = tuple[list[int], list[int]]  # (prompt ids, target answer ids, EOS included when emitted)


def target_continuations(target: Qwen3Model, tok, prompts: list[str], gen_length: int) -> list[Seq]:
    """(prompt ids, the target's greedy answer ids) per prompt; the answer keeps its EOS."""
    res = ar_generate(target, tok, prompts, ARConfig(gen_length=gen_length, batch_size=64), progress=True)
    return [(tok.encode(p), list(a)) for p, a in zip(prompts, res.raw_ids)]


def _cached_targets(path: Path, meta: dict[str, Any], target: Qwen3Model, tok, train_prompts: list[str],
                    val_prompts: list[str], gen_length: int) -> tuple[list[Seq], list[Seq]]:
    if path.is_file():
        st = torch.load(path, map_location="cpu", weights_only=False)
        if st.get("meta") == meta:
            print(f"target continuations from {path}")
            return st["train"], st["val"]
        print(f"{path} was made for another target or data; regenerating")
    train = target_continuations(target, tok, train_prompts, gen_length)
    val = target_continuations(target, tok, val_prompts, gen_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"meta": meta, "train": train, "val": val}, tmp)
    tmp.replace(path)
    return train, val


@torch.no_grad()
def _hidden(target: Qwen3Model, seqs: list[Seq], layers: tuple[int, ...], dtype: torch.dtype,
            batch: int = 32) -> list[Tensor]:
    """Per sequence (T, len(layers)·H): target hidden states at `layers`, concatenated in that order."""
    dev = target.model.embed_tokens.weight.device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    out: list[Tensor | None] = [None] * len(seqs)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        rows = [seqs[i][0] + seqs[i][1] for i in idx]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
        # Right padding under causal attention leaves the real positions untouched.
        h = torch.cat(target(ids.to(dev), hidden_layers=list(layers)).hidden_states, dim=-1).cpu()
        for r, i in enumerate(idx):
            out[i] = h[r, :len(rows[r])].to(dtype)
            if not torch.isfinite(out[i]).all():
                raise ValueError(f"target hidden states overflow {dtype}; set data.hidden_dtype to float32")
    return out  # type: ignore[return-value]


class WindowData:
    """Drafter windows over target continuations with their hidden states (see the module docstring)."""

    def __init__(self, seqs: list[Seq], hidden: list[Tensor], kind: str, width: int, gamma: int, mask_id: int,
                 seed: int):
        keep = [i for i, (p, a) in enumerate(seqs) if len(a) >= 2]  # an anchor needs one token after it
        self.seqs, self.hidden = [seqs[i] for i in keep], [hidden[i] for i in keep]
        if not self.seqs:
            raise ValueError("no target continuation has two or more tokens; nothing to draft")
        self.kind, self.W, self.gamma, self.mask = kind, width, gamma, mask_id
        self.rng = random.Random(seed)

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
            "ctx_hidden": ctx[torch.tensor([slot[j] for j, _, _ in windows])].to(device),
            "ctx_positions": torch.arange(T, device=device),
            "ctx_mask": (torch.arange(T)[None, :] < anchors[:, None]).to(device),
        }

    def sample(self, n_seqs: int, per_seq: int, device: torch.device) -> dict[str, Tensor]:
        """A training batch: n_seqs random sequences × per_seq random anchors in each answer."""
        windows = []
        for j in self.rng.sample(range(len(self.seqs)), min(n_seqs, len(self.seqs))):
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
    """Cross-entropy on labelled (masked, in-answer) positions, weighted exp(-k/decay) by masked index k."""
    logits = drafter(b["block_ids"], b["block_positions"], b["ctx_hidden"], b["ctx_positions"], b["ctx_mask"])
    labels = b["labels"]
    valid = labels != -100
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
                       b["ctx_mask"]).argmax(-1)
        masked = b["block_ids"] == drafter.config.mask_token_id
        hit = (pred == b["labels"]) | ~masked  # visible positions do not break the run
        run = hit.long().cumprod(-1)
        total += int((run.bool() & masked).sum())
        n += len(windows)
    return total / max(n, 1)


def _load_target(cfg: dict[str, Any], tok, device: torch.device) -> Qwen3Model:
    if not cfg.get("target"):
        raise ValueError("the training config lacks 'target': the AR target checkpoint directory the drafter serves")
    path = Path(cfg["target"])
    if not path.is_dir():
        raise CheckpointError(f"target checkpoint {path} does not exist; train it first (diffspec train ar)")
    target, ttok = load_causal(path, device=device, dtype=torch.float32)
    if ttok.fingerprint() != tok.fingerprint():
        raise ValueError(f"the target {path} uses another tokenizer than tokenizer_from "
                         f"({cfg.get('tokenizer_from') or 'the bundled llada-arith'}); every model must share one")
    return target.requires_grad_(False).eval()


def train_dflash(config_path: str | Path, kind: str = "dflash", out: str | Path | None = None, resume: bool = False,
                 device: str | None = None, max_steps: int | None = None) -> Path:
    """Train a DFlash (kind "dflash") or variable-prefix (kind "vp") drafter for a frozen Qwen3 target.

    Config: {target, model (DFlashConfig fields besides the target-derived ones:
    n_layers, n_heads, n_kv_heads, intermediate_size, target_layers, block_size),
    data (pool, gen_length, anchors_per_seq, gamma for vp, loss_decay,
    hidden_dtype), train, out, state_dir, tokenizer_from, optional kind}.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown drafter kind {kind!r}; use dflash or vp")
    cfg, tr, out_dir, state_path, dev = setup(config_path, out, device, SCHEMA)
    if cfg.get("kind", kind) != kind:
        raise ValueError(f"config {config_path} is for kind {cfg['kind']!r}, not {kind!r}")
    dcfg = cfg.get("data", {})
    if kind == "dflash" and "gamma" in dcfg:
        raise ValueError("data.gamma only applies to kind vp (the prefix lengths it re-anchors); a dflash drafter's "
                         "window is model.block_size")
    tok = shared_tokenizer(cfg)
    target = _load_target(cfg, tok, dev)
    eos_id, mask_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(MASK_TOKEN)
    if eos_id not in target.config.eos_token_ids:
        raise ValueError(f"target eos ids {target.config.eos_token_ids} do not include the tokenizer's EOS {eos_id}")
    dconf = DFlashConfig.for_target(target, mask_id, **cfg["model"])
    drafter = DFlashDrafter(dconf, target).to(dev)
    W = dconf.block_size
    gamma = int(dcfg.get("gamma", W)) if kind == "vp" else W
    if not 2 <= gamma <= W:
        raise ValueError(f"data.gamma (γ of the block drafter) must be in [2, block_size={W}], got {gamma}")
    print(f"{kind} drafter: {drafter.num_params() / 1e6:.2f}M own params, window {W}, target layers "
          f"{list(dconf.target_layers)}, device {dev}")

    seed, gen_length = int(tr.get("seed", 0)), int(dcfg.get("gen_length", 48))
    train_prompts = [e.prompt for e in arith_examples("train", int(dcfg.get("pool", 2000)), seed=seed)]
    val_prompts = [e.prompt for e in arith_examples("validation", int(tr.get("eval_n", 64)), seed=0)]
    weights = Path(cfg["target"]) / "model.safetensors"
    meta = {"target": str(Path(cfg["target"]).resolve()), "target_config": target.config.to_hf_dict(),
            "weights": [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None,
            "n_train": len(train_prompts), "n_val": len(val_prompts), "seed": seed, "gen_length": gen_length}
    train_seqs, val_seqs = _cached_targets(state_path.parent / "targets.pt", meta, target, tok, train_prompts,
                                           val_prompts, gen_length)
    hdt = DTYPES.get(str(dcfg.get("hidden_dtype", "float16")))
    if hdt is None:
        raise ValueError(f"data.hidden_dtype must be one of {sorted(DTYPES)}, got {dcfg.get('hidden_dtype')!r}")
    layers = dconf.target_layers
    data = WindowData(train_seqs, _hidden(target, train_seqs, layers, hdt), kind, W, gamma, mask_id, seed)
    val = WindowData(val_seqs, _hidden(target, val_seqs, layers, torch.float32), kind, W, gamma, mask_id, seed)
    n_seqs, per_seq = int(tr.get("batch_size", 16)), int(dcfg.get("anchors_per_seq", 4))
    decay = float(dcfg.get("loss_decay", 0.0))

    def save() -> None:
        save_dflash(drafter, out_dir)
        (out_dir / "trained_for.json").write_text(json.dumps({"kind": kind, "target": str(cfg["target"]),
                                                              "gamma": gamma}, indent=2) + "\n")

    train_loop(kind, drafter, tr, int(max_steps or tr.get("steps", 2000)), state_path, resume, dev,
               lambda: window_loss(drafter, data.sample(n_seqs, per_seq, dev), decay),
               lambda: {"val_accept_len": accepted_length(drafter, val, dev)}, save)
    return out_dir
