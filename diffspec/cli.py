"""`diffspec generate | eval | bench | train` — thin argparse layer over the API.

User errors (bad options, missing or corrupt checkpoints, unknown tasks,
unwritable output paths, argparse's own complaints) print one
`diffspec: error: ...` line and exit 2; only real bugs traceback. Output
paths are checked before any decoding, so a long run never ends in an error
about where to put its result.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from .methods import all_methods, get_method, method_names
from .options import parse_bool

# OSError: the file system said no (permissions, a full disk, a path in the way), never a bug of ours.
# (A CheckpointError is a ValueError.) Nothing here imports torch: help and argument errors are instant.
USER_ERRORS = (ValueError, OSError, NotImplementedError)

# The shared decoding flags (DecodeConfig fields); each method's own flags come from the registry.
DECODE_KEYS = ["gen_length", "block_length", "steps", "remasking", "temperature", "cfg_scale", "policy", "threshold",
               "factor", "local_threshold", "local_radius", "cache", "refresh_interval", "seed", "batch_size",
               "logits_eos_inf", "confidence_eos_eot_inf"]


class UsageError(ValueError):
    """An argparse complaint (unknown flag, `--steps abc`), reported like every other user error."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: its default prints the usage block and exits from inside."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _decode_args(p: argparse.ArgumentParser, with_method: bool = True) -> None:
    g = p.add_argument_group("decoding (defaults: the method's, and the task's for lengths)")
    if with_method:
        g.add_argument("--method", default="vanilla", help="; ".join(
            f"{m.name}: {m.summary}" for m in all_methods()) + " (default vanilla; the last four need an "
            "AR (Qwen3) target and use the bundled one without --model)")
    g.add_argument("--gen-length", type=int, help="tokens to generate (the task's default: 48 for arith)")
    g.add_argument("--block-length", type=int, help="semi-autoregressive block size, must divide gen-length "
                                                    "(default 16)")
    g.add_argument("--steps", type=int, help="denoising steps for the schedule policy (default gen-length)")
    g.add_argument("--remasking", help="low_confidence (default) | random")
    g.add_argument("--temperature", type=float, help="0 = greedy (default); > 0 samples (Gumbel in float64 for "
                                                     "diffusion models)")
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default 0 = off)")
    g.add_argument("--policy", help="schedule | threshold | factor | local (default: the method's: schedule for "
                                    "vanilla / dkv-cache, threshold for fast-dllm / psd)")
    g.add_argument("--threshold", type=float, help="confidence threshold in (0, 1] for --policy threshold / local "
                                                   "(default 0.9)")
    g.add_argument("--factor", type=float, help="factor > 0 for --policy factor (default 1.0)")
    g.add_argument("--local-threshold", type=float,
                   help="--policy local: relaxed threshold for cells next to a confident anchor (default 0.7)")
    g.add_argument("--local-radius", type=int, help="--policy local: columns an anchor reaches (default 1)")
    g.add_argument("--cache", help="none | prefix | dual (fast-dllm; default dual) | dkv-decode | dkv-greedy | "
                                   "dkv-prefill (dkv-cache; default dkv-prefill); vanilla: none")
    g.add_argument("--refresh-interval", type=int, help="dKV-Cache: full refresh every N steps of a block (default 8)")
    g.add_argument("--logits-eos-inf", action="store_const", const=True,
                   help="LLaDA sampler option: never propose EOS (default off)")
    g.add_argument("--confidence-eos-eot-inf", action="store_const", const=True,
                   help="LLaDA sampler option: cells whose candidate is EOS or <|eot_id|> get confidence 0, "
                        "so the answer's end is committed last (default off)")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--batch-size", type=int, help="prompts decoded together (default 32; 8 for ar)")
    d = p.add_argument_group("dualdiffusion's verifier")
    d.add_argument("--verifier", help="the verifier's checkpoint directory: another name for --model "
                                      "(default the bundled model)")
    d.add_argument("--no-progress-guard", dest="progress_guard", action="store_const", const=False,
                   help="turn off the progress guard (on by default: a row that made no progress gets the "
                        "verifier's argmax in its leftmost re-masked cell); gives the bare loop")
    _method_args(p)
    m = p.add_argument_group("model")
    m.add_argument("--model", help="checkpoint directory (default: the bundled model of the method's family)")
    m.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    m.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on cpu, bf16 on cuda)")
    m.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="compile the model's forward with torch.compile (backend inductor, or eager / aot_eager / "
                        "cudagraphs; default off). Pays on a GPU, if at all: see benchmarks/gpu")
    m.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: the transformer blocks' matmuls with int8 weights (CPU, float32; default off). "
                        "Another model: speculative methods stay lossless against AR greedy of the same weights")


def _method_args(p: argparse.ArgumentParser) -> None:
    """One flag per method-specific option of the registry, grouped under the first method that owns
    it, so a new method's options appear here without touching this file."""
    seen = {a.dest for a in p._actions}
    for method in all_methods():
        new = [k for k in method.options if k not in seen]
        if not new:
            continue
        g = p.add_argument_group(f"{method.name} options")
        for k in new:
            owners = [n for n in method_names() if k in get_method(n).options]
            extra = f" [{', '.join(owners)}]" if len(owners) > 1 else ""
            opt = method.options[k]
            flag = "--" + k.replace("_", "-")
            if opt.parse is parse_bool:
                g.add_argument(flag, dest=k, nargs="?", const=True, type=parse_bool, help=opt.help + extra)
            else:
                g.add_argument(flag, dest=k, type=opt.parse, help=opt.help + extra)
            seen.add(k)


def _verifier_is_model(a: argparse.Namespace) -> None:
    """DualDiffusion's verifier is the model under --model; --verifier names it in the paper's terms."""
    verifier = getattr(a, "verifier", None)
    if verifier is None:
        return
    if getattr(a, "method", "dualdiffusion") != "dualdiffusion":  # bench has no --method: its specs pick methods
        raise ValueError(f"--verifier is a dualdiffusion option (method {a.method}); use --model")
    if a.model is not None and a.model != verifier:
        raise ValueError(f"--verifier {verifier} and --model {a.model} name different models; the verifier is "
                         "the model, so give one of them")
    a.model = verifier


def _options(a: argparse.Namespace) -> dict:
    """Every decoding option the user gave (None: not given), shared and method-specific alike."""
    keys = DECODE_KEYS + [k for m in all_methods() for k in m.options]
    return {k: getattr(a, k) for k in dict.fromkeys(keys) if getattr(a, k, None) is not None}


def cmd_generate(a: argparse.Namespace) -> None:
    from .api import chat_prompts, generate, resolve_model
    from .evaluation.evaluate import task_config
    from .tasks import gsm8k_prompt

    if a.system is not None and not a.chat:
        raise ValueError("--system only applies with --chat")
    if a.chat and a.template not in (None, "raw"):
        raise ValueError(f"--chat renders the prompt with the chat template; drop --template {a.template}")
    template = a.template or ("qa" if a.model is None and not a.chat else "raw")
    if template not in ("qa", "raw"):
        raise ValueError(f"unknown --template {template!r}; use qa or raw")
    if not a.prompt.strip():  # checked before the template wraps it in text that is never empty
        raise ValueError("--prompt is empty; give some text to complete")
    prompt = gsm8k_prompt(a.prompt) if template == "qa" else a.prompt
    if a.chat:
        prompt = chat_prompts(a.model, a.method, [prompt], system=a.system)[0]
    opts = _options(a)
    cfg = task_config("arith", a.method, **opts)
    model, tok = resolve_model(a.model, None, a.device, a.dtype, method=a.method, compile=a.compile,
                               quantize=a.quantize)
    res = generate([prompt], model=model, tokenizer=tok, method=a.method, config=cfg)
    print(res.texts[0])  # exactly the API's text (a leading space included), so prompt + output is the full text
    s = res.meter.summary()
    per_model = ""
    if len(s["models"]) > 1:  # speculative: the paper's steps = drafter + verifier forwards
        per_model = " (" + " + ".join(f"{name} {c['nfe']}" for name, c in s["models"].items()) + ")"
    print(f"[{a.method}] forwards {s['nfe']}{per_model}, tokens/forward {s['tokens_per_forward']:.2f}, "
          f"GFLOPs {s['flops'] / 1e9:.2f}, {s['wall_seconds']:.2f}s", file=sys.stderr)
    for field in ("k", "drafts", "gamma"):  # --k / --drafts / --gamma auto: what it chose and from what, so
        auto = (res.stats or {}).get(f"auto_{field}") if isinstance(res.stats, dict) else None
        if auto:  # the next run can pass the number directly
            timed = ", ".join(f"{_sizes(c, field)} {c['tokens_per_second']:.1f} tok/s" for c in auto["candidates"])
            if timed and auto.get("estimate"):  # from one decode and timed forwards (sizing.estimate_chain)
                timed = "estimated: " + timed
            why = (f" ({timed}; {auto['calibration_seconds']:.1f}s of calibration, included above)" if timed else
                   " (the calibration answer was too short to time: the default)")
            chose = _sizes(auto.get("chosen_settings") or {field: auto["chosen"]}, field)
            print(f"[{a.method}] --{field} auto chose {chose}{why}", file=sys.stderr)


_MEASURED = {"seconds", "tokens", "acceptance_length", "mean_tree_nodes", "tokens_per_second", "width_ms", "round_ms"}


def _sizes(row: dict, field: str) -> str:
    """'k=1' or, for a D²SD small tree, 'k=1,drafts=3,branch=4': the sizes a calibration row set."""
    return ",".join(f"{f}={v}" for f, v in row.items() if f not in _MEASURED) or f"{field}=?"


def cmd_eval(a: argparse.Namespace) -> None:
    from .evaluation.evaluate import run_eval

    # Checks the --out path before the run, scores (data-parallel under torchrun), prints one line
    # and writes the JSON on rank 0.
    run_eval(a.task, a.method, _options(a), model=a.model, device=a.device, dtype=a.dtype, limit=a.limit,
             data=a.data, k_shot=a.k_shot, split=a.split, out=a.out, scoring=a.scoring, mc_num=a.mc_num, chat=a.chat,
             compile=a.compile, quantize=a.quantize)


def cmd_bench(a: argparse.Namespace) -> None:
    from .api import check_model, resolve_model
    from .bench.runner import (ROW_MODEL, check_bench_out, check_run_options, parse_shard, plan_bench, run_bench,
                               suite)
    from .methods import method_names

    AR_METHODS = method_names("ar")
    specs = a.methods or suite(a.suite, a.task)
    overrides = _options(a)
    shard = parse_shard(a.shard) if a.shard is not None else None
    check_run_options(a.repeats, a.resume, a.chunk, shard)  # before loading a model
    # One --model per run, so AR-target and diffusion methods are benchmarked in separate runs (a row
    # with its own model= is checked against that model by plan_bench instead).
    is_ar = {spec.partition(":")[0].strip() in AR_METHODS for spec in specs if not _has_row_model(spec)}
    if len(is_ar) > 1:
        raise ValueError("a bench run compares methods on one model: run the AR-target methods (ar, ar-spec, "
                         "dflash, d2sd) and the diffusion methods in separate runs")
    parsed, _ = plan_bench(specs, a.task, overrides)  # bad specs, options, model= fail before --out is made
    if a.chat and any(ROW_MODEL in opts for _, opts in parsed):
        raise ValueError("--chat renders every prompt with --model's chat template, which a row with its own "
                         "model= may not share: run those rows without --chat, or in a run of their own with --model")
    if (a.compile or a.quantize) and any(ROW_MODEL in opts for _, opts in parsed):
        raise ValueError("--compile / --quantize apply to --model only; rows with their own model= would run "
                         "without them and their wall clock would not compare: run them without those flags")
    check_bench_out(a.out)  # before loading anything; run_bench checks both again before decoding
    model_path = a.model
    if model_path is None and a.suite in ("dream", "block") and not a.methods:
        from .models.checkpoint import DEFAULT_BLOCK_DIR, DEFAULT_DREAM_DIR

        # the suite is about Dream / block diffusion: its bundled model
        model_path = str(DEFAULT_DREAM_DIR if a.suite == "dream" else DEFAULT_BLOCK_DIR)
    # Every method of the rows that --model decodes, checked against it (a block-causal model refuses the
    # bidirectional samplers, an AR one the diffusion methods) before anything is read or loaded.
    own = list(dict.fromkeys(m for m, opts in parsed if ROW_MODEL not in opts))
    for method in own[1:]:
        check_model(model_path, method)
    family_method = own[0] if own else ("ar" if is_ar == {True} else "vanilla")
    examples = _bench_examples(a, model_path, family_method)
    model, tok = resolve_model(model_path, None, a.device, a.dtype, method=family_method, compile=a.compile,
                               quantize=a.quantize)
    if a.chat:  # rendered with the model's own template, like eval --chat
        from .evaluation.evaluate import chat_examples

        examples = chat_examples(examples, model_path, family_method)
    command = "diffspec " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    run_bench(model, tok, specs, task=a.task, limit=a.limit, out_dir=a.out, data=a.data,
              overrides=overrides, command=command, repeats=a.repeats, examples=examples, resume=a.resume, split=a.split,
              chunk=a.chunk, shard=shard)


def _has_row_model(spec: str) -> bool:
    """Whether a bench spec names its own model (`model=PATH`): read before the spec is validated, so
    the family check below can leave such rows to plan_bench."""
    return any(item.partition("=")[0].strip() == "model" for item in spec.partition(":")[2].split(","))


def _bench_examples(a: argparse.Namespace, model_path: str | None, method: str) -> list:
    """The bench's examples, read before the model loads (a missing data file costs no load), and after
    a check of the model path: missing inputs are reported in the order a user meets them, model first."""
    from .api import check_model
    from .tasks import load_examples

    check_model(model_path, method)
    return load_examples(a.task, limit=a.limit, split=a.split, data=a.data, k_shot=a.k_shot)


def cmd_draft_vocab(a: argparse.Namespace) -> None:
    from .train.distill import build_draft_vocab

    r = build_draft_vocab(Path(a.drafter), Path(a.manifest), a.size, a.answers)
    val = f", {r['val_coverage']:.2%} of held-out answer tokens" if "val_coverage" in r else ""
    print(f"wrote {a.drafter}/draft_vocab.json: {r['size']} ids of {r['distinct_tokens']} seen in {r['answers']} "
          f"answers; they cover {r['train_coverage']:.2%} of the answer tokens{val}", file=sys.stderr)


def cmd_plot(a: argparse.Namespace) -> None:
    from .bench.plot import plot_results

    print(f"wrote {plot_results(a.results, a.out)}", file=sys.stderr)


def cmd_train(a: argparse.Namespace) -> None:
    if a.data_only and a.kind not in ("dflash", "vp"):
        raise ValueError("--data-only applies to dflash and vp (the target continuations they train on)")
    shard = None
    if a.shard is not None:
        from .bench.runner import parse_shard

        if not a.data_only:
            raise ValueError("--shard applies to --data-only (processes sharing the continuation chunks)")
        shard = parse_shard(a.shard)
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"--shard I/N needs 0 <= I < N, got {a.shard!r}")
    if a.kind == "mdm":
        from .train.mdm import train_mdm

        out = train_mdm(a.config, out=a.out, resume=a.resume, device=a.device, max_steps=a.max_steps)
    elif a.kind == "block":
        from .train.block import train_block

        out = train_block(a.config, out=a.out, resume=a.resume, device=a.device, max_steps=a.max_steps)
    elif a.kind == "ar":
        from .train.ar import train_ar

        out = train_ar(a.config, out=a.out, resume=a.resume, device=a.device, max_steps=a.max_steps)
    elif a.kind in ("dflash", "vp"):
        from .train.dflash import train_dflash

        out = train_dflash(a.config, kind=a.kind, out=a.out, resume=a.resume, device=a.device, max_steps=a.max_steps,
                           data_only=a.data_only, shard=shard)
    else:
        raise ValueError(f"unknown training kind {a.kind!r}; use mdm, block, ar, dflash or vp")
    print(f"saved {out}")


def cmd_convert(a: argparse.Namespace) -> None:
    if a.kind != "gguf":
        raise ValueError(f"unknown conversion {a.kind!r}; diffspec converts: gguf")
    from .models.gguf import convert_gguf

    print(f"wrote {convert_gguf(a.file, a.out, dtype=a.dtype)}")


def cmd_serve(a: argparse.Namespace) -> None:
    try:
        from .serve import ServeSettings, serve
    except ImportError as e:  # FastAPI / uvicorn missing: say how to install them
        raise ValueError(str(e)) from None

    import os

    api_key = a.api_key if a.api_key is not None else os.environ.get("DIFFSPEC_API_KEY")
    if a.api_key is None and api_key is not None and not api_key:
        raise ValueError("DIFFSPEC_API_KEY is set but empty; give a key, or unset it to serve without one")
    serve(ServeSettings(model=a.model, method=a.method, options=_options(a), device=a.device, dtype=a.dtype,
                        compile=a.compile, quantize=a.quantize, host=a.host, port=a.port, max_batch=a.max_batch,
                        batch_window=a.batch_window, batching=a.batching, prompt_bucket=a.prompt_bucket,
                        max_queue=a.max_queue, model_name=a.served_model_name,
                        api_key=api_key, drain_timeout=a.drain_timeout, limit_prompt_tokens=a.limit_prompt_tokens,
                        limit_max_tokens=a.limit_max_tokens, limit_n=a.limit_n, limit_body_bytes=a.limit_body_bytes,
                        access_log=not a.no_access_log))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="diffspec", description="Fast, honest inference for diffusion language models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    _generate_parser(sub)
    _eval_parser(sub)
    _bench_parser(sub)
    _plot_parser(sub)
    _convert_parser(sub)
    _serve_parser(sub)
    _draft_vocab_parser(sub)
    _train_parser(sub)
    return p


def _generate_parser(sub: Any) -> None:
    """`diffspec generate`'s flags."""
    g = sub.add_parser("generate", help="complete one prompt (completion on stdout, cost on stderr)")
    g.add_argument("--prompt", required=True, help="the text to complete (wrapped by --template)")
    g.add_argument("--template", help="qa: wrap as 'Question: …\\nAnswer:' (default for the bundled model); raw: as is")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user turn rendered with the checkpoint's own chat template "
                        "(tokenizer_config.json; e.g. --model smollm2); implies --template raw")
    g.add_argument("--system", help="with --chat: a system turn before the prompt")
    _decode_args(g)
    g.set_defaults(func=cmd_generate)


def _examples_args(p: Any, task_help: str, limit_help: str, limit: int | None = None) -> None:
    """--task, --data and --limit: the flags that choose the examples, read alike by eval and bench."""
    p.add_argument("--task", default="arith", help=task_help)
    p.add_argument("--data", help="jsonl path for gsm8k / mmlu (default ../shared/data/...)")
    p.add_argument("--limit", type=int, default=limit, help=limit_help)
    p.add_argument("--split", default="test", choices=("test", "validation"),
                   help="test (default) | validation: which split of a generated task (arith, arith-hard, "
                        "arith-mc); tune on validation, report on test")


def _eval_parser(sub: Any) -> None:
    """`diffspec eval`'s flags."""
    e = sub.add_parser("eval", help="accuracy and cost of one method on a task")
    _examples_args(e, "arith | arith-hard | arith-mc | gsm8k | mmlu",
                   "number of examples (default 500 for arith, all for files)")
    e.add_argument("--k-shot", type=int, help="few-shot exemplars (gsm8k default 5, mmlu 0)")
    e.add_argument("--out", help="write the result JSON here")
    e.add_argument("--scoring", default="generate",
                   help="generate (default): decode, then score the text | likelihood (arith-mc, mmlu): the choice "
                        "with the highest log-likelihood, exact for AR targets, LLaDA's Monte-Carlo ELBO for "
                        "diffusion models. Data parallel: torchrun --nproc-per-node N -m diffspec eval ...")
    e.add_argument("--chat", action="store_true",
                   help="each task prompt (with its few-shot exemplars) as one user turn in the checkpoint's chat "
                        "template, e.g. --task gsm8k --k-shot 0 --chat for an instruct model")
    e.add_argument("--mc-num", type=int, help="--scoring likelihood on diffusion models: Monte-Carlo draws per "
                                              "choice (default 128; a one-token choice needs one forward anyway)")
    _decode_args(e)
    e.set_defaults(func=cmd_eval)


def _bench_parser(sub: Any) -> None:
    """`diffspec bench`'s flags."""
    b = sub.add_parser("bench", help="sweep methods on the same examples: table, JSON and Pareto plot")
    _examples_args(b, "arith (default) | arith-hard | arith-mc | gsm8k | mmlu",
                   "examples, the same for every row (default 500)", limit=500)
    b.add_argument("--suite", default="steps", help="steps (vanilla steps sweep, default) | cache (Fast-dLLM / dKV-Cache) | dual (DualDiffusion vs both) "
                        "| psd (PSD vs greedy and Fast-dLLM) | frontier (every family's knob swept) | dream (Dream's sampler algs "
                        "x steps and Fast-dLLM on a Dream model, default the bundled dream-arith) | d2sd (AR greedy, "
                        "AR spec, DFlash, D²SD sweeps; AR target) | d2sd-smollm2 (the AR family on SmolLM2: --model smollm2 "
                        "--task gsm8k --chat --k-shot 0) | spec-smollm2 (its re-run with each method at the sizes it picks on the "
                        "device: dflash drafts=auto, d2sd k=auto) | block (a block-diffusion model, default the bundled llada2-arith: its "
                        "samplers with the exact block cache, PSD and DualDiffusion within a block, against Fast-dLLM's "
                        "dual cache on llada-arith)")
    b.add_argument("--methods", nargs="+",
                   help="rows as specs, METHOD:key=value,... e.g. vanilla:steps=24 fast-dllm:cache=dual,policy=threshold "
                        "(psd depths as 1;3;5); replaces --suite. The decoding flags below apply to every row whose "
                        "method takes them (a spec's own value wins); a method's own flags only to its rows. "
                        "model=PATH in a spec (e.g. fast-dllm:cache=dual,model=diffspec/assets/llada-arith-hard) "
                        "decodes that row with the checkpoint at PATH, with its own tokenizer, on --model's device "
                        "and dtype; its label ends in [DIR] (not with --chat)")
    b.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    b.add_argument("--chat", action="store_true",
                   help="render each prompt as one user turn in the model's own chat template (as eval --chat)")
    b.add_argument("--k-shot", type=int, help="few-shot exemplars for gsm8k / mmlu (default: the task's, 5 / 0)")
    b.add_argument("--repeats", type=int, default=1,
                   help="run every row N times, interleaved, and report the median wall clock (default 1)")
    b.add_argument("--resume", action="store_true",
                   help="reuse the rows an earlier run saved in --out/rows (same spec, options, examples, model "
                        "and drafters; anything else is decoded again), so a long run goes on where it stopped")
    b.add_argument("--chunk", type=int, default=0,
                   help="decode and save each row N examples at a time (rounded up to whole batches), so --resume "
                        "also continues inside a row (default 0: whole rows)")
    b.add_argument("--shard", metavar="I/N",
                   help="be process I of N sharing --out (with --chunk and --resume): decode only chunks I, I+N, "
                        "… of each row (the last shard to finish writes the table); the same command without --shard "
                        "assembles it again from the saved chunks")
    _decode_args(b, with_method=False)
    b.set_defaults(func=cmd_bench)


def _plot_parser(sub: Any) -> None:
    """`diffspec plot`'s flags."""
    pl = sub.add_parser("plot", help="redraw a bench run's Pareto plot from its results.json")
    pl.add_argument("results", help="results.json written by `diffspec bench`")
    pl.add_argument("--out", help="PNG path (default: pareto.png beside results.json)")
    pl.set_defaults(func=cmd_plot)


def _convert_parser(sub: Any) -> None:
    """`diffspec convert`'s flags."""
    c = sub.add_parser("convert", help="convert a checkpoint into a Hugging Face directory every tool reads")
    c.add_argument("kind", help="gguf (a llama.cpp file: Llama / Qwen2 / Qwen3)")
    c.add_argument("file", help="the file to convert")
    c.add_argument("out", help="the directory to write")
    c.add_argument("--dtype", default="float32", help="float32 (default; exact) | bfloat16 (half the size)")
    c.set_defaults(func=cmd_convert)


def _serve_parser(sub: Any) -> None:
    """`diffspec serve`'s flags."""
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs pip install -e '.[serve]')")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--max-batch", type=int, default=16, help="rows decoded together in one canvas (default 16)")
    sv.add_argument("--batch-window", type=float, default=0.02,
                    help="seconds a request waits for companions with the same settings (default 0.02)")
    sv.add_argument("--batching", choices=("auto", "step", "static"), default="auto",
                    help="step: requests join a running vanilla / fast-dllm / dkv-cache batch at its next block start "
                         "(greedy ar: at the next token) and leave it when done; static: a batch runs to its end "
                         "before the next one starts (other methods always do); auto (default): step on a CUDA "
                         "device, static on a CPU, where it served more (see docs/serving.md)")
    sv.add_argument("--prompt-bucket", type=int, default=32,
                    help="step batching: a batch's canvas reserves its longest prompt rounded up to this many "
                         "tokens, so that requests with prompts up to that long can join it (default 32)")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="rows waiting before new requests get 429 with Retry-After (default 256)")
    sv.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's directory name)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health, /metrics "
                                      "included (401 otherwise); default: $DIFFSPEC_API_KEY, else no key")
    sv.add_argument("--drain-timeout", type=float, default=30.0,
                    help="on SIGTERM, seconds the requests in flight get to finish (new ones get 503) before the "
                         "rest fail with 503 and the server exits 0 (default 30)")
    sv.add_argument("--limit-prompt-tokens", type=int,
                    help="most tokens one prompt may have (400 beyond; default: only the model's context)")
    sv.add_argument("--limit-max-tokens", type=int,
                    help="most tokens one request may generate, after rounding to whole blocks (400 beyond; "
                         "default: only the model's context)")
    sv.add_argument("--limit-n", type=int, help="largest n a request may ask for (400 beyond; default: --max-batch)")
    sv.add_argument("--limit-body-bytes", type=int, default=1 << 20,
                    help="largest request body in bytes (413 beyond; default 1048576)")
    sv.add_argument("--no-access-log", action="store_true",
                    help="no access-log line per request (default: one line on stderr, with its request id)")
    _decode_args(sv)
    sv.set_defaults(func=cmd_serve)


def _draft_vocab_parser(sub: Any) -> None:
    """`diffspec draft-vocab`'s flags."""
    dv = sub.add_parser("draft-vocab", help="give a drafter (DFlash, VP or AR) a draft vocabulary: the target's "
                                            "most frequent answer tokens (the head proposes only those; output "
                                            "unchanged)")
    dv.add_argument("drafter", help="the drafter's checkpoint directory (draft_vocab.json is written there)")
    dv.add_argument("--manifest", required=True,
                    help="a continuation manifest with train/ (and val/) chunks, e.g. data/smollm2-continuations")
    dv.add_argument("--size", type=int, default=8192, help="ids to keep (default 8192)")
    dv.add_argument("--answers", type=int, default=None,
                    help="count only the first N train answers, in chunk order (default all): the same vocabulary "
                         "however many chunks are made later, e.g. the answers a drafter trained on")
    dv.set_defaults(func=cmd_draft_vocab)


def _train_parser(sub: Any) -> None:
    """`diffspec train`'s flags."""
    t = sub.add_parser("train", help="train a small model from a JSON config")
    t.add_argument("kind", help="mdm (masked diffusion) | block (block-causal LLaDA2, for --method llada2 / sdar) | "
                                "ar (Qwen3 target) | dflash (block drafter) | vp (D²SD variable-prefix drafter)")
    t.add_argument("--config", required=True, help="JSON training config (see configs/)")
    t.add_argument("--out", help="checkpoint directory (default: the config's 'out')")
    t.add_argument("--resume", action="store_true", help="continue from the saved trainer state")
    t.add_argument("--device", default=None, help="cpu | cuda | auto (default: the config's, else cpu)")
    t.add_argument("--max-steps", type=int, help="stop after this many steps (default: the config's train.steps; "
                   "with train.stages, the steps of each stage that sets none)")
    t.add_argument("--data-only", action="store_true",
                   help="dflash / vp: generate (or rebuild from data.manifest) the target continuations, then stop")
    t.add_argument("--shard", metavar="I/N", default=None,
                   help="with --data-only: make only chunks c with c %% N == I, so N one-thread processes fill the "
                        "cache together (two run 1.3x the chunks of one two-thread process on a 2-core CPU)")
    t.set_defaults(func=cmd_train)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _verifier_is_model(args)
        args.func(args)
    except USER_ERRORS as e:
        print(f"diffspec: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
