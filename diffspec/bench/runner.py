"""`diffspec bench`: several methods on the same examples, one run, one table, one plot.

Speed-ups are ratios against the first row (the baseline) measured in the
same process on the same examples, because absolute wall-clock on a shared
machine is noise; ratios within one run are what can be compared.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..api import method_options
from ..decoding.config import DecodeConfig
from ..methods import get_method, method_names, option_owners
from ..models.checkpoint import DEFAULT_DRAFTER_DIR, DEFAULT_MODEL_DIR
from ..evaluation.evaluate import TASK_DEFAULTS, evaluate, task_config
from ..jsonio import OutputError, OutputFile, check_output_dir
from ..speculative.dualdiffusion import DualConfig
from ..tasks import Example, load_examples
from . import rows as rows_store
from .plot import pareto_plot
from .table import format_table, overloaded


# A spec's `model=PATH`: that row is decoded by the checkpoint at PATH instead of the run's model, so
# one table can compare models (e.g. llada-arith against llada2-arith). It is a row option, not a
# method option: it never reaches task_config, and opts keep it only for the label and results.
ROW_MODEL = "model"


def method_opts(opts: dict[str, Any]) -> dict[str, Any]:
    """A parsed spec's options without the row's `model=`: what the method's config is built from."""
    return {k: v for k, v in opts.items() if k != ROW_MODEL}


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'fast-dllm:cache=dual,policy=threshold,threshold=0.9' -> ('fast-dllm', {...}).

    Speculative specs also take their own options, e.g.
    'dualdiffusion:rule=exact_match,num_drafter_steps=4,drafter=self' or
    'psd:policy=local,depths=1;3;5;7' (depths separated by ';' inside a spec). Any spec may end in
    `model=PATH` (kept as given under opts["model"]): the row is decoded by that checkpoint.
    """
    method, _, rest = spec.partition(":")
    method = method.strip()
    if method not in method_names():
        raise ValueError(f"bench spec {spec!r}: unknown method {method!r}; choose one of {', '.join(method_names())}")
    fields = DecodeConfig.__dataclass_fields__
    parsers: dict[str, Any] = {k: type(f.default) for k, f in fields.items()}
    parsers.update(method_options(method))
    opts: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if eq and key == ROW_MODEL:
            if not val.strip():
                raise ValueError(f"bench spec {spec!r}: model= needs a checkpoint directory")
            opts[key] = val.strip()
            continue
        if not eq or key not in parsers:
            raise ValueError(f"bench spec {spec!r}: bad option {item!r}; "
                             f"use key=value with keys from {sorted([*parsers, ROW_MODEL])}")
        parse = parsers[key]
        try:
            val = val.strip().replace(";", ",") if key == "depths" else val.strip()
            opts[key] = parse(val)
        except ValueError:
            name = getattr(parse, "__name__", "value").lstrip("_").replace("parse_", "")
            raise ValueError(f"bench spec {spec!r}: {key} needs a {name}, got {val!r}") from None
    return method, opts


# Short names in dualdiffusion labels: N drafter steps, M verifier forwards, τ rule threshold.
_DUAL_SHORT = {"num_drafter_steps": "N", "num_verifier_steps": "M", "rule_threshold": "τ"}


def _dir_name(path: Any) -> str:
    """A checkpoint directory reads best in a label by its name ('.' by the directory it stands for)."""
    p = Path(str(path))
    return p.name or p.resolve().name or str(path)


def label_of(method: str, opts: dict[str, Any]) -> str:
    """The row's name in the table: the method and its options, then `[DIR]` for a row decoded by
    another model than the run's (`model=`), so two rows that differ only in the model are told apart."""
    label = _method_label(method, method_opts(opts))
    return f"{label} [{_dir_name(opts[ROW_MODEL])}]" if ROW_MODEL in opts else label


def _method_label(method: str, opts: dict[str, Any]) -> str:
    if method == "dualdiffusion":
        parts = [method, str(opts.get("rule", DualConfig.rule))]
        for k, v in opts.items():
            if k == "rule":
                continue
            if k == "drafter" and v != "self":
                v = _dir_name(v)
            parts.append(f"{_DUAL_SHORT.get(k, k)}={v}")
        return " ".join(parts)
    if not opts:
        return method
    def fmt(k: str, v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return ",".join(map(str, v))
        if k in ("drafter", "vp_drafter"):
            return _dir_name(v)
        return v

    return method + " " + " ".join(f"{k}={fmt(k, v)}" for k, v in opts.items())


def options_for(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Command-line overrides that apply to `method`: a speculative method's own options only to its specs."""
    own = get_method(method).options
    others = {k for k, owners in option_owners().items() if method not in owners}
    return {k: v for k, v in overrides.items() if k not in others or k in own}


POSITION_DEPTHS = "1;2;3;4;5;6;7;8"  # PSD's left-to-right drafts: every depth, so each cell is checked alone


def _suite_steps(L: int, task: str) -> list[str]:
    return [f"vanilla:steps={s}" for s in (L, L // 2, L // 4, L // 8)]


def _suite_cache(L: int, task: str) -> list[str]:
    return [
        f"vanilla:steps={L}", f"vanilla:steps={L // 2}",
        # a quarter of the steps: issue #35's target for the hard task (arith's is in the steps suite)
        *([f"vanilla:steps={L // 4}"] if task == "arith-hard" else []),
        "fast-dllm:cache=prefix,policy=schedule", "fast-dllm:cache=dual,policy=schedule",
        "fast-dllm:cache=none,policy=threshold", "fast-dllm:cache=none,policy=factor",
        "fast-dllm:cache=prefix,policy=threshold", "fast-dllm:cache=dual,policy=threshold",
        "dkv-cache:cache=dkv-decode", "dkv-cache:cache=dkv-greedy", "dkv-cache:cache=dkv-prefill",
    ]


def _suite_dual(L: int, task: str) -> list[str]:
    d = "dualdiffusion:drafter=self"
    rows = [
        f"vanilla:steps={L}", f"vanilla:steps={L // 4}", "fast-dllm:cache=dual,policy=threshold",
        "dkv-cache:cache=dkv-decode",
        f"{d},rule=exact_match,num_drafter_steps=2,verifier_view=masked",
        f"{d},rule=exact_match,num_drafter_steps=4,verifier_view=masked",
        f"{d},rule=confidence_threshold,num_drafter_steps=4,verifier_view=masked",
        f"{d},rule=trust_verifier,num_drafter_steps=4,verifier_view=masked",
        f"{d},rule=exact_match,num_drafter_steps=4,verifier_view=stepwise",
        f"{d},rule=exact_match,num_drafter_steps=4,verifier_view=drafted",
    ]
    if task in ("arith", "arith-mc") and (DEFAULT_DRAFTER_DIR / "config.json").is_file():
        # the bundled small MDM drafter: a second drafter kind on the same axes
        s = f"dualdiffusion:drafter={DEFAULT_DRAFTER_DIR}"
        rows += [f"{s},drafter_policy=schedule,drafter_cache=dual,rule=exact_match,num_drafter_steps=4,"
                 "verifier_view=masked",
                 f"{s},rule=exact_match,num_drafter_steps=4,verifier_view=masked",
                 f"{s},rule=confidence_threshold,num_drafter_steps=4,verifier_view=masked",
                 f"{s},rule=exact_match,num_drafter_steps=8,verifier_view=masked"]
    return rows


def _suite_psd(L: int, task: str) -> list[str]:
    return [
        f"vanilla:steps={L}", "fast-dllm:cache=none,policy=threshold", "fast-dllm:cache=dual,policy=threshold",
        "psd:policy=threshold", "psd:policy=threshold,depths=1;3", "psd:policy=threshold,depths=1;3;5;7;11;15",
        "psd:policy=local", "psd:policy=factor", "psd:policy=threshold,cache=dual", "psd:lossless=true",
    ]


def _suite_frontier(L: int, task: str) -> list[str]:
    # Each family's knob swept (issue #23), to draw accuracy against FLOPs, wall clock and
    # forwards with every family's Pareto front: Fast-dLLM's threshold and factor (dual cache),
    # dKV-Cache's refresh interval, DualDiffusion's drafter steps and rule threshold, PSD's
    # threshold and depths.
    d = "dualdiffusion:drafter=self,verifier_view=masked"
    return [
        f"vanilla:steps={L}", f"vanilla:steps={L // 2}",
        # a quarter of the steps: issue #35's target for the hard task (arith's is in the steps suite)
        *([f"vanilla:steps={L // 4}"] if task == "arith-hard" else []),
        *[f"fast-dllm:cache=dual,policy=threshold,threshold={t}" for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)],
        *[f"fast-dllm:cache=dual,policy=factor,factor={f}" for f in (0.5, 1.0, 2.0)],
        *[f"dkv-cache:cache=dkv-decode,refresh_interval={n}" for n in (2, 4, 8)], "dkv-cache:cache=dkv-prefill",
        *[f"{d},num_drafter_steps={n}" for n in (2, 4, 8)],
        f"{d},rule=confidence_threshold,rule_threshold=0.5,num_drafter_steps=4",
        f"{d},rule=confidence_threshold,rule_threshold=0.9,num_drafter_steps=4",
        *[f"psd:policy=threshold,threshold={t}" for t in (0.7, 0.9, 0.99)],
        # (PSD lossless is in the psd suite: 71 TFLOPs on 500 problems, dominated on every axis by
        # the left-to-right drafts below)
        "psd:policy=threshold,depths=1;3",
        # beyond the papers (issue #23): drafts checked left to right, and a confidence requirement
        *[f"psd:threshold={t},draft_order=position,depths={POSITION_DEPTHS}{c}"
          for t, c in ((1.0, ""), (1.0, ",cache=dual"), (0.99, ",cache=dual"))],
        "psd:threshold=0.9,accept_threshold=0.9,cache=dual",
        "dualdiffusion:drafter=self,rule=exact_match,verifier_view=leftward,num_drafter_steps=2",
    ]


def _suite_dream(L: int, task: str) -> list[str]:
    # Run on a Dream model (default: the bundled diffspec/assets/dream-arith). Dream's own
    # whole-sequence sampler: each alg at full steps, the confidence algs at fewer steps; then
    # LLaDA's block loop and Fast-dLLM / dKV-Cache / PSD on the same shifted-logit network.
    return [
        f"dream:alg=entropy,steps={L}", f"dream:alg=origin,steps={L}", f"dream:alg=maskgit_plus,steps={L}",
        f"dream:alg=topk_margin,steps={L}",
        *[f"dream:alg={a},steps={s}" for s in (L // 2, L // 4) for a in ("entropy", "maskgit_plus")],
        f"dream:alg=origin,steps={L // 2}",
        f"vanilla:steps={L}", f"vanilla:steps={L // 4}",
        "fast-dllm:cache=prefix,policy=threshold", "fast-dllm:cache=dual,policy=threshold",
        "fast-dllm:cache=dual,policy=threshold,threshold=0.99", "dkv-cache:cache=dkv-prefill",
        "psd:policy=threshold", "dualdiffusion:drafter=self,rule=exact_match,verifier_view=leftward,"
        "num_drafter_steps=2",
    ]


def _suite_d2sd(L: int, task: str) -> list[str]:
    # Speculative rows decode one prompt at a time, so the baseline is AR greedy at batch 1 (a
    # latency comparison); AR at its default batch of 8 comes last, for the throughput view.
    return ["ar:batch_size=1", "ar-spec:gamma=4", "dflash", "d2sd:k=1", "d2sd:k=2", "d2sd", "d2sd:k=8",
            "d2sd:gamma2=24", "d2sd:gamma2=48", "ar"]


def _suite_d2sd_smollm2(L: int, task: str) -> list[str]:
    # Issue #19: the AR family on real text (run with --model smollm2 --task gsm8k --chat --k-shot 0
    # --gen-length 256): AR greedy at batch 1 (the baseline) and batched, AR-spec, DFlash, D²SD K = 1, 2, 4.
    return ["ar:batch_size=1", "ar-spec:gamma=4", "dflash", "d2sd:k=1", "d2sd:k=2", "d2sd:k=4", "ar"]


def _suite_spec_smollm2(L: int, task: str) -> list[str]:
    # Issue #34's re-run of d2sd-smollm2 with the retrained drafters, each speculative method at the
    # sizes it picks on the device (ar-spec gamma=auto, dflash drafts=auto, d2sd k=auto), against AR
    # greedy at batch 1 (the baseline) and batched. D²SD, the slowest row on a CPU, comes last.
    return ["ar:batch_size=1", "ar-spec:gamma=auto", "dflash:drafts=auto", "ar", "d2sd:k=auto"]


def _suite_block(L: int, task: str) -> list[str]:
    # Issue #39: a block-diffusion model (default: the bundled llada2-arith) against the bidirectional
    # model it was converted from (llada-arith, rows with model=): the baseline is that model's vanilla
    # decoding at full steps; Fast-dLLM's approximate dual cache on it; the block samplers with the
    # exact block cache (and once without it: same ids, more FLOPs); PSD and DualDiffusion within a block.
    teacher = f"model={os.path.relpath(DEFAULT_MODEL_DIR)}"
    return [
        f"vanilla:steps={L},{teacher}",
        *[f"fast-dllm:cache=dual,policy=threshold,threshold={t},{teacher}" for t in (0.7, 0.9, 0.99)],
        *[f"llada2:block_length=4,steps=4,threshold={t}" for t in (0.7, 0.9, 0.99, 1.0)],
        "llada2:block_length=4,steps=4,threshold=0.9,cache=none",
        *[f"llada2:block_length={b},steps={b},threshold=0.9" for b in (8, 16)],
        "llada2:block_length=4,steps=4,factor=1.0",
        "sdar",
        "psd:block_length=8,threshold=1.0,draft_order=position,depths=1;2;3;4;5;6;7,cache=dual",
        "psd:block_length=8,threshold=0.9,depths=1;3;5;7,cache=dual",
        "dualdiffusion:drafter=self,rule=exact_match,verifier_view=leftward,num_drafter_steps=2,"
        "drafter_threshold=0.5,block_length=8,drafter_cache=dual",
    ]


# One builder per suite: (the task's gen_length L, the task) -> its rows' method specs.
SUITES: dict[str, Callable[[int, str], list[str]]] = {
    "steps": _suite_steps,
    "cache": _suite_cache,
    "dual": _suite_dual,
    "psd": _suite_psd,
    "frontier": _suite_frontier,
    "dream": _suite_dream,
    "d2sd": _suite_d2sd,
    "d2sd-smollm2": _suite_d2sd_smollm2,
    "spec-smollm2": _suite_spec_smollm2,
    "block": _suite_block,
}


def suite(name: str, task: str) -> list[str]:
    """The method specs of bench suite `name` for `task` (whose default gen_length sets the step counts)."""
    if task not in TASK_DEFAULTS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_DEFAULTS)}")
    build = SUITES.get(name)
    if build is None:
        choices = ", ".join(SUITES)
        raise ValueError(f"unknown suite {name!r}; choose {choices.rpartition(', ')[0]} or {list(SUITES)[-1]}")
    return build(TASK_DEFAULTS[task]["gen_length"], task)


BENCH_FILES = ("results.json", "table.md", "pareto.png")


def machine_load() -> dict[str, float]:
    """Load average (1 min) and this process's CPU seconds now: a row's wall clock means little
    when the machine was busy with something else."""
    return {"loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
            "cpu_seconds": time.process_time()}


def load_during(start: dict[str, float]) -> dict[str, Any]:
    end = machine_load()
    return {"loadavg_start": start["loadavg"], "loadavg_end": end["loadavg"],
            "cpu_seconds": end["cpu_seconds"] - start["cpu_seconds"], "cores": os.cpu_count() or 1}


def _worse_load(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {**a, "loadavg_start": max(a["loadavg_start"], b["loadavg_start"]),
            "loadavg_end": max(a["loadavg_end"], b["loadavg_end"])}


def _load_note(load: dict[str, Any]) -> str:
    if not overloaded(load):
        return ""
    return (f" (machine load {max(load['loadavg_start'], load['loadavg_end']):.1f} on {load['cores']} cores: "
            "wall clock unreliable)")


def plan_bench(specs: list[str], task: str, overrides: dict[str, Any] | None = None
               ) -> tuple[list[tuple[str, dict[str, Any]]], list[Any]]:
    """Every spec parsed and turned into its config, and every row's `model=` checked (without
    loading weights), so a bad one fails before anything runs."""
    if not specs:
        raise ValueError("no methods to benchmark")
    parsed = [parse_spec(s) for s in specs]
    configs = [task_config(task, m, strict=False, **{**options_for(m, overrides or {}), **method_opts(o)})
               for m, o in parsed]
    for spec, (method, opts) in zip(specs, parsed):
        if ROW_MODEL in opts:
            check_row_model(spec, method, opts[ROW_MODEL])
    return parsed, configs


def check_row_model(spec: str, method: str, path: str) -> None:
    """A row's `model=` directory exists and holds a config.json of a model the row's method decodes:
    what `api.check_model` checks before any weights are read, with the spec named, so a typo in the
    last row of a suite fails at once rather than after hours of the rows before it."""
    from ..api import check_model

    try:
        check_model(str(Path(path).expanduser()), method)
    except (ValueError, OSError) as e:
        raise ValueError(f"bench spec {spec!r}: model={path}: {e}") from None


def _placement(model: Any) -> tuple[Any, torch.dtype | None]:
    """The device and dtype of the run model's first floating-point tensor: rows with `model=` run
    there too, so their costs and wall clocks compare with the other rows'."""
    if isinstance(model, torch.nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
    return "cpu", None


def load_row_models(specs: list[str], parsed: list[tuple[str, dict[str, Any]]], model: Any, tokenizer: Any
                    ) -> list[tuple[Any, Any]]:
    """Each row's (model, tokenizer): the run's, or for a spec with `model=PATH` the checkpoint at PATH
    (relative to the current directory) on the run model's device and dtype with its own tokenizer.
    Each distinct directory is loaded once per run, and all of them before any row decodes, so a
    corrupt checkpoint fails first and the row keys can hash every row's weights."""
    from ..api import load_any

    device, dtype = _placement(model)
    loaded: dict[str, tuple[Any, Any]] = {}
    out = []
    for spec, (method, opts) in zip(specs, parsed):
        if ROW_MODEL not in opts:
            out.append((model, tokenizer))
            continue
        path = Path(opts[ROW_MODEL]).expanduser()
        where = str(path.resolve()) if path.exists() else str(path)  # 'smollm2' is a name, not a path
        if where not in loaded:
            try:
                loaded[where] = load_any(str(path), device=device, dtype=dtype, method=method)
            except (ValueError, OSError, RuntimeError) as e:
                raise ValueError(f"bench spec {spec!r}: cannot load model={opts[ROW_MODEL]}: {e}") from None
        out.append(loaded[where])
    return out


def _vocab(tokenizer: Any) -> dict[str, int] | None:
    """The tokenizer's token -> id map (None when it does not expose one)."""
    hf = getattr(tokenizer, "hf", tokenizer)
    get = getattr(hf, "get_vocab", None)
    if get is None:
        return None
    try:
        return get(with_added_tokens=True)
    except TypeError:
        return get()


def same_vocab_as_baseline(tokenizers: Sequence[Any]) -> list[bool]:
    """Whether each row's tokenizer maps tokens to ids as the baseline row's does: only then do equal
    ids mean equal text, so only then is the lossless check meaningful across models."""
    base = _vocab(tokenizers[0])
    return [t is tokenizers[0] or (base is not None and _vocab(t) == base) for t in tokenizers]


def check_bench_out(out_dir: str | Path) -> dict[str, OutputFile]:
    """The run's output files, checked before any decoding: the directory exists (or is created) and
    is writable, and none of the files is in the way as a directory. A bench run takes minutes to
    hours; finding out afterwards that its results cannot be saved would lose them."""
    d = check_output_dir(out_dir, "bench output directory (--out)")
    return {name: OutputFile.check(d / name) for name in BENCH_FILES}


def save_bench(result: dict[str, Any], table: str, outputs: dict[str, OutputFile], title: str) -> list[Path]:
    """Write results.json, table.md and pareto.png (each atomically); try all three, then raise one
    OutputError naming every failure. A results.json that cannot be written is rescued to the
    system's temp directory (the error says where), so the run is never lost."""
    written, errors = [], []
    writers = {
        "results.json": lambda out: out.write_json(result, rescue=True),
        "table.md": lambda out: out.write_text(table + "\n"),
        "pareto.png": lambda out: out.write_with(lambda tmp: pareto_plot(result["rows"], tmp, title=title)),
    }
    for name, write in writers.items():
        try:
            written.append(write(outputs[name]))
        except OutputError as e:
            errors.append(str(e))
    if errors:
        raise OutputError("; ".join(errors))
    return written


def decode_in_chunks(task: str, model: Any, tokenizer: Any, method: str, cfg: Any, examples: Sequence[Example],
                     out_dir: Path, key: str, chunk: int, resume: bool,
                     shard: tuple[int, int] | None = None) -> dict[str, Any] | None:
    """One row decoded a few batches at a time, each chunk saved as it finishes (and, with `resume`,
    reused), then merged exactly as data-parallel parts are: ids and scores per example, meters
    summed, speculative counters summed and their rates recomputed. Chunks are whole batches, so
    every batch holds the prompts a whole-row run would give it and the ids are the same. A chunk's
    key is the row's (`key`: spec, config, model, drafters) with the chunk's own examples, so a run
    over more examples (a larger --limit) reuses the chunks it shares with a smaller one.

    With `shard` = (i, n) only chunks number i, i + n, i + 2n, … are decoded; the others are taken
    from disk when another shard has saved them. n processes sharing one --out thus split a row
    that would otherwise keep one core busy alone, and a row still missing chunks returns None."""
    from ..evaluation.evaluate import DEFAULT_MC_NUM, merge_parts, run_part, config_value

    bs = int(config_value(cfg, "batch_size", 32))
    size = -(-chunk // bs) * bs
    parts: list[dict[str, Any] | None] = []
    reused, later = 0, []
    for number, start in enumerate(range(0, len(examples), size)):
        end = min(start + size, len(examples))
        part_key = rows_store.chunk_key(key, examples[start:end])
        part = rows_store.load_part(out_dir, part_key, start, end) if resume else None
        if part is None and shard is not None and number % shard[1] != shard[0]:
            later.append((len(parts), part_key, start, end))  # another shard's chunk, not saved yet
            parts.append(None)
            continue
        if part is None:
            print(f"[bench]   examples {start + 1}-{end} of {len(examples)}", file=sys.stderr)
            part = run_part(task, list(examples[start:end]), model, tokenizer, method, cfg, "generate",
                             DEFAULT_MC_NUM, True)
            part.update(indices=list(range(start, end)), measured_at=time.strftime("%Y-%m-%d %H:%M:%S"))
            rows_store.save_part(out_dir, part_key, start, end, part)
        else:
            reused += 1
        parts.append(part)
    for i, part_key, start, end in later:  # the other shards may have saved theirs while this one decoded
        parts[i] = rows_store.load_part(out_dir, part_key, start, end)
        reused += parts[i] is not None
    missing = sum(p is None for p in parts)
    if missing:
        print(f"[bench]   {missing} chunk(s) of this row are left to the other shards", file=sys.stderr)
        return None
    wall = sum(p["meter"].wall_seconds for p in parts)
    r = merge_parts(task, method, examples, parts, cfg, "generate", DEFAULT_MC_NUM, wall, False, True)
    for k in ("wall_seconds_per_rank", "spec_per_rank"):  # chunks are not ranks
        r.pop(k, None)
    r["world_size"] = 1
    r["chunks"] = {"examples_per_chunk": size, "chunks": len(parts), "reused": reused}
    return r


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N) as given to --shard."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N, this process's number and the number of processes "
                         f"(e.g. 0/2 and 1/2), got {text!r}") from None
    return i, n


def check_run_options(repeats: int, resume: bool, chunk: int, shard: tuple[int, int] | None) -> None:
    """How repeats, --resume, --chunk and --shard combine: checked by the CLI before it loads a model,
    and by `run_bench` for API callers."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if resume and repeats > 1:
        raise ValueError("--resume reuses single runs of each row; it cannot be combined with --repeats > 1")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
        raise ValueError(f"chunk must be an integer >= 0 (0 = whole rows), got {chunk!r}")
    if chunk and repeats > 1:
        raise ValueError("--chunk saves single runs of each row; it cannot be combined with --repeats > 1")
    if shard is None:
        return
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {i}/{n}")
    if not chunk:
        raise ValueError("--shard splits rows by chunks: give --chunk N too")
    if not resume:
        raise ValueError("--shard processes share their chunks through --out: give --resume too, so each "
                         "takes the chunks the others have finished")


def run_bench(
    model: Any,
    tokenizer: Any,
    specs: list[str],
    task: str = "arith",
    limit: int = 500,
    out_dir: str | Path = "bench-out",
    data: str | None = None,
    overrides: dict[str, Any] | None = None,
    command: str | None = None,
    repeats: int = 1,
    examples: Sequence[Example] | None = None,
    resume: bool = False,
    chunk: int = 0,
    shard: tuple[int, int] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Run every spec on the same examples; with `repeats` > 1 the rows run that many times,
    interleaved (row 1, 2, …, 1, 2, …), and each row's wall clock is the median of its runs, so a
    burst of load on a shared machine hits one run of every row instead of one whole row.

    With repeats = 1 every finished row is saved under out_dir/rows (see `bench.rows`); `resume`
    reuses the saved rows whose spec, config, examples, model and drafters all match, so a run that
    stopped (or a suite split over sessions) goes on from where it was. With `chunk` > 0 a row is
    decoded and saved `chunk` examples at a time (rounded up to whole batches), so even a row longer
    than a sitting resumes part-way (see `decode_in_chunks`).

    `shard` = (i, n) makes this process one of n that share `out_dir`: it decodes only its share of
    each row's chunks and writes the table only when its rows are whole (the last shard to finish).
    Running again without `shard` and with `resume` assembles the table without decoding again.

    A spec with `model=PATH` is decoded by that checkpoint and its tokenizer (`load_row_models`), the
    others by `model`. `examples` are shared text: the CLI refuses --chat with such rows, since a chat
    template rendered for `model` may not be the other model's."""
    check_run_options(repeats, resume, chunk, shard)
    parsed, configs = plan_bench(specs, task, overrides)  # validate all first: every spec,
    outputs = check_bench_out(out_dir)  # where the results will go,
    models = load_row_models(specs, parsed, model, tokenizer)  # and every row's model (`model=`)
    if examples is None:  # (given: e.g. chat-templated by the CLI's --chat)
        examples = load_examples(task, limit=limit, split=split, data=data)
    keys, chunk_keys = _row_keys(specs, configs, task, examples, [m for m, _ in models], repeats)
    if shard is not None and not all(keys):
        raise ValueError("--shard needs rows that can be saved and resumed: a diffspec model (torch module), "
                         "not an external backend")
    run = _BenchRun(task, models, examples, outputs["results.json"].path.parent, keys, chunk_keys,
                    chunk, resume, shard, walls=[[] for _ in specs])
    for rep in range(repeats):
        for i, ((method, opts), cfg, spec) in enumerate(zip(parsed, configs, specs)):
            run.row(i, len(specs), rep, repeats, method, opts, cfg, spec)
    if run.unfinished:
        print(f"[bench] shard {shard[0]}/{shard[1]} done; rows still missing other shards' chunks: "
              f"{', '.join(run.unfinished)}. Once every shard has finished, run the same command without --shard "
              "(with --resume) to assemble the table.", file=sys.stderr)
        return {"shard": list(shard), "unfinished_rows": run.unfinished,
                "finished_rows": [r["label"] for r in run.rows]}
    if repeats > 1:
        for r, w in zip(run.rows, run.walls):
            r["wall_seconds_repeats"] = w
            r["wall_seconds"] = statistics.median(w)
    _compare_to_baseline(run.rows, same_vocab_as_baseline([t for _, t in models]))
    result = _bench_result(task, examples, command, run.resumed, run.rows, split)
    table = format_table(run.rows)
    print(table)  # before saving: a failure to save never hides the numbers
    written = save_bench(result, table, outputs, title=f"{task}: accuracy vs cost ({len(examples)} "
                                                        f"{'' if split == 'test' else split + ' '}examples)")
    print(f"\nwrote {', '.join(map(str, written))}", file=sys.stderr)
    return result


def _row_keys(specs: list[str], configs: list[Any], task: str, examples: Sequence[Example], models: Sequence[Any],
              repeats: int) -> tuple[list[str | None], list[str | None]]:
    """Each row's key in the saved-rows store and its chunks' key (None: the row is not saved, as with
    repeats > 1 or an external backend). `models` are the rows' own models (`model=` or the run's):
    each key hashes its row's weights, so --resume never takes a row another model measured. Chunks
    are keyed by their own examples, so a run over more examples reuses the first ones."""
    if repeats != 1:
        return [None] * len(specs), [None] * len(specs)
    ex_hash = rows_store.examples_fingerprint(examples)
    hashes: dict[int, str] = {}  # a model shared by several rows is hashed once
    keys: list[str | None] = []
    chunk_keys: list[str | None] = []
    for s, c, m in zip(specs, configs, models):
        if not isinstance(m, torch.nn.Module):
            keys.append(None)
            chunk_keys.append(None)
            continue
        if id(m) not in hashes:
            hashes[id(m)] = rows_store.weights_fingerprint(m)
        h = hashes[id(m)]
        keys.append(rows_store.row_key(s, task, c, ex_hash, h, m))
        chunk_keys.append(rows_store.row_key(s, task, c, rows_store.WITHOUT_EXAMPLES, h, m))
    return keys, chunk_keys


@dataclass
class _BenchRun:
    """What one `run_bench` call shares between its rows, and the rows it has so far (a row is
    reused from the store, measured, or left unfinished for other shards)."""

    task: str
    models: list[tuple[Any, Any]]  # each row's (model, tokenizer): the run's, or its spec's model=
    examples: Sequence[Example]
    out_path: Path
    keys: list[str | None]
    chunk_keys: list[str | None]
    chunk: int
    resume: bool
    shard: tuple[int, int] | None
    walls: list[list[float]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)

    def row(self, i: int, n: int, rep: int, repeats: int, method: str, opts: dict[str, Any], cfg: Any,
            spec: str) -> None:
        """Row i's repeat `rep`: reuse it when saved, else measure it and keep (repeat 0) or check it."""
        label = label_of(method, opts)
        saved = rows_store.load_row(self.out_path, self.keys[i]) if self.resume and self.keys[i] else None
        if saved is not None:
            print(f"[bench] row {i + 1}/{n}: {label}: reusing the row measured at {saved.get('measured_at')} "
                  f"(accuracy {saved['accuracy']:.1%})", file=sys.stderr)
            self.rows.append(saved)
            self.resumed.append(label)
            return
        again = f" (repeat {rep + 1}/{repeats})" if repeats > 1 else ""
        print(f"[bench] row {i + 1}/{n}{again}: {label} on {len(self.examples)} {self.task} examples",
              file=sys.stderr)
        r = self._measure(i, method, cfg)
        if r is None:
            self.unfinished.append(label)
            return
        self.walls[i].append(r["wall_seconds"])
        print(f"[bench] row {i + 1}/{n}: accuracy {r['accuracy']:.1%}, {r['nfe_per_sequence']:.1f} forwards/seq, "
              f"{r['flops'] / 1e9:,.1f} GFLOPs, {r['wall_seconds']:.1f} s{_load_note(r['load'])}", file=sys.stderr)
        if rep == 0:
            r.update(label=label, bench_spec=spec)  # r["spec"] holds the method's stats
            if ROW_MODEL in opts:
                r[ROW_MODEL] = opts[ROW_MODEL]  # as given in the spec: which model decoded this row
            self.rows.append(r)
            if self.keys[i]:  # kept at once: a run stopped later still has this row
                rows_store.save_row(self.out_path, self.keys[i], spec, r)
        elif r["token_ids"] != self.rows[i]["token_ids"]:
            raise RuntimeError(f"row {label!r} decoded different token ids on repeat {rep + 1}: "
                               "the method is not deterministic under a fixed seed")
        else:
            self.rows[i]["load"] = _worse_load(self.rows[i]["load"], r["load"])

    def _measure(self, i: int, method: str, cfg: Any) -> dict[str, Any] | None:
        """Decode row i on every example (in saved chunks when asked); None when other shards' chunks
        are still missing."""
        start = machine_load()
        model, tokenizer = self.models[i]  # the row's own tokenizer: prompts are text, encoded per model
        if self.chunk and self.keys[i]:
            r = decode_in_chunks(self.task, model, tokenizer, method, cfg, self.examples, self.out_path,
                                 self.chunk_keys[i], self.chunk, self.resume, self.shard)
            if r is None:
                return None
        else:
            r = evaluate(self.task, model, tokenizer, method, cfg, examples=self.examples, progress=True,
                         keep_samples=False, keep_ids=True)
        r["load"] = load_during(start)
        r["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        return r


def _compare_to_baseline(rows: list[dict[str, Any]], comparable: Sequence[bool] | None = None) -> None:
    """Add each row's lossless check and speed-ups against the first row, dropping its token ids.
    A row whose tokenizer differs from the baseline's (`comparable` False) gets None for the lossless
    check: its ids name other tokens, so equal or unequal ids would say nothing about the text."""
    base = rows[0]
    base_ids = base["token_ids"]
    for i, r in enumerate(rows):
        # Lossless check: the share of examples whose generated ids equal the baseline's exactly.
        ids = r.pop("token_ids")
        same = comparable is None or comparable[i]
        r["same_ids_as_baseline"] = sum(a == b for a, b in zip(ids, base_ids)) / len(base_ids) if same else None
        r["speedup_wall"] = base["wall_seconds"] / r["wall_seconds"] if r["wall_seconds"] else float("nan")
        r["speedup_flops"] = base["flops"] / r["flops"] if r["flops"] else float("nan")
        r["speedup_nfe"] = base["nfe_per_sequence"] / r["nfe_per_sequence"] if r["nfe_per_sequence"] else float("nan")
        r["accuracy_delta"] = r["accuracy"] - base["accuracy"]


def _bench_result(task: str, examples: Sequence[Example], command: str | None, resumed: list[str],
                  rows: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """results.json: the rows and what they ran on."""
    return {
        "task": task,
        "split": split,
        "n": len(examples),
        "baseline": rows[0]["label"],
        "command": command,
        "first_prompt": examples[0].prompt,  # the prompt format every row saw (chat template, shots)
        "resumed_rows": resumed,  # measured by an earlier run into the same --out (see each row's measured_at)
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")},
        "rows": rows,
    }
