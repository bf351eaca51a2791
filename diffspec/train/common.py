"""Pieces every training loop shares: config files, optimizer, LR schedule, resume."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..jsonio import parse_json_file
from ..models.checkpoint import DEFAULT_MODEL_DIR, CheckpointError, load_tokenizer, resolve_device
from ..models.tokenizer import EOS_TOKEN, MASK_TOKEN, Tokenizer


def read_train_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} not found")
    cfg = parse_json_file(path, "training config")
    for key in ("model", "train", "out"):
        if key not in cfg:
            raise ValueError(f"training config {path} lacks the '{key}' section")
    return cfg


def shared_tokenizer(cfg: dict[str, Any]) -> Tokenizer:
    """The project's one tokenizer: `tokenizer_from` (a checkpoint dir), default the bundled LLaDA model's.

    Drafters, targets and verifiers must read and write the same ids, so
    every model after the first borrows its tokenizer instead of training one.
    """
    src = Path(cfg.get("tokenizer_from") or DEFAULT_MODEL_DIR)
    if not src.is_dir():
        raise CheckpointError(f"tokenizer_from {src} is not a directory; point it at a checkpoint with a tokenizer.json")
    tok = load_tokenizer(src)
    for special in (EOS_TOKEN, MASK_TOKEN):
        if tok.token_to_id(special) is None:
            raise ValueError(f"the tokenizer in {src} lacks {special}; the arith models need it")
    return tok


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with no decay on norms (1-D params), the nanoGPT convention."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_train_state(path: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "extra": extra,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}}, tmp)
    tmp.replace(path)


def load_train_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"--resume asked for, but no training state at {path}")
    st = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    torch.set_rng_state(st["rng"]["torch"])
    random.setstate(st["rng"]["python"])
    np.random.set_state(st["rng"]["numpy"])
    return st["step"], st.get("extra", {})


def setup(config_path: str | Path, out: str | Path | None, device: str | None
          ) -> tuple[dict[str, Any], dict[str, Any], Path, Path, torch.device]:
    """(config, train section, out dir, trainer-state path, device), seeded, threads set."""
    cfg = read_train_config(config_path)
    tr = cfg["train"]
    out_dir = Path(out or cfg["out"])
    state_path = Path(cfg.get("state_dir", f"runs/{out_dir.name}")) / "trainer_state.pt"
    seed_everything(int(tr.get("seed", 0)))
    if tr.get("threads"):
        torch.set_num_threads(int(tr["threads"]))
    return cfg, tr, out_dir, state_path, resolve_device(device or tr.get("device", "auto"))


def train_loop(name: str, model: torch.nn.Module, tr: dict[str, Any], total: int, state_path: Path, resume: bool,
               device: torch.device, loss_fn: Callable[[], torch.Tensor], eval_fn: Callable[[], dict[str, float]],
               save_fn: Callable[[], None], rngs: Sequence[random.Random] = ()) -> dict[str, Any]:
    """AdamW on `model`'s trainable parameters for `total` steps; returns the history dict.

    loss_fn() draws a batch and returns its loss (run under autocast when
    train.amp is bf16); eval_fn() returns metrics (run in eval mode, no
    autocast); save_fn() writes the checkpoint. Eval and save every
    eval_every / save_every steps, at the last step and when max_minutes runs
    out; the trainer state (weights, optimizer, RNG, history) is saved with
    the checkpoint so `resume` continues the step count. `rngs` (e.g. a batcher's
    random.Random) are saved and restored with it, so a resumed run draws the
    batches an uninterrupted one would have drawn.
    """
    peak = float(tr.get("lr", 1e-3))
    opt = make_optimizer(model, peak, float(tr.get("weight_decay", 0.1)))
    step, extra = 0, {"history": []}
    if resume:
        step, extra = load_train_state(state_path, model, opt)
        for r, st in zip(rngs, extra.get("aux_rng", [])):
            r.setstate(st)
        print(f"resumed from {state_path} at step {step}")
    amp_name = str(tr.get("amp", "none"))
    if amp_name not in ("none", "bf16"):
        raise ValueError(f"train.amp must be 'none' or 'bf16', got {amp_name!r}")
    max_seconds = float(tr.get("max_minutes", 0)) * 60 or float("inf")
    t0 = time.time() - float(extra.get("elapsed_seconds", 0.0))
    eval_every, save_every = int(tr.get("eval_every", 250)), int(tr.get("save_every", 250))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    bar = tqdm(total=total, initial=step, desc=f"train {name}")
    while step < total:
        # With a time budget the schedule follows whichever runs out first, steps or
        # minutes, so a slow or busy machine still ends with a fully decayed LR.
        progress_step = max(step, int(total * (time.time() - t0) / max_seconds)) if max_seconds < float("inf") else step
        lr = cosine_lr(progress_step, total, peak, int(tr.get("warmup", 100)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_name == "bf16"):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(tr.get("grad_clip", 1.0)))
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        timeout = time.time() - t0 > max_seconds or progress_step >= total
        if step % eval_every == 0 or step == total or timeout:
            model.eval()
            metrics = eval_fn()
            model.train()
            extra["history"].append({"step": step, "loss": loss.item(), **metrics, "minutes": (time.time() - t0) / 60})
            tqdm.write(f"step {step}: loss {loss.item():.3f}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if step % save_every == 0 or step == total or timeout:
            save_fn()
            extra["elapsed_seconds"] = time.time() - t0
            extra["aux_rng"] = [r.getstate() for r in rngs]
            save_train_state(state_path, step, model, opt, extra)
        if timeout:
            tqdm.write(f"stopping at step {step}: max_minutes reached")
            break
    bar.close()
    return extra
