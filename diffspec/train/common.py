"""Pieces every training loop shares: config files, optimizer, LR schedule, resume.

Training configs are JSON with a strict schema per trainer (`Schema`): a key
the trainer does not read (`train.stpes`, a top-level typo, an unknown
`model.*` field) is an error that lists the valid keys, since a silently
ignored key trains something other than what the config says, and finding
out takes a whole run. Keys starting with `_` (`_comment`) are free text.
Values are range-checked before anything is built.
"""
from __future__ import annotations

import dataclasses
import math
import pickle
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..jsonio import parse_json_file
from ..models.checkpoint import DEFAULT_MODEL_DIR, CheckpointError, load_tokenizer, resolve_device
from ..models.tokenizer import EOS_TOKEN, MASK_TOKEN, Tokenizer


# ---------------------------------------------------------------- config schema

Check = Callable[[str, Any], None]  # check(dotted key name, value) raises ValueError naming the key
Schema = Mapping[str, Union[Check, "Schema"]]  # a nested mapping is a section


def integer(lo: int | None = None) -> Check:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
            raise ValueError(f"{name} must be an integer{f' >= {lo}' if lo is not None else ''}, got {v!r}")
    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, note: str = "") -> Check:
    """A finite number in [lo, hi] ((lo, hi] with lo_open); NaN and infinities never pass."""
    def check(name: str, v: Any) -> None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ValueError(f"{name} must be a finite number in {rng}{note}, got {v!r}")
    return check


def choice(*allowed: Any) -> Check:
    def check(name: str, v: Any) -> None:
        if v not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {v!r}")
    return check


def text(name: str, v: Any) -> None:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{name} must be a non-empty string, got {v!r}")


def boolean(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")


def int_list(lo: int | None = None) -> Check:
    each = integer(lo)

    def check(name: str, v: Any) -> None:
        if not isinstance(v, list) or not v:
            raise ValueError(f"{name} must be a non-empty list of integers, got {v!r}")
        for i, x in enumerate(v):
            each(f"{name}[{i}]", x)
    return check


def anything(name: str, v: Any) -> None:
    """Checked where it is used (e.g. `data.arith` by ArithSpec)."""


class Derived:
    """A key the trainer sets itself (e.g. model.vocab_size from the tokenizer): giving it is an error."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, name: str, v: Any) -> None:
        raise ValueError(f"{name} is taken from {self.source}; drop it from the config")


def dataclass_section(cls: type, derived: Mapping[str, str] | None = None,
                      exclude: Sequence[str] = ("extra",)) -> Schema:
    """A model section: the fields of config class `cls`, type-checked by their defaults' types
    (ranges are the class's own checks); `derived` fields name where their value comes from."""
    derived = derived or {}
    out: dict[str, Check] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = f.default
        if f.name in derived:
            out[f.name] = Derived(derived[f.name])
        elif isinstance(default, bool):
            out[f.name] = boolean
        elif isinstance(default, int):
            out[f.name] = integer()
        elif isinstance(default, float):
            out[f.name] = number()
        elif isinstance(default, tuple):
            out[f.name] = int_list()
        else:
            out[f.name] = anything
    return out


def check_schema(cfg: Any, schema: Schema, where: str = "") -> None:
    """Raise a ValueError for the first unknown key (listing the valid ones) or bad value in `cfg`."""
    label = where or "the config's top level"
    if not isinstance(cfg, dict):
        raise ValueError(f"{where or 'a training config'} must be a JSON object, got {type(cfg).__name__}")
    unknown = sorted(k for k in cfg if not str(k).startswith("_") and k not in schema)
    if unknown:
        valid = sorted(k for k, c in schema.items() if not isinstance(c, Derived))
        names = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ValueError(f"unknown key(s) {names} in {label}; valid keys: {', '.join(valid)} "
                         "(keys starting with '_' are comments)")
    for key, check in schema.items():
        if key not in cfg:
            continue
        name = f"{where}.{key}" if where else key
        if isinstance(check, Mapping):
            check_schema(cfg[key], check, name)
        else:
            check(name, cfg[key])


# Keys of `train` that `setup` and `train_loop` read, shared by every trainer.
# max_minutes: the time budget; 0 (the default) means no time limit.
TRAIN_KEYS: dict[str, Check] = {
    "steps": integer(1), "batch_size": integer(1), "lr": number(0, lo_open=True), "warmup": integer(0),
    "weight_decay": number(0), "grad_clip": number(0, lo_open=True), "eval_every": integer(1),
    "eval_n": integer(1), "save_every": integer(1), "seed": integer(0), "threads": integer(0),
    "max_minutes": number(0, note=" (0 = no time limit)"), "amp": choice("none", "bf16"), "device": text,
}
# Top-level keys every trainer reads besides its model / data sections.
TOP_KEYS: dict[str, Check] = {"out": text, "state_dir": text, "tokenizer_from": text}
REQUIRED = ("model", "train", "out")


# What a stage of train.stages may set; the rest it inherits from the train section.
STAGE_KEYS: dict[str, Check] = {k: TRAIN_KEYS[k] for k in ("steps", "lr", "warmup", "max_minutes")}


def stages_check(extra: Mapping[str, Check] | None = None) -> Check:
    """Check for train.stages: a non-empty list of sections with STAGE_KEYS (plus a trainer's `extra`)."""
    keys = {**STAGE_KEYS, **(extra or {})}

    def check(name: str, v: Any) -> None:
        if not isinstance(v, list) or not v:
            raise ValueError(f"{name} must be a non-empty list of stage sections (keys {', '.join(sorted(keys))}), "
                             f"got {v!r}")
        for i, stage in enumerate(v):
            check_schema(stage, keys, f"{name}[{i}]")
    return check


TRAIN_KEYS["stages"] = stages_check()


def read_train_config(path: str | Path, schema: Schema | None = None) -> dict[str, Any]:
    """The parsed config at `path`, with its required sections, checked against `schema` (each
    trainer's; None checks only that the required sections exist)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} not found")
    cfg = parse_json_file(path, "training config")
    if not isinstance(cfg, dict):
        raise ValueError(f"training config {path} must hold a JSON object, not {type(cfg).__name__}")
    for key in REQUIRED:
        if key not in cfg:
            raise ValueError(f"training config {path} lacks the '{key}' section")
    if schema is not None:
        try:
            check_schema(cfg, schema)
        except ValueError as e:
            raise ValueError(f"training config {path}: {e}") from None
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


def shape_difference(saved: Mapping[str, torch.Tensor], model: torch.nn.Module) -> str | None:
    """None when `saved` holds exactly `model`'s weights with its shapes, else the first difference."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    for k, t in expected.items():
        if k in saved and tuple(saved[k].shape) != tuple(t.shape):
            return f"weight {k} is {tuple(saved[k].shape)} there but {tuple(t.shape)} in the model this config builds"
    if missing or unexpected:
        return f"weights differ by name: missing {missing[:3]}, unexpected {unexpected[:3]}"
    return None


def check_resume_shapes(saved: Mapping[str, torch.Tensor], model: torch.nn.Module, path: Path) -> None:
    """The saved weights fit the model this config builds: a clear error, not a torch size-mismatch
    traceback, when a config's model section changed between the run and its --resume."""
    diff = shape_difference(saved, model)
    if diff is not None:
        raise ValueError(f"--resume: {path} was saved from a model of another shape ({diff}); resume with the "
                         "config that run used, or start afresh without --resume (and another state_dir)")


def load_train_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"--resume asked for, but no training state at {path}")
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
        saved = st["model"]
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as e:
        raise ValueError(f"--resume: {path} is not a readable trainer state ({e}); start afresh without --resume") \
            from None
    check_resume_shapes(saved, model, path)
    model.load_state_dict(saved)
    opt.load_state_dict(st["opt"])
    torch.set_rng_state(st["rng"]["torch"])
    random.setstate(st["rng"]["python"])
    np.random.set_state(st["rng"]["numpy"])
    return st["step"], st.get("extra", {})


def setup(config_path: str | Path, out: str | Path | None, device: str | None, schema: Schema | None = None
          ) -> tuple[dict[str, Any], dict[str, Any], Path, Path, torch.device]:
    """(config, train section, out dir, trainer-state path, device), seeded, threads set; the
    config checked against the trainer's `schema` before anything is built."""
    cfg = read_train_config(config_path, schema)
    tr = cfg["train"]
    out_dir = Path(out or cfg["out"])
    state_path = Path(cfg.get("state_dir", f"runs/{out_dir.name}")) / "trainer_state.pt"
    seed_everything(int(tr.get("seed", 0)))
    if tr.get("threads"):
        torch.set_num_threads(int(tr["threads"]))
    return cfg, tr, out_dir, state_path, resolve_device(device or tr.get("device", "auto"))


def stage_plan(tr: Mapping[str, Any], total: int) -> list[dict[str, Any]]:
    """The run's stages: each of train.stages with the steps / lr / warmup / max_minutes it does
    not set taken from the train section (steps: `total`), or the train section as one stage.

    Stages let a recipe grow across sessions and stay one reproducible command: a later stage
    warm-restarts the LR on its own schedule and budget (and, for the drafter trainer, may read
    more of the data), instead of a resumed run's decayed schedule being stretched by hand.
    """
    base = {"steps": total, "lr": float(tr.get("lr", 1e-3)), "warmup": int(tr.get("warmup", 100)),
            "max_minutes": float(tr.get("max_minutes", 0))}
    return [{**base, **stage} for stage in tr.get("stages") or [{}]]


@dataclasses.dataclass
class _Run:
    """What every stage of one train_loop call shares."""
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    state_path: Path
    device: torch.device
    amp: bool
    eval_every: int
    save_every: int
    grad_clip: float
    loss_fn: Callable[[], torch.Tensor]
    eval_fn: Callable[[], dict[str, float]]
    save_fn: Callable[[], None]
    rngs: Sequence[random.Random]
    extra: dict[str, Any]


def train_loop(name: str, model: torch.nn.Module, tr: dict[str, Any], total: int, state_path: Path, resume: bool,
               device: torch.device, loss_fn: Callable[[], torch.Tensor], eval_fn: Callable[[], dict[str, float]],
               save_fn: Callable[[], None], rngs: Sequence[random.Random] = (),
               on_stage: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """AdamW on `model`'s trainable parameters for `total` steps; returns the history dict.

    loss_fn() draws a batch and returns its loss (run under autocast when
    train.amp is bf16); eval_fn() returns metrics (run in eval mode, no
    autocast); save_fn() writes the checkpoint. Eval and save every
    eval_every / save_every steps, at the last step and when max_minutes runs
    out (train.max_minutes: the time budget in minutes; 0, the default, means
    no time limit; negative is an error); the trainer state (weights,
    optimizer, RNG, history) is saved with the checkpoint so `resume`
    continues the step count (refused, with the first differing weight named,
    if the config now builds another shape). `rngs` (e.g. a batcher's
    random.Random) are saved and restored with it, so a resumed run draws the
    batches an uninterrupted one would have drawn. With train.stages
    (`stage_plan`) the stages run in turn, each with its own cosine schedule
    and budget; the state records the stage, so --resume goes on where the
    last session stopped; on_stage(i, stage) runs as stage i starts (or resumes).
    """
    plan = stage_plan(tr, total)
    opt = make_optimizer(model, plan[0]["lr"], float(tr.get("weight_decay", 0.1)))
    step, extra = 0, {"history": []}
    if resume:
        step, extra = load_train_state(state_path, model, opt)
        for r, st in zip(rngs, extra.get("aux_rng", [])):
            r.setstate(st)
        print(f"resumed from {state_path} at step {step}")
    amp_name = str(tr.get("amp", "none"))
    if amp_name not in ("none", "bf16"):
        raise ValueError(f"train.amp must be 'none' or 'bf16', got {amp_name!r}")
    for stage in plan:
        TRAIN_KEYS["max_minutes"]("train.max_minutes", stage["max_minutes"])  # -1 would stop after one step
    run = _Run(model, opt, state_path, device, amp_name == "bf16", int(tr.get("eval_every", 250)),
               int(tr.get("save_every", 250)), float(tr.get("grad_clip", 1.0)), loss_fn, eval_fn, save_fn, rngs, extra)
    if int(extra.get("stage", 0)) >= len(plan):
        raise ValueError(f"--resume: {state_path} was saved in stage {int(extra['stage']) + 1} of train.stages, but "
                         f"the config now has {len(plan)}; keep the stages it ran, and add new ones after them")
    for i in range(int(extra.get("stage", 0)), len(plan)):
        if int(extra.get("stage", 0)) != i:  # a new stage: its schedule and budget count from here
            extra.update(stage=i, stage_start=step, elapsed_seconds=0.0)
        if on_stage is not None:
            on_stage(i, plan[i])
        label = name if len(plan) == 1 else f"{name} stage {i + 1}/{len(plan)}"
        step = _train_stage(run, label, plan[i], step, i if len(plan) > 1 else None)
    return extra


def _train_stage(run: _Run, label: str, stage: dict[str, Any], step: int, index: int | None) -> int:
    """Train one stage from global `step` until its steps or minutes run out; returns the step reached."""
    extra, start, total = run.extra, int(run.extra.get("stage_start", 0)), int(stage["steps"])
    max_seconds = float(stage["max_minutes"]) * 60 or float("inf")
    t0 = time.time() - float(extra.get("elapsed_seconds", 0.0))
    if step - start >= total or time.time() - t0 > max_seconds:
        return step  # this stage ended in an earlier session
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.model.train()
    bar = tqdm(total=total, initial=step - start, desc=f"train {label}")
    while step - start < total:
        # With a time budget the schedule follows whichever runs out first, steps or
        # minutes, so a slow or busy machine still ends with a fully decayed LR.
        own = step - start
        progress = max(own, int(total * (time.time() - t0) / max_seconds)) if max_seconds < float("inf") else own
        lr = cosine_lr(progress, total, float(stage["lr"]), int(stage["warmup"]))
        for g in run.opt.param_groups:
            g["lr"] = lr
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
            loss = run.loss_fn()
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, run.grad_clip)
        run.opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        timeout = time.time() - t0 > max_seconds or progress >= total
        last = step - start == total or timeout
        if step % run.eval_every == 0 or last:
            run.model.eval()
            metrics = run.eval_fn()
            run.model.train()
            at = {"step": step, **({"stage": index} if index is not None else {})}
            extra["history"].append({**at, "loss": loss.item(), **metrics, "minutes": (time.time() - t0) / 60})
            tqdm.write(f"step {step}: loss {loss.item():.3f}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if step % run.save_every == 0 or last:
            run.save_fn()
            extra["elapsed_seconds"] = time.time() - t0
            extra["aux_rng"] = [r.getstate() for r in run.rngs]
            save_train_state(run.state_path, step, run.model, run.opt, extra)
        if timeout:
            tqdm.write(f"stopping at step {step}: max_minutes reached")
            break
    bar.close()
    return step
