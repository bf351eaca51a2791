#!/usr/bin/env bash
# Issue #35's targets for the bundled arith-hard model, on 500 test problems, two processes of one
# thread each (torchrun shards the problems; results equal a one-process run's for greedy decoding):
# vanilla at full steps (128), vanilla at a quarter of the steps (32), Fast-dLLM dual cache + threshold 0.9.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-diffspec/assets/llada-arith-hard}
OUT=benchmarks/arith-hard-targets-cpu
export OMP_NUM_THREADS=1
run() { torchrun --nproc-per-node 2 -m diffspec eval --task arith-hard --model "$MODEL" --limit 500 --batch-size 16 "$@"; }
run --method vanilla --out $OUT/vanilla-steps128.json
run --method vanilla --steps 32 --out $OUT/vanilla-steps32.json
run --method fast-dllm --cache dual --threshold 0.9 --out $OUT/fast-dllm-dual-0.9.json
