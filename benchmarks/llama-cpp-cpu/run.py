"""The anchor users would pick instead: llama.cpp on the same SmolLM2 GGUF, beside diffspec's AR rows.

    bash benchmarks/llama-cpp-cpu/install.sh runs/llama-cpp-venv      # once: builds llama-cpp-python from source
    python benchmarks/llama-cpp-cpu/run.py --venv runs/llama-cpp-venv --limit 8 --out benchmarks/llama-cpp-cpu

Every row greedy-decodes the same chat-templated GSM8K test questions (zero-shot, up to
`--max-tokens`), at batch 1, one row after the other in one run: diffspec's `ar` on the
de-quantized fp32 weights, the same with `--quantize int8`, and llama.cpp (through its Python
binding, in its own virtual environment, never a diffspec dependency) on the GGUF's own Q4_1
weights, plain and with its prompt-lookup speculative decoding, each at 1 and 2 threads. The
figure is generated tokens per second of wall clock (prompt processing included).
llama.cpp's Q4_1 model is not bit-identical to diffspec's fp32 one, so the share of answers whose
text equals diffspec's fp32 answer is reported beside it, as a check that both run the same model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LLAMA = r'''
import json, sys, time
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
cfg = json.load(sys.stdin)
out = []
for threads in cfg["threads"]:
    for lookup in (False, True):
        kw = {"draft_model": LlamaPromptLookupDecoding(num_pred_tokens=10)} if lookup else {}
        llm = Llama(model_path=cfg["gguf"], n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
                    seed=0, **kw)
        llm(cfg["prompts"][0], max_tokens=8, temperature=0.0)  # warm-up
        texts, tokens, t0 = [], 0, time.perf_counter()
        for p in cfg["prompts"]:
            r = llm(p, max_tokens=cfg["max_tokens"], temperature=0.0, top_k=1)
            texts.append(r["choices"][0]["text"])
            tokens += r["usage"]["completion_tokens"]
        wall = time.perf_counter() - t0
        out.append({"row": f"llama.cpp Q4_1{' + prompt lookup' if lookup else ''}", "threads": threads,
                    "tokens": tokens, "wall_s": wall, "texts": texts})
json.dump(out, sys.stdout)
'''


def diffspec_rows(prompts: list[str], max_tokens: int, threads: list[int]) -> list[dict]:
    import torch

    from diffspec.api import generate, resolve_model

    rows = []
    for quant in (None, "int8"):
        model, tok = resolve_model("smollm2", None, "cpu", None, method="ar", quantize=quant)
        for n in threads:
            torch.set_num_threads(n)
            generate(prompts[:1], model=model, tokenizer=tok, method="ar", gen_length=8)  # warm-up
            t0 = time.perf_counter()
            res = generate(prompts, model=model, tokenizer=tok, method="ar", gen_length=max_tokens, batch_size=1)
            rows.append({"row": "diffspec ar --quantize int8" if quant else "diffspec ar (fp32, de-quantized Q4_1)",
                         "threads": n,
                         "tokens": res.meter.tokens_generated, "wall_s": time.perf_counter() - t0,
                         "texts": list(res.texts)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", required=True, help="the virtual environment install.sh built")
    p.add_argument("--out", default="benchmarks/llama-cpp-cpu")
    p.add_argument("--limit", type=int, default=8, help="GSM8K test questions (default 8)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", default="1,2")
    a = p.parse_args(argv)
    from diffspec.bench.runner import load_during, machine_load
    from diffspec.models.chat import ChatTemplate
    from diffspec.models.gguf import resolve_checkpoint, smollm2_gguf
    from diffspec.tasks import load_examples

    threads = [int(t) for t in a.threads.split(",")]
    py = Path(a.venv) / "bin" / "python"
    if not py.is_file():
        p.error(f"{py} not found: build it first with bash benchmarks/llama-cpp-cpu/install.sh {a.venv}")
    template = ChatTemplate.from_pretrained(resolve_checkpoint("smollm2"))
    prompts = [template.render([{"role": "user", "content": e.prompt}])
               for e in load_examples("gsm8k", limit=a.limit, k_shot=0)]
    start = machine_load()
    # llama.cpp first (minutes), so a build that cannot run here fails before diffspec's rows (longer)
    cfg = {"gguf": str(smollm2_gguf()), "prompts": prompts, "max_tokens": a.max_tokens, "threads": threads}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(py), "-c", LLAMA], input=json.dumps(cfg), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        why = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        raise SystemExit(f"llama.cpp run failed ({why}; SIGILL = 4: rebuild without the instruction set "
                         f"that is missing, see install.sh):\n{done.stderr[-3000:]}")
    rows = diffspec_rows(prompts, a.max_tokens, threads) + json.loads(done.stdout)
    load = load_during(start)
    ref = rows[0]["texts"]
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
        r["same_text_as_diffspec_fp32"] = sum(x.strip() == y.strip() for x, y in zip(r["texts"], ref)) / len(ref)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": "python benchmarks/llama-cpp-cpu/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "limit": a.limit, "max_tokens": a.max_tokens, "load": load, "rows": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"SmolLM2-135M-Instruct, {a.limit} GSM8K test questions (chat, zero-shot), greedy, batch 1, up to "
             f"{a.max_tokens} tokens; load average {load['loadavg_start']:.1f} → {load['loadavg_end']:.1f} on "
             f"{load['cores']} cores.", "", "| row | threads | tokens | wall s | tokens/s | same text as diffspec fp32 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['threads']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['same_text_as_diffspec_fp32']:.0%} |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
