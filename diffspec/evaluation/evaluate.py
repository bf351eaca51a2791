"""Accuracy and cost of one method on one task, as a JSON-ready dict.

Two scorings: `generate` (decode with the method, then score the text: GSM8K
strict / flexible match, or the first letter) and `likelihood` for the
multiple-choice tasks (lm-evaluation-harness's way: the choice with the highest
log-likelihood wins; exact for AR targets, LLaDA's Monte-Carlo ELBO for masked
diffusion models, see `diffspec.evaluation.likelihood`).

Data parallel (`torchrun --nproc-per-node N -m diffspec eval ...`): examples
are sharded by rank in whole batches (batch b goes to rank b mod N), so every
forward is one a single-process run also makes, and rank 0 gathers the scores
and cost meters with `torch.distributed` (gloo on CPU, nccl on CUDA) and writes
one result whose accuracy, n and cost totals equal a single-process run's
(exactly so for deterministic decoding; sampled decoding draws a fresh random
stream on every rank). Wall clock is reported per rank and overall.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..api import AnyConfig, build_config, generate
from ..jsonio import OutputFile
from ..methods import get_method
from ..tasks import LETTERS, Example, load_examples, score

# Generation shapes that fit each task's answers (overridable per run).
TASK_DEFAULTS: dict[str, dict[str, int]] = {
    "arith": {"gen_length": 48, "block_length": 16},
    "arith-hard": {"gen_length": 128, "block_length": 32},
    "arith-mc": {"gen_length": 8, "block_length": 8},
    "gsm8k": {"gen_length": 256, "block_length": 32},
    "mmlu": {"gen_length": 8, "block_length": 8},
}
SCORINGS = ("generate", "likelihood")
LIKELIHOOD_TASKS = ("arith-mc", "mmlu")  # multiple choice: one continuation per letter
DEFAULT_MC_NUM = 128  # LLaDA's; a one-token continuation (a letter) needs one forward whatever mc_num is


def task_config(task: str, method: str, strict: bool = True, **options: Any) -> AnyConfig:
    given = {k: v for k, v in options.items() if v is not None}
    defaults = TASK_DEFAULTS.get(task, {})
    m = get_method(method)
    ar = not m.takes_block_options
    if ar:  # AR methods and Dream's sampler take only the generation budget of the task's defaults
        defaults = {k: v for k, v in defaults.items() if k == "gen_length"}
    # (no steps: the builders' one rule, `decoding.config.full_steps`, makes them gen_length)
    return build_config(method, strict=strict, **{**defaults, **given})


def config_value(cfg: Any, name: str, default: Any = None) -> Any:
    """A decoding field of any method's config (its own, or its wrapped DecodeConfig / ARConfig's)."""
    if hasattr(cfg, name):
        return getattr(cfg, name)
    return getattr(getattr(cfg, "decode", None), name, default)


# ---------------------------------------------------------------- data parallel


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batches(self, n: int, batch_size: int) -> list[int]:
        """Indices of the examples this rank scores: whole batches of the single-process order,
        batch b on rank b mod world_size."""
        return [i for i in range(n) if (i // batch_size) % self.world_size == self.rank]


def shard_from_env() -> Shard:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun (and accelerate launch) set them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Shard(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(shard: Shard, device: str | None) -> str | None:
    """Join the process group (nccl for CUDA devices, gloo otherwise) and return this rank's device
    (`cuda` becomes `cuda:LOCAL_RANK`)."""
    if not shard.distributed:
        return device
    import torch
    import torch.distributed as dist

    cuda = str(device or "cpu").startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        device = f"cuda:{shard.local_rank}" if str(device) in ("cuda", "auto") else device
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def gather(obj: Any, shard: Shard) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (None elsewhere); [obj] in a single process."""
    if not shard.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * shard.world_size if shard.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


# ---------------------------------------------------------------- scoring


def _likelihood_scores(examples: Sequence[Example], model: Any, tokenizer: Any, batch_size: int, mc_num: int,
                       seed: int, cfg_scale: float, meter: Any) -> list[dict[str, Any]]:
    """Per multiple-choice example: each letter's log-likelihood, the argmax and whether it is the
    gold letter. Examples go in chunks of `batch_size` (their choices' rows batched together), so a
    data-parallel run that shards by the same chunks makes the same forwards."""
    from .likelihood import score_choices

    choices = [" " + c for c in LETTERS]
    out = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        scores = score_choices(model, tokenizer, [(e.prompt, choices) for e in chunk], batch_size=batch_size,
                               mc_num=mc_num, cfg_scale=cfg_scale, seed=seed, check_greedy=False, meter=meter)
        for e, sc in zip(chunk, scores):
            pred = LETTERS[max(range(len(sc)), key=lambda j: sc[j])]
            out.append({"pred": pred, "correct": pred == e.gold, "loglikelihoods": sc})
    return out


def run_part(task: str, examples: Sequence[Example], model: Any, tokenizer: Any, method: str, cfg: AnyConfig,
             scoring: str, mc_num: int, progress: bool) -> dict[str, Any]:
    """Score `examples` in this process: per-example scores, texts, ids, the meter, the config."""
    from ..decoding.meter import CostMeter

    if not examples:
        return {"scores": [], "texts": [], "ids": [], "meter": CostMeter(), "config": None, "stats": {}}
    if scoring == "likelihood":
        meter = CostMeter()
        with meter.timed():
            scores = _likelihood_scores(examples, model, tokenizer, config_value(cfg, "batch_size", 32), mc_num,
                                        config_value(cfg, "seed", 0), config_value(cfg, "cfg_scale", 0.0), meter)
        return {"scores": scores, "texts": [None] * len(examples), "ids": [None] * len(examples), "meter": meter,
                "config": cfg, "stats": {}}
    res = generate([e.prompt for e in examples], model=model, tokenizer=tokenizer, method=method,
                   progress=progress, config=cfg)
    return {"scores": [score(e, t) for e, t in zip(examples, res.texts)], "texts": res.texts, "ids": res.token_ids,
            "meter": res.meter, "config": res.config, "stats": res.stats}


def evaluate(
    task: str,
    model: Any,
    tokenizer: Any,
    method: str = "vanilla",
    config: AnyConfig | None = None,
    examples: list[Example] | None = None,
    limit: int | None = None,
    data: str | Path | None = None,
    progress: bool = True,
    keep_samples: bool = True,
    keep_ids: bool = False,
    scoring: str = "generate",
    mc_num: int = DEFAULT_MC_NUM,
    shard: Shard | None = None,
) -> dict[str, Any] | None:
    """Score `method` on `task`. With a distributed `shard` every rank scores its share and rank 0
    returns the merged result (the other ranks return None)."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    if scoring == "likelihood" and task not in LIKELIHOOD_TASKS:
        raise ValueError(f"--scoring likelihood needs a multiple-choice task ({', '.join(LIKELIHOOD_TASKS)}); "
                         f"{task!r} is scored by generation")
    if not isinstance(mc_num, int) or isinstance(mc_num, bool) or mc_num < 1:
        raise ValueError(f"mc_num must be an integer >= 1, got {mc_num!r}")
    shard = shard or Shard()
    examples = examples if examples is not None else load_examples(task, limit=limit, data=data)
    cfg = config or task_config(task, method)
    mine = shard.batches(len(examples), config_value(cfg, "batch_size", 32))
    if shard.distributed:
        import torch.distributed as dist

        dist.barrier()  # start the clocks together
    t0 = time.perf_counter()
    part = run_part(task, [examples[i] for i in mine], model, tokenizer, method, cfg, scoring, mc_num,
                     progress and shard.is_main)
    part["indices"] = mine
    part["wall"] = time.perf_counter() - t0
    parts = gather(part, shard)
    overall = time.perf_counter() - t0
    if parts is None:
        return None
    return merge_parts(task, method, examples, parts, cfg, scoring, mc_num, overall, keep_samples, keep_ids)


def merge_parts(task: str, method: str, examples: Sequence[Example], parts: list[dict[str, Any]], cfg: AnyConfig,
                scoring: str, mc_num: int, overall: float, keep_samples: bool, keep_ids: bool) -> dict[str, Any]:
    """One result from `run_part`s over consecutive slices of `examples` (processes, or a bench row's
    resumable chunks): scores and meters added up, so a chunked run reports what one run would."""
    from ..decoding.meter import CostMeter

    n = len(examples)
    scores: list[Any] = [None] * n
    texts: list[Any] = [None] * n
    ids: list[Any] = [None] * n
    meter = CostMeter(primary=next((p["meter"].primary for p in parts if p["meter"].models), "model"))
    for p in parts:
        for j, i in enumerate(p["indices"]):
            scores[i], texts[i], ids[i] = p["scores"][j], p["texts"][j], p["ids"][j]
        meter.merge(p["meter"])
    config = next((p["config"] for p in parts if p["config"] is not None), cfg)
    summary = meter.summary()
    if len(parts) > 1:
        summary["wall_seconds"] = overall  # the run's wall clock; each rank's decoding time is below
    out: dict[str, Any] = {
        "task": task,
        "method": method,
        "scoring": scoring,
        "accuracy": sum(s["correct"] for s in scores) / n,
        "n": n,
        **summary,
        "wall_seconds_per_rank": [p["meter"].wall_seconds for p in parts],
        "world_size": len(parts),
        "config": config.to_dict(),
    }
    if scoring == "likelihood":
        out["mc_num"] = mc_num
    stats = [p["stats"] for p in parts if p["stats"]]
    if len(stats) == 1:  # speculative methods: what happened to the drafts
        out["spec"] = stats[0]
    elif stats:
        from ..methods._stats import merge_summaries

        merged = merge_summaries(stats)  # rates recomputed from the summed counters
        if merged is not None:
            out["spec"] = merged
        out["spec_per_rank"] = stats
    if any("flexible_correct" in s for s in scores):
        out["accuracy_flexible"] = sum(s.get("flexible_correct", False) for s in scores) / n
    if keep_ids and scoring == "generate":  # generated token ids (cut at EOS), for checking that a method is lossless
        out["token_ids"] = ids
    if keep_samples:
        if scoring == "likelihood":
            out["samples"] = [{"prompt": e.prompt[-200:], "gold": e.gold, **s} for e, s in zip(examples, scores)]
        else:
            out["samples"] = [{"prompt": e.prompt[-200:], "gold": e.gold, "completion": t, **s}
                              for e, t, s in zip(examples, texts, scores)]
    return out


def chat_examples(examples: Sequence[Example], model: str | None, method: str) -> list[Example]:
    """Each example's prompt as one user turn in the checkpoint's own chat template (`api.chat_prompts`)."""
    from ..api import chat_prompts

    rendered = chat_prompts(model, method, [e.prompt for e in examples])
    return [dataclasses.replace(e, prompt=p) for e, p in zip(examples, rendered)]


def run_eval(task: str, method: str, options: dict[str, Any], model: str | None = None, device: str | None = "cpu",
             dtype: str | None = None, limit: int | None = None, data: str | None = None, k_shot: int | None = None,
             split: str = "test", out: str | None = None, scoring: str = "generate", mc_num: int | None = None,
             chat: bool = False, compile: str | None = None, quantize: str | None = None) -> dict[str, Any] | None:
    """`diffspec eval`: validate everything, load, score (data-parallel under torchrun), print one
    line and write the JSON on rank 0. Returns the result on rank 0, None on the others."""
    from ..api import check_model, resolve_model
    from .flexible import flexible_accuracy

    if scoring not in SCORINGS:
        raise ValueError(f"unknown --scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    if scoring == "likelihood" and task not in LIKELIHOOD_TASKS:
        raise ValueError(f"--scoring likelihood needs a multiple-choice task ({', '.join(LIKELIHOOD_TASKS)}); "
                         f"{task!r} is scored by generation")
    if mc_num is not None and scoring != "likelihood":
        raise ValueError("--mc-num only applies to --scoring likelihood")
    cfg = task_config(task, method, **options)
    shard = shard_from_env()
    target = OutputFile.check(out, "--out") if out is not None and shard.is_main else None  # before the run
    check_model(model, method)  # a missing model is reported before missing data, as the user meets them
    examples = load_examples(task, limit=limit, split=split, data=data, k_shot=k_shot)
    if chat:
        if scoring == "likelihood":
            raise ValueError("--chat applies to --scoring generate")
        examples = chat_examples(examples, model, method)
    device = init_distributed(shard, device)
    try:
        loaded, tok = resolve_model(model, None, device, dtype, method=method, compile=compile, quantize=quantize)
        r = evaluate(task, loaded, tok, method, cfg, examples=examples, scoring=scoring,
                     mc_num=DEFAULT_MC_NUM if mc_num is None else mc_num, shard=shard)
    finally:
        if shard.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if r is None:
        return None
    family = get_method(method).family
    r["model"] = model or ("bundled:qwen3-arith" if family == "ar" else "bundled:llada-arith")
    r["chat"] = chat
    r["split"] = split
    flex_acc = flexible_accuracy(r)  # the bench table's rule: GSM8K rows only
    flex = f", flexible {flex_acc:.1%}" if flex_acc is not None else ""
    ranks = f" | {r['world_size']} ranks" if r["world_size"] > 1 else ""
    print(f"{task} [{method}, {scoring}] accuracy {r['accuracy']:.1%}{flex} on {r['n']} | forwards/seq "
          f"{r['nfe_per_sequence']:.1f} | tokens/forward {r['tokens_per_forward']:.2f} | GFLOPs {r['flops'] / 1e9:.1f} "
          f"| {r['wall_seconds']:.1f}s{ranks}")
    if target is not None:
        print(f"wrote {write_json(r, target, rescue=True)}", file=sys.stderr)
    return r


def write_json(obj: Any, path: str | Path | OutputFile, rescue: bool = False) -> Path:
    """Write `obj` as JSON atomically (temp file + os.replace), creating the directory; returns where
    it went. Pass an `OutputFile.check`-ed path to validate it before a long run; an existing file is
    replaced with a note on stderr, and any OSError becomes one `OutputError` line (see `jsonio`)."""
    out = path if isinstance(path, OutputFile) else OutputFile.check(path)
    return out.write_json(obj, rescue=rescue)
