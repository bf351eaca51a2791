"""Token ids of what ids.py does not cover (issue #36): the AR methods greedy and sampled, Dream,
lossless PSD, DualDiffusion with the KL rule and sampled Fast-dLLM, cut and raw ids hashed per row.

Prompts: 3 arith problems and 3 off-task ones, where the bundled models are unsure, so a changed
random draw shows (on arith alone every AR row, sampled or not, decodes the same ids).

    PYTHONPATH=<tree> python benchmarks/ids-check/issue36_extra.py OUT.json
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import diffspec
from diffspec.api import generate
from diffspec.tasks import load_examples

ASSETS = Path(diffspec.__file__).resolve().parent / "assets"
PROMPTS = [e.prompt for e in load_examples("arith", limit=3)] + [
    "Question: 987*654-321=?\nAnswer:", "Hello there, my", "The 7 cats and 9 dogs"]
AR_RUNS = [("ar", {}), ("ar", {"temperature": 0.8, "seed": 3}), ("ar-spec", {}), ("dflash", {}), ("d2sd", {}),
           ("ar-spec", {"temperature": 0.7, "seed": 1}), ("dflash", {"temperature": 0.7, "seed": 1}),
           ("d2sd", {"temperature": 0.7, "seed": 1})]
DREAM_RUNS = [{"alg": "maskgit_plus", "steps": 32}, {"steps": 16, "seed": 2}]
LLADA_RUNS = [("psd", {"lossless": True}), ("dualdiffusion", {"rule": "kl_divergence"}),
              ("fast-dllm", {"temperature": 0.5, "seed": 4})]


def digest(res) -> str:
    return hashlib.sha256(json.dumps([res.token_ids, res.raw_ids]).encode()).hexdigest()[:16]


def main(out_path: str) -> None:
    out = {}
    for method, kw in AR_RUNS:
        out[f"{method}:{kw}"] = digest(generate(PROMPTS, model=ASSETS / "qwen3-arith", method=method, gen_length=32,
                                                **kw))
    for kw in DREAM_RUNS:
        out[f"dream:{kw}"] = digest(generate(PROMPTS, model=ASSETS / "dream-arith", method="dream", gen_length=32,
                                             **kw))
    for method, kw in LLADA_RUNS:
        out[f"{method}:{kw}"] = digest(generate(PROMPTS, method=method, gen_length=32, block_length=16, **kw))
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
