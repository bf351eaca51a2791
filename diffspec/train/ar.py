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
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.causal import Qwen3Config, Qwen3Model, save_causal
from ..models.tokenizer import EOS_TOKEN, Tokenizer
from ..speculative.ar import ARConfig, ar_generate
from ..tasks import Example, arith_examples, arith_mc_examples, score
from .common import (TOP_KEYS, TRAIN_KEYS, Schema, dataclass_section, integer, number, setup, shared_tokenizer,
                     train_loop)
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


def ar_loss(model: Qwen3Model, ids: torch.Tensor, ans: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens (logit i predicts token i+1)."""
    logits = model(ids).logits[:, :-1]
    tgt = ans[:, 1:]
    return F.cross_entropy(logits[tgt].float(), ids[:, 1:][tgt])


def evaluate_ar(model: Qwen3Model, tok: Tokenizer, examples: list[Example], gen_length: int) -> float:
    """Exact-match accuracy of greedy `ar_generate` answers."""
    res = ar_generate(model, tok, [e.prompt for e in examples], ARConfig(gen_length=gen_length, batch_size=64))
    return sum(score(e, t)["correct"] for e, t in zip(examples, res.texts)) / len(examples)


def train_ar(config_path: str | Path, out: str | Path | None = None, resume: bool = False,
             device: str | None = None, max_steps: int | None = None) -> Path:
    """Train a Qwen3 from a JSON config ({model, data, train, out, state_dir, tokenizer_from}); returns the out dir."""
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
