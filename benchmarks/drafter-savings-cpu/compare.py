"""Drafter FLOPs and wall clock of DFlash and D²SD, for comparing two checkouts (issue #34).

    python benchmarks/drafter-savings-cpu/compare.py --task arith --limit 100 > after.json
    python benchmarks/drafter-savings-cpu/compare.py --task gsm8k --limit 3 --gen-length 96 > after.json   # SmolLM2
    (cd OLD_CHECKOUT && PYTHONPATH=. DIFFSPEC_DATA=.../shared/data python .../compare.py ... > before.json)

Prints one JSON object: per method, the token ids, each model's FLOPs and forwards, τ and the
meter's wall seconds (one torch thread). Compare the ids (they must be equal) and the FLOPs;
compare wall clocks only when both ran on an equally quiet machine.
"""
import argparse
import json
import sys

import torch

from diffspec.api import generate, resolve_model
from diffspec.tasks import load_examples

p = argparse.ArgumentParser()
p.add_argument("--task", choices=["arith", "gsm8k"], default="arith")
p.add_argument("--limit", type=int, default=100)
p.add_argument("--gen-length", type=int, default=None)
a = p.parse_args()
torch.set_num_threads(1)
model = tok = None
opts = {}
if a.task == "gsm8k":  # SmolLM2 with its own drafters, chat-templated zero-shot questions
    from diffspec.models.chat import ChatTemplate
    from diffspec.models.gguf import resolve_checkpoint

    path = resolve_checkpoint("smollm2")
    template = ChatTemplate.from_pretrained(path)
    prompts = [template.render([{"role": "user", "content": e.prompt}])
               for e in load_examples("gsm8k", limit=a.limit, k_shot=0)]
    model, tok = resolve_model(str(path), None, "cpu", None, method="ar")
else:
    prompts = [e.prompt for e in load_examples("arith", limit=a.limit)]
if a.gen_length:
    opts["gen_length"] = a.gen_length
out = {}
for m in ("dflash", "d2sd"):
    r = generate(prompts, model=model, tokenizer=tok, method=m, **opts)
    s = r.meter.summary()
    out[m] = {"ids": r.raw_ids, "tau": (r.stats or {}).get("acceptance_length"), "wall_seconds": s["wall_seconds"],
              "models": {k: {"flops": v["flops"], "nfe": v["nfe"]} for k, v in s["models"].items()}}
json.dump(out, sys.stdout)
