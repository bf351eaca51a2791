"""Masked-diffusion SFT (LLaDA's objective) for small models on the arith tasks.

`architecture` picks the network: "llada" (default) or "dream" (the Qwen2
backbone of `models.dream`, whose network predicts cell i from its output at
i - 1). The objective is the same masked cross-entropy for both: a Dream
model's forward already returns the shifted logits, so the loss scores the
output at i - 1 against token i, which is Dream's training objective. The
two-stream block rows give each noisy block of a Dream row a lead column
(`two_stream_loss`).

Loss: draw t ~ U(0, 1] per example (stratified over the batch to cut
variance), mask each answer token with probability t, and average the
cross-entropy on masked tokens weighted by 1/t over all answer tokens. The
prompt is never masked. Answers are padded with EOS to the generation length
the decoder will use, exactly as the decoder's canvas looks at inference.
Batches are bucketed by length so little compute goes to padding.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..decoding.config import DecodeConfig
from ..decoding.diffusion import diffusion_generate
from ..models.checkpoint import DTYPES, save_model
from ..models.dream import DreamConfig, DreamModel, save_dream
from ..models.llada import LLaDAConfig, LLaDAModel
from ..models.tokenizer import MASK_TOKEN, EOS_TOKEN, Tokenizer, train_bpe
from ..tasks import Example, arith, arith_hard, arith_examples, arith_hard_examples, arith_mc_examples, score
from .common import (TOP_KEYS, TRAIN_KEYS, Schema, anything, choice, dataclass_section, int_list, integer, number,
                     setup, shape_difference, shared_tokenizer, text, train_loop)


def arith_spec(cfg: dict[str, Any], section: str = "data") -> arith.ArithSpec:
    """`<section>.arith` (ArithSpec fields): a config may train, or build its BPE, on other numbers than the task's."""
    fields = cfg.get(section, {}).get("arith", {})
    known = set(arith.ArithSpec.__dataclass_fields__)
    if not isinstance(fields, dict) or set(fields) - known:
        raise ValueError(f"{section}.arith must be an object with keys from {sorted(known)}; got {fields!r}")
    return arith.ArithSpec(**fields)


TOKENIZER_KEYS = ("vocab_size", "corpus_problems", "arith")


def build_tokenizer(cfg: dict[str, Any]) -> Tokenizer:
    """`tokenizer_from`'s tokenizer if the config names one, else a BPE trained on arith text.

    `tokenizer.arith` sets the numbers of the BPE corpus apart from the training data's, so a
    from-scratch config can rebuild exactly the bundled tokenizer (whose corpus was `arith.HARD`)
    without borrowing it from the checkpoint it is about to overwrite.
    """
    if cfg.get("tokenizer_from"):
        if "tokenizer" in cfg:
            raise ValueError("set either tokenizer_from (borrow a checkpoint's tokenizer) or tokenizer (train a BPE), "
                             "not both")
        return shared_tokenizer(cfg)
    tcfg = cfg.get("tokenizer", {})
    if not isinstance(tcfg, dict) or set(tcfg) - set(TOKENIZER_KEYS):
        raise ValueError(f"tokenizer must be an object with keys from {list(TOKENIZER_KEYS)}; got {tcfg!r}")
    n = int(tcfg.get("corpus_problems", 20000))
    spec = arith_spec(cfg, "tokenizer" if "arith" in tcfg else "data")
    texts = [e.prompt + e.solution for e in arith_examples("train", n, seed=10_000, spec=spec)]
    texts += [e.prompt + e.solution for e in arith_mc_examples("train", n // 10, seed=10_000, spec=spec)]
    return train_bpe(texts, int(tcfg.get("vocab_size", 512)))


def encode_example(tok: Tokenizer, ex: Example, gen_length: int, eos_id: int) -> tuple[list[int], list[int]] | None:
    """(prompt ids, answer ids padded with EOS to gen_length) or None if the answer does not fit."""
    p = tok.encode(ex.prompt)
    a = tok.encode(ex.solution)
    if len(a) >= gen_length:
        return None
    return p, a + [eos_id] * (gen_length - len(a))


class MDMBatcher:
    """Endless length-bucketed batches from a pool of encoded examples."""

    def __init__(self, items: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int):
        self.items, self.bs, self.pad = items, batch_size, pad_id
        self.rng = random.Random(seed)
        self.queue: list[list[int]] = []

    def _refill(self) -> None:
        idx = self.rng.sample(range(len(self.items)), min(len(self.items), self.bs * 16))
        idx.sort(key=lambda i: len(self.items[i][0]) + len(self.items[i][1]))
        batches = [idx[i : i + self.bs] for i in range(0, len(idx) - self.bs + 1, self.bs)]
        self.rng.shuffle(batches)
        self.queue.extend(batches)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids (B, T), answer mask (B, T), attention mask (B, T); right-padded."""
        if not self.queue:
            self._refill()
        return self.collate([self.items[i] for i in self.queue.pop()], self.pad)

    @staticmethod
    def collate(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt, answer) rows as ids, answer mask and attention mask (B, T), right-padded with `pad`."""
        T = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        ans = torch.zeros((len(rows), T), dtype=torch.bool)
        att = torch.zeros((len(rows), T), dtype=torch.bool)
        for r, (p, a) in enumerate(rows):
            ids[r, : len(p) + len(a)] = torch.tensor(p + a)
            ans[r, len(p) : len(p) + len(a)] = True
            att[r, : len(p) + len(a)] = True
        return ids, ans, att


BLOCK_K = ("uniform", "content")
WEIGHTINGS = ("elbo", "mean")  # LLaDA's 1/t, or each row's mean masked cross-entropy


_FRACTION = number(0, 1)
TRAIN_TASKS = ("arith", "arith-hard")  # what data.task may name: the generated tasks with a solution to learn
ARCHITECTURES = ("llada", "dream")
_FROM_TOKENIZER = ("vocab_size", "mask_token_id", "eos_token_id")
# Every key `train_mdm` reads (see the module docstring and README for what each does); a config
# with a key outside it is refused (see train.common).
SCHEMA: Schema = {
    **TOP_KEYS,
    "architecture": choice(*ARCHITECTURES),
    "save_dtype": choice(*DTYPES),
    "model": dataclass_section(LLaDAConfig, derived={k: "the tokenizer" for k in _FROM_TOKENIZER}),
    "tokenizer": {"vocab_size": integer(1), "corpus_problems": integer(1), "arith": anything},
    "data": {"task": choice(*TRAIN_TASKS), "gen_length": integer(1), "block_length": integer(1), "pool": integer(1),
             "mc_fraction": _FRACTION,
             "mc_gen_length": integer(1), "long_fraction": _FRACTION, "long_lengths": int_list(1), "arith": anything,
             "lines": int_list(2), "recall_fraction": _FRACTION},
    "train": {**TRAIN_KEYS, "block_fraction": _FRACTION, "two_stream_fraction": _FRACTION,
              "two_stream_block": integer(1), "block_k": choice(*BLOCK_K), "loss_weighting": choice(*WEIGHTINGS),
              "init_from": text},
}
# A Dream config's model section holds DreamConfig's fields (Dream's own config.json names).
DREAM_SCHEMA: Schema = {
    **SCHEMA,
    "model": dataclass_section(DreamConfig, derived={**{k: "the tokenizer" for k in _FROM_TOKENIZER},
                                                     "pad_token_id": "eos_token_id (Dream pads with EOS)",
                                                     "bos_token_id": "the tokenizer (the arith one has none)",
                                                     "eot_token_id": "the tokenizer (the arith one has none)"}),
}


def config_architecture(config_path: str | Path) -> str:
    """The config's `architecture` (default "llada"), read before the schema that depends on it."""
    from .common import read_train_config

    arch = read_train_config(config_path).get("architecture", "llada")
    if arch not in ARCHITECTURES:
        raise ValueError(f"training config {config_path}: architecture must be one of "
                         f"{', '.join(map(repr, ARCHITECTURES))}; got {arch!r}")
    return arch


def build_model(arch: str, model_cfg: dict[str, Any], tok: Tokenizer) -> LLaDAModel | DreamModel:
    ids = {"vocab_size": tok.vocab_size, "mask_token_id": tok.token_to_id(MASK_TOKEN),
           "eos_token_id": tok.token_to_id(EOS_TOKEN)}
    if arch == "dream":
        return DreamModel(DreamConfig(**{**model_cfg, **ids}))
    return LLaDAModel(LLaDAConfig(**{**model_cfg, **ids}))


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def mask_probs(B: int, device: torch.device, eps: float) -> torch.Tensor:
    """Per-row masking probabilities: t ~ U(0, 1] stratified over the batch to cut variance."""
    t = (torch.arange(B, device=device) + torch.rand(B, device=device)) / B
    return (1 - eps) * t + eps


def row_mean(ce: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Batch mean of each row's mean cross-entropy over its scored cells (`ce` is cells' values in order)."""
    per_row = torch.zeros(cells.shape[0], device=ce.device).index_add_(0, cells.nonzero()[:, 0], ce)
    return (per_row / cells.sum(1).clamp(min=1)).mean()


def mdm_loss(model: LLaDAModel, ids: torch.Tensor, ans: torch.Tensor, att: torch.Tensor, mask_id: int,
             eps: float = 1e-3, block_length: int = 0, block_fraction: float = 0.0,
             block_k: str = "uniform", eos_id: int | None = None, weighting: str = "elbo") -> torch.Tensor:
    """LLaDA's SFT loss; with block_fraction > 0 that share of rows uses block masking.

    A block-masked row looks like the canvas of semi-autoregressive decoding:
    answer blocks before a random block k are clean, block k is masked with
    probability t, later blocks are fully masked, and only block k is scored
    (weighted 1/t). Every such row is also a sample of LLaDA's masking, so the
    objective stays a masked-diffusion one; it just spends more of a small
    model's capacity on the contexts the block decoder actually shows it.

    block_k="content" draws k only up to the block holding the answer's first
    EOS: blocks of pure EOS padding are trivial, and scoring them wastes a
    third of the block rows when answers fill half the canvas (plain rows still
    teach the padding). weighting="mean" averages each row's masked
    cross-entropy instead of weighting it by 1/t: a lower-variance estimate of
    a differently weighted objective (the ELBO's 1/t favours nearly clean rows).
    """
    check_choice("block_k", block_k, BLOCK_K)
    check_choice("weighting", weighting, WEIGHTINGS)
    if block_k == "content" and eos_id is None:
        raise ValueError("block_k='content' needs eos_id to find where each answer ends")
    B = ids.shape[0]
    p_mask = mask_probs(B, ids.device, eps)[:, None]
    masked = (torch.rand(ids.shape, device=ids.device) < p_mask) & ans
    scored = ans
    use_blocks = block_fraction > 0 and block_length > 0
    if use_blocks:
        start = ans.float().argmax(1)  # first answer column of each row
        n_ans = ans.sum(1)
        col = torch.arange(ids.shape[1], device=ids.device)[None, :] - start[:, None]  # answer-relative column
        n_blocks = torch.div(n_ans + block_length - 1, block_length, rounding_mode="floor")
        if block_k == "content":  # blocks up to the one holding the first EOS (the answer's end)
            is_eos = ans & (ids == eos_id)
            end = torch.where(is_eos.any(1), (is_eos.float().argmax(1) - start), n_ans - 1)
            n_blocks = torch.div(end, block_length, rounding_mode="floor") + 1
        k = (torch.rand(B, device=ids.device) * n_blocks).long()
        blk = torch.div(col.clamp(min=0), block_length, rounding_mode="floor")
        is_block = (torch.rand(B, device=ids.device) < block_fraction)[:, None]
        b_masked = ans & ((blk > k[:, None]) | ((blk == k[:, None]) & masked))
        masked = torch.where(is_block, b_masked, masked)
        scored = torch.where(is_block, ans & (blk == k[:, None]) & masked, ans)
    noisy = torch.where(masked, mask_id, ids)
    logits = model(noisy, attention_mask=att).logits
    loss_cells = masked & scored
    ce = F.cross_entropy(logits[loss_cells].float(), ids[loss_cells], reduction="none")
    if weighting == "mean":
        return row_mean(ce, loss_cells)
    # LLaDA normalises by the answer length; a block row by the block's length.
    denom = torch.where(is_block[:, 0], torch.clamp(n_ans - k * block_length, max=block_length), n_ans) \
        if use_blocks else ans.sum(1)
    weight = (1 / p_mask).expand_as(ids)[loss_cells] / denom[:, None].expand_as(ids)[loss_cells].clamp(min=1)
    return (ce * weight).sum() / B


def two_stream_loss(model: LLaDAModel, ids: torch.Tensor, ans: torch.Tensor, att: torch.Tensor, mask_id: int,
                    eos_id: int, block_length: int, eps: float = 1e-3, weighting: str = "elbo") -> torch.Tensor:
    """Block-diffusion loss (BD3-LM's vectorised training) scoring every answer block in one forward.

    Each row becomes [prompt | clean answer | noisy answer], the noisy copy at the
    clean copy's positions. A noisy block attends to the prompt, the clean blocks
    before it and itself; a clean block to the prompt and the clean blocks up to
    its own. So every noisy block sees exactly the clean prefix the
    semi-autoregressive decoder has given it, and all blocks of a row are
    scored at once, where a block-masked row scores one. What it cannot show is
    the fully masked blocks after the current one: mix it with plain rows.
    Answers are cut after the block holding their first EOS; plain rows teach
    the padding beyond. A shifted (Dream) network gets a lead column per noisy
    block (see below), so the same rows train it.
    """
    check_choice("weighting", weighting, WEIGHTINGS)
    if block_length < 1:
        raise ValueError(f"two_stream_loss needs block_length >= 1; got {block_length}")
    dev = ids.device
    # A shifted (Dream) network scores cell i from its output at i - 1, so each noisy block opens
    # with a lead column: a copy of the token before the block (the prompt's last token for the
    # first block), at that token's position, in the block's group. The lead sees what the output
    # before the block sees while decoding it (prompt, clean blocks before, the noisy block), and
    # the model's shift then scores every noisy cell from the column just before it.
    lead = 1 if getattr(model, "logits_shifted", False) else 0
    rows, lens = [], []
    for r in range(ids.shape[0]):
        a_idx = ans[r].nonzero()[:, 0]
        P, A = int(a_idx[0]), ids[r, ans[r]]
        eos = (A == eos_id).nonzero()
        end = int(eos[0, 0]) if len(eos) else len(A) - 1
        L = min(len(A), (end // block_length + 1) * block_length)
        rows.append((ids[r, :P], A[:L]))
        lens.append(P + 2 * L + lead * -(-L // block_length))
    B, T = len(rows), max(lens)
    x = torch.full((B, T), mask_id, dtype=torch.long, device=dev)
    tgt = torch.zeros((B, T), dtype=torch.long, device=dev)
    pos = torch.zeros((B, T), dtype=torch.long, device=dev)
    kind = torch.full((B, T), -1, dtype=torch.long, device=dev)  # 0 prompt, 1 clean, 2 noisy, -1 padding
    blk = torch.zeros((B, T), dtype=torch.long, device=dev)
    p_mask = mask_probs(B, dev, eps)
    masked = torch.zeros((B, T), dtype=torch.bool, device=dev)
    n_ans = torch.zeros(B, device=dev)
    for r, (prompt, a) in enumerate(rows):
        P, L = len(prompt), len(a)
        ar = torch.arange(L, device=dev)
        x[r, :P], x[r, P:P + L] = prompt, a
        pos[r, :P + L] = torch.arange(P + L, device=dev)
        kind[r, :P], kind[r, P:P + L] = 0, 1
        blk[r, P:P + L] = ar // block_length
        m = torch.rand(L, device=dev) < p_mask[r]
        # noisy stream: column of answer cell i, after one lead column per block started
        col = P + L + ar + lead * (ar // block_length + 1)
        x[r, col] = torch.where(m, mask_id, a)
        tgt[r, col] = a
        masked[r, col] = m
        pos[r, col] = P + ar
        kind[r, col] = 2
        blk[r, col] = ar // block_length
        if lead:
            starts = torch.arange(0, L, block_length, device=dev)
            lcol = col[starts] - 1
            x[r, lcol] = torch.cat([prompt[-1:], a[starts[1:] - 1]])
            pos[r, lcol] = P + starts - 1
            kind[r, lcol] = 2
            blk[r, lcol] = starts // block_length
        n_ans[r] = L
    kq, kk = kind[:, :, None], kind[:, None, :]
    bq, bk = blk[:, :, None], blk[:, None, :]
    allowed = (kk == 0) | ((kq == 1) & (kk == 1) & (bk <= bq)) | ((kq == 2) & (kk == 1) & (bk < bq)) \
        | ((kq == 2) & (kk == 2) & (bk == bq))
    logits = model(x, positions=pos, attention_mask=allowed).logits
    ce = F.cross_entropy(logits[masked].float(), tgt[masked], reduction="none")
    if weighting == "mean":
        return row_mean(ce, masked)
    per_row = torch.zeros(B, device=dev).index_add_(0, masked.nonzero()[:, 0], ce)
    return (per_row / (p_mask * n_ans)).sum() / B


def evaluate(model: LLaDAModel, tok: Tokenizer, examples: list[Example], gen_length: int, block_length: int) -> float:
    model.eval()
    cfg = DecodeConfig(gen_length=gen_length, block_length=block_length, steps=gen_length, batch_size=64)
    res = diffusion_generate(model, tok, [e.prompt for e in examples], cfg)
    model.train()
    return sum(score(e, t)["correct"] for e, t in zip(examples, res.texts)) / len(examples)


def train_mdm(config_path: str | Path, out: str | Path | None = None, resume: bool = False,
              device: str | None = None, max_steps: int | None = None) -> Path:
    """Train a LLaDA- or Dream-architecture MDM from a JSON config
    ({architecture, model, tokenizer, data, train, out, state_dir})."""
    arch = config_architecture(config_path)
    cfg, tr, out_dir, state_path, dev = setup(config_path, out, device, DREAM_SCHEMA if arch == "dream" else SCHEMA)
    dcfg = cfg.get("data", {})
    tok = build_tokenizer(cfg)
    eos_id, mask_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(MASK_TOKEN)
    model = build_model(arch, cfg["model"], tok).to(dev)
    save_dtype = DTYPES[cfg["save_dtype"]] if "save_dtype" in cfg else None  # bf16 halves a bundled checkpoint
    if tr.get("init_from"):  # warm start from a saved checkpoint (weights only, fresh optimizer)
        _warm_start(model, arch, tok, tr["init_from"], dev)
    print(f"{arch} model: {model.num_params() / 1e6:.2f}M non-embedding params, vocab {tok.vocab_size}, device {dev}")

    gen_length = int(dcfg.get("gen_length", 48))
    block_length = int(dcfg.get("block_length", 16))
    batcher, val = _training_data(cfg, tr, tok, eos_id, gen_length)
    loss_fn = _loss_fn(model, batcher, tr, mask_id, eos_id, block_length, dev)
    train_loop("mdm", model, tr, int(max_steps or tr.get("steps", 2000)), state_path, resume, dev, loss_fn,
               lambda: {"val_accuracy": evaluate(model, tok, val, gen_length, block_length)},
               lambda: save_dream(model, tok, out_dir, save_dtype) if arch == "dream"
               else save_model(model, tok, out_dir, save_dtype),
               rngs=[batcher.rng])
    return out_dir


def _warm_start(model: torch.nn.Module, arch: str, tok: Tokenizer, init_from: str, dev: str) -> None:
    """Load `init_from`'s weights into `model`, refusing another tokenizer or another model shape."""
    from ..models.checkpoint import load_model
    from ..models.dream import load_dream

    loader = load_dream if arch == "dream" else load_model
    init, init_tok = loader(init_from, device=dev, dtype=torch.float32)
    if init_tok.fingerprint() != tok.fingerprint():
        raise ValueError(f"init_from {init_from} uses another tokenizer than this config builds; "
                         f"set tokenizer_from to {init_from}")
    diff = shape_difference(init.state_dict(), model)
    if diff is not None:
        raise ValueError(f"init_from {init_from} has another model shape than this config's 'model' "
                         f"section ({diff})")
    model.load_state_dict(init.state_dict())
    print(f"initialised weights from {init_from}")


def _training_data(cfg: dict[str, Any], tr: dict[str, Any], tok: Tokenizer, eos_id: int,
                   gen_length: int) -> tuple[MDMBatcher, list[Example]]:
    """The training batcher (the task's pool, some rows at longer answer lengths, plus the
    multiple-choice share) and the validation examples, as `data` and `train.seed` say."""
    dcfg = cfg.get("data", {})
    n_pool = int(dcfg.get("pool", 100_000))
    mc_frac = float(dcfg.get("mc_fraction", 0.1))
    long_frac = float(dcfg.get("long_fraction", 0.0))
    long_lengths = list(dcfg.get("long_lengths", [64, 96, 128]))
    rng = random.Random(int(tr.get("seed", 0)))
    items = []
    task = str(dcfg.get("task", "arith"))
    check_choice("data.task", task, TRAIN_TASKS)
    if task == "arith-hard" and ("arith" in dcfg or mc_frac > 0):
        raise ValueError("data.arith and data.mc_fraction apply to data.task 'arith'; for 'arith-hard' drop "
                         "data.arith and set data.mc_fraction to 0")
    if "lines" in dcfg and (task != "arith-hard" or len(dcfg["lines"]) != 2):
        raise ValueError("data.lines is the [min, max] working lines of arith-hard training stories (a curriculum "
                         f"of shorter stories); got {dcfg['lines']!r} for task {task!r}")
    train_lines = tuple(dcfg.get("lines", arith_hard.LINES))
    recall_frac = float(dcfg.get("recall_fraction", 0.0))
    if recall_frac and task != "arith-hard":
        raise ValueError(f"data.recall_fraction adds arith-hard recall stories; task {task!r} has none, drop it")
    spec = arith_spec(cfg)

    def examples(split: str, n: int, seed: int) -> list[Example]:
        if task == "arith-hard":  # validation keeps the task's own line range and has no recall stories
            if split == "train":
                return arith_hard_examples(split, n, seed, train_lines, recall=round(n * recall_frac))
            return arith_hard_examples(split, n, seed)
        return arith_examples(split, n, seed=seed, spec=spec)

    for ex in examples("train", n_pool, int(tr.get("seed", 0))):
        L = rng.choice(long_lengths) if rng.random() < long_frac else gen_length
        enc = encode_example(tok, ex, L, eos_id)
        if enc:
            items.append(enc)
    for ex in arith_mc_examples("train", int(n_pool * mc_frac), seed=int(tr.get("seed", 0)), spec=spec):
        enc = encode_example(tok, ex, int(dcfg.get("mc_gen_length", 8)), eos_id)
        if enc:
            items.append(enc)
    batcher = MDMBatcher(items, int(tr.get("batch_size", 64)), eos_id, int(tr.get("seed", 0)))
    return batcher, examples("validation", int(tr.get("eval_n", 64)), 0)


def _loss_fn(model: torch.nn.Module, batcher: MDMBatcher, tr: dict[str, Any], mask_id: int, eos_id: int,
             block_length: int, dev: str) -> Callable[[], torch.Tensor]:
    """The loss of the next batch: a `two_stream_fraction` share of its rows scored as block-diffusion
    canvases, the rest by `mdm_loss` (with `block_fraction` of them block-masked)."""
    block_fraction = float(tr.get("block_fraction", 0.0))
    if not 0.0 <= block_fraction <= 1.0:
        raise ValueError(f"train.block_fraction is the share of block-masked rows, in [0, 1]; got {block_fraction}")

    block_k, weighting = str(tr.get("block_k", "uniform")), str(tr.get("loss_weighting", "elbo"))
    check_choice("train.block_k", block_k, BLOCK_K)
    check_choice("train.loss_weighting", weighting, WEIGHTINGS)

    ts_fraction = float(tr.get("two_stream_fraction", 0.0))
    ts_block = int(tr.get("two_stream_block", block_length))
    if not 0.0 <= ts_fraction <= 1.0 or ts_block < 1:
        raise ValueError(f"train.two_stream_fraction must be in [0, 1] and train.two_stream_block >= 1; "
                         f"got {ts_fraction}, {ts_block}")

    def loss_fn() -> torch.Tensor:
        ids, ans, att = (t.to(dev) for t in batcher.next())
        n2 = round(ts_fraction * ids.shape[0])  # rows scored as block-diffusion canvases
        loss = ids.new_zeros((), dtype=torch.float32)
        if n2:
            loss = loss + n2 / ids.shape[0] * two_stream_loss(model, ids[:n2], ans[:n2], att[:n2], mask_id, eos_id,
                                                              ts_block, weighting=weighting)
        if n2 < ids.shape[0]:
            loss = loss + (1 - n2 / ids.shape[0]) * mdm_loss(
                model, ids[n2:], ans[n2:], att[n2:], mask_id, block_length=block_length,
                block_fraction=block_fraction, block_k=block_k, eos_id=eos_id, weighting=weighting)
        return loss

    return loss_fn
