#!/usr/bin/env bash
# Issue #34 item 3: `--quantize int8` (per-token int8 activations, int32 sums) against the fp32
# weight-left path on SmolLM2, AR at batch 1 and each speculative row at the size spec-smollm2-cpu
# chose, 16 GSM8K test questions; losslessness against AR greedy of the same weights.
# Threads: the first argument (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${1:-2}
for q in fp32 int8; do
  diffspec bench --methods ar:batch_size=1 ar-spec:gamma=1 dflash:drafts=3 $( [ $q = int8 ] && echo --quantize int8 ) \
    --model smollm2 --task gsm8k --chat --k-shot 0 --gen-length 256 --limit 16 \
    --data ../shared/data/gsm8k/test.jsonl --out benchmarks/int8-cpu/$q
done
