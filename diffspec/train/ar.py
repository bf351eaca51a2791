"""Next-token SFT of a small Qwen3 (the AR target of D²SD) on the arith tasks.

Loss: cross-entropy of logit i against token i+1 over the answer tokens only
(the prompt conditions but is never predicted); every answer ends with EOS so
the model learns to stop. Batches come from the masked-diffusion trainer's
length-bucketed batcher (right padding is harmless under causal attention).

Every model of the project shares ONE tokenizer: by default the bundled LLaDA
model's (`tokenizer_from`, default `diffspec/assets/llada-arith`), so the AR
target, its drafters and the diffusion models read and write the same ids.

`train_loop` is the optimisation loop shared with `train/dflash.py` (cosine
LR with an optional time budget, bf16 autocast, periodic eval and save,
resume from `trainer_state.pt`); the MDM trainer uses it too.

With a `target` (e.g. "smollm2") the model is an ar-spec drafter distilled
from that target instead: its data are the target's own greedy continuations
(`train.distill`, the cache the DFlash / VP drafters of the target share),
its tokenizer, vocabulary and EOS ids are the target's, and it reads and
writes tokens through the target's embedding and LM head (frozen, not saved:
`save_causal(..., shared_embeddings=True)`), so only its layers train and
ship. The head runs on `data.loss_positions` random answer cells per row (a
49k-vocabulary head over every cell would cost more than the layers), and
validation is the share of held-out answer tokens whose argmax is the
target's token (teacher-forced), what drafting accepts. `train.stages` may
give each stage its own `train_pool` (the first answers of data.pool).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.causal import Qwen3Config, Qwen3Model, save_causal
from ..models.tokenizer import EOS_TOKEN, Tokenizer
from ..speculative.ar import ARConfig, ar_generate
from ..tasks import Example, arith_examples, arith_mc_examples, score
from ..models.checkpoint import DTYPES
from .common import (TOP_KEYS, TRAIN_KEYS, Schema, boolean, choice, dataclass_section, integer, number, read_train_config,
                     setup, shared_tokenizer, stages_check, text, train_loop)
from .distill import SOURCES
from .mdm import MDMBatcher

__all__ = ["train_ar", "ar_loss", "evaluate_ar", "SCHEMA"]

# Every key `train_ar` reads; anything else in a config is refused (see train.common).
# model.vocab_size / model.eos_token_id may be given, but must equal the shared tokenizer's.
SCHEMA: Schema = {
    **TOP_KEYS,
    "model": dataclass_section(Qwen3Config),
    "data": {"gen_length": integer(1), "pool": integer(1), "mc_fraction": number(0, 1)},
    "train": TRAIN_KEYS,
}
# A drafter distilled from a `target`: the target fixes vocabulary, width, EOS ids and tying.
_FROM_TARGET = ("vocab_size", "hidden_size", "eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings")
DISTILL_SCHEMA: Schema = {
    **TOP_KEYS,
    "target": text,
    "save_dtype": choice(*DTYPES),
    "model": dataclass_section(Qwen3Config, derived={k: "the target" for k in _FROM_TARGET}),
    "data": {"gen_length": integer(1), "pool": integer(1), "source": choice(*SOURCES), "questions": text,
             "chat": boolean, "system": text, "cache": text, "gen_batch_size": integer(1),
             "loss_positions": integer(1), "manifest": text},
    # A stage may train on more of data.pool than the one before (default: all of it).
    "train": {**TRAIN_KEYS, "stages": stages_check({"train_pool": integer(1)})},
}


def ar_loss(model: Qwen3Model, ids: torch.Tensor, ans: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens (logit i predicts token i+1)."""
    logits = model(ids).logits[:, :-1]
    tgt = ans[:, 1:]
    return F.cross_entropy(logits[tgt].float(), ids[:, 1:][tgt])


def evaluate_ar(model: Qwen3Model, tok: Tokenizer, examples: list[Example], gen_length: int) -> float:
    """Exact-match accuracy of greedy `ar_generate` answers."""
    res = ar_generate(model, tok, [e.prompt for e in examples], ARConfig(gen_length=gen_length, batch_size=64))
    return sum(score(e, t)["correct"] for e, t in zip(examples, res.texts)) / len(examples)


def sampled_loss(model: Qwen3Model, ids: torch.Tensor, ans: torch.Tensor, per_row: int) -> torch.Tensor:
    """`ar_loss` on at most `per_row` random answer cells of each row (the head runs on those only)."""
    tgt = ans[:, 1:]
    if per_row < int(tgt.sum(1).max()):
        noise = torch.rand(tgt.shape, device=ids.device).masked_fill(~tgt, 2.0)
        kth = noise.sort(1).values[:, per_row - 1:per_row]
        tgt = tgt & (noise <= kth)
    pick = torch.cat([tgt, tgt.new_zeros(tgt.shape[0], 1)], dim=1)  # logit i predicts token i + 1
    logits = model(ids, logits_mask=pick).logits
    return F.cross_entropy(logits.float(), ids[:, 1:][tgt])


@torch.no_grad()
def agreement(model: Qwen3Model, items: list[tuple[list[int], list[int]]], pad_id: int, batch: int = 8) -> float:
    """Share of answer tokens whose teacher-forced argmax is the target's token."""
    hit = n = 0
    for s in range(0, len(items), batch):
        ids, ans, _ = MDMBatcher.collate(items[s:s + batch], pad_id)
        tgt = ans[:, 1:]
        pick = torch.cat([tgt, tgt.new_zeros(tgt.shape[0], 1)], dim=1)
        dev = next(model.parameters()).device
        pred = model(ids.to(dev), logits_mask=pick.to(dev)).logits.argmax(-1).cpu()
        hit += int((pred == ids[:, 1:][tgt]).sum())
        n += int(tgt.sum())
    return hit / max(n, 1)


def train_ar(config_path: str | Path, out: str | Path | None = None, resume: bool = False,
             device: str | None = None, max_steps: int | None = None) -> Path:
    """Train a Qwen3 from a JSON config ({model, data, train, out, state_dir, tokenizer_from}), or with
    a `target` an ar-spec drafter distilled from it (see the module docstring); returns the out dir."""
    if "target" in read_train_config(config_path):
        return distill_ar(config_path, out, resume, device, max_steps)
    cfg, tr, out_dir, state_path, dev = setup(config_path, out, device, SCHEMA)
    dcfg = cfg.get("data", {})
    tok = shared_tokenizer(cfg)
    eos_id = tok.token_to_id(EOS_TOKEN)
    mkw = dict(cfg["model"])
    for key, want in (("vocab_size", tok.vocab_size), ("eos_token_id", eos_id)):
        if key in mkw and mkw[key] != want:
            raise ValueError(f"model.{key}={mkw[key]} does not match the shared tokenizer ({want}); "
                             f"drop it from the config, it is taken from the tokenizer")
        mkw[key] = want
    mkw.setdefault("pad_token_id", eos_id)
    model = Qwen3Model(Qwen3Config(**mkw)).to(dev)
    print(f"model: {model.num_params() / 1e6:.2f}M params, vocab {tok.vocab_size}, device {dev}")

    gen_length, seed = int(dcfg.get("gen_length", 48)), int(tr.get("seed", 0))
    n_pool = int(dcfg.get("pool", 100_000))
    examples = arith_examples("train", n_pool, seed=seed)
    examples += arith_mc_examples("train", int(n_pool * float(dcfg.get("mc_fraction", 0.0))), seed=seed)
    items = []
    for ex in examples:
        a = tok.encode(ex.solution) + [eos_id]
        if len(a) <= gen_length:
            items.append((tok.encode(ex.prompt), a))
    if not items:
        raise ValueError(f"no training answer fits data.gen_length={gen_length}")
    batcher = MDMBatcher(items, min(int(tr.get("batch_size", 64)), len(items)), eos_id, seed)
    val = arith_examples("validation", int(tr.get("eval_n", 64)), seed=0)

    def loss_fn() -> torch.Tensor:
        ids, ans, _ = (t.to(dev) for t in batcher.next())
        return ar_loss(model, ids, ans)

    train_loop("ar", model, tr, int(max_steps or tr.get("steps", 2000)), state_path, resume, dev, loss_fn,
               lambda: {"val_accuracy": evaluate_ar(model, tok, val, gen_length)},
               lambda: save_causal(model, tok, out_dir))
    return out_dir


def distill_ar(config_path: str | Path, out: str | Path | None = None, resume: bool = False,
               device: str | None = None, max_steps: int | None = None) -> Path:
    """An ar-spec drafter for `target` sharing its embedding and LM head (module docstring)."""
    from ..models.causal import share_embeddings
    from .distill import cached_continuations, continuation_meta, load_target, source_prompts, target_dir, \
        target_tokenizer

    cfg, tr, out_dir, state_path, dev = setup(config_path, out, device, DISTILL_SCHEMA)
    dcfg = cfg.get("data", {})
    tok = target_tokenizer(cfg)
    target = load_target(cfg, tok, dev)
    t = target.config
    mkw = {**cfg["model"], "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "eos_token_id": t.eos_token_id,
           "bos_token_id": t.bos_token_id, "pad_token_id": t.pad_token_id, "tie_word_embeddings": t.tie_word_embeddings}
    mkw.setdefault("model_type", t.model_type)
    mkw.setdefault("rope_theta", t.rope_theta)
    mkw.setdefault("rms_norm_eps", t.rms_norm_eps)
    mkw.setdefault("max_position_embeddings", t.max_position_embeddings)
    model = Qwen3Model(Qwen3Config(**mkw)).to(dev)
    share_embeddings(model, target)  # its own embedding is dropped: the target's tensors, frozen
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    print(f"drafter: {sum(p.numel() for p in own.values()) / 1e6:.2f}M own params (embedding and head: the target's, "
          f"frozen), device {dev}")

    seed, gen_length = int(tr.get("seed", 0)), int(dcfg.get("gen_length", 256))
    train_prompts, val_prompts = source_prompts(dcfg, int(dcfg.get("pool", 2000)), int(tr.get("eval_n", 32)), seed,
                                                target_dir(cfg))
    cache = Path(dcfg.get("cache") or state_path.parent / "continuations")
    meta = continuation_meta(cfg, target, target_dir(cfg))
    gen_bs = int(dcfg.get("gen_batch_size", 64))
    # With data.manifest (the DFlash drafters' committed answers) and a cache of its own, the answers
    # are read from git in seconds: a cache holding hidden states would replay them first.
    manifest = Path(dcfg["manifest"]) if dcfg.get("manifest") else None
    train_seqs, _ = cached_continuations(cache / "train", meta, target, tok, train_prompts, gen_length, None,
                                         batch_size=gen_bs, manifest=manifest and manifest / "train")
    val_seqs, _ = cached_continuations(cache / "val", meta, target, tok, val_prompts, gen_length, None,
                                       batch_size=gen_bs, desc="validation continuations",
                                       manifest=manifest and manifest / "val")
    pad = t.eos_token_ids[0] if t.eos_token_ids else 0
    pool = len(train_seqs)
    for i, stage in enumerate(tr.get("stages", [])):
        if stage.get("train_pool", 0) > pool:
            raise ValueError(f"train.stages[{i}].train_pool ({stage['train_pool']}) must be <= data.pool ({pool})")
    items = [(p, a) for p, a in train_seqs if a]
    val_items = [(p, a) for p, a in val_seqs if a]
    batcher = MDMBatcher(items, min(int(tr.get("batch_size", 8)), len(items)), pad, seed)
    per_row = int(dcfg.get("loss_positions", 64))
    save_dtype = DTYPES[cfg["save_dtype"]] if "save_dtype" in cfg else None

    def loss_fn() -> torch.Tensor:
        ids, ans, _ = (x.to(dev) for x in batcher.next())
        return sampled_loss(model, ids, ans, per_row)

    def save() -> None:
        save_causal(model, tok, out_dir, dtype=save_dtype, shared_embeddings=True)
        (out_dir / "trained_for.json").write_text(json.dumps({"kind": "ar-spec", "target": str(cfg["target"])},
                                                             indent=2) + "\n")

    def use_pool(i: int, stage: dict[str, Any]) -> None:  # a stage's train_pool: its first answers
        batcher.items = [(p, a) for p, a in train_seqs[:int(stage.get("train_pool", pool))] if a]
        batcher.queue.clear()

    train_loop("ar drafter", model, tr, int(max_steps or tr.get("steps", 2000)), state_path, resume, dev, loss_fn,
               lambda: {"val_agreement": agreement(model, val_items, pad)}, save, on_stage=use_pool)
    return out_dir
