#!/usr/bin/env bash
# Issue #39 item 5: the bundled block-diffusion model (diffspec/assets/llada2-arith) on 500 arith test
# problems: its samplers with the exact block cache (and once without it), PSD and DualDiffusion within
# a block, against the bidirectional llada-arith it was converted from (vanilla at full steps, the
# baseline, and Fast-dLLM's dual cache; rows with model=). Chunked and resumable.
set -euo pipefail
cd "$(dirname "$0")/../.."
diffspec bench --suite block --task arith --limit 500 --chunk 100 --resume --out benchmarks/block-arith-cpu "$@"
