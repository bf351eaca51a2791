#!/usr/bin/env bash
# Issue #34 item 6: the AR family on SmolLM2-135M-Instruct, re-run with the drafters retrained on every
# GSM8K train answer: 200 GSM8K test questions (chat, zero-shot, up to 256 tokens), AR greedy at batch 1
# (the baseline) and batched, AR-spec at gamma=auto, DFlash at drafts=auto, D²SD at k=auto, two
# threads, chunked and resumable (rows/); then, right after, the llama.cpp anchor on the same GGUF and the
# first 8 of those questions beside diffspec's AR (its own virtual environment: bash
# benchmarks/llama-cpp-cpu/install.sh runs/llama-cpp-venv; 200 questions would add about 40 minutes).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=2
diffspec bench --suite spec-smollm2 --model smollm2 --task gsm8k --chat --k-shot 0 --gen-length 256 \
  --limit 200 --data ../shared/data/gsm8k/test.jsonl --chunk 16 --resume --out benchmarks/spec-smollm2-cpu "$@"
if [ -x runs/llama-cpp-venv/bin/python ]; then
  python benchmarks/llama-cpp-cpu/run.py --venv runs/llama-cpp-venv --limit 8 --threads 2 \
    --out benchmarks/spec-smollm2-cpu/llama-cpp
else
  echo "no runs/llama-cpp-venv: build it with benchmarks/llama-cpp-cpu/install.sh for the anchor row" >&2
fi
