#!/usr/bin/env bash
# Issue #35 item 3: the frontier suite (every family's knob) on the hard task, 500 test problems,
# the bundled arith-hard model. Two processes of one thread share the rows 50 problems at a time
# (--shard; greedy, so the ids equal a one-process run's); it is resumable: run it again after a
# stop and it goes on where it left off. The last process to finish writes table.md, results.json
# and pareto.png; `bash run.sh assemble` rebuilds them from the saved rows without decoding.
# EXTRA: more method specs to add to the suite's rows (the attempts of item 4), e.g.
#   EXTRA="psd:threshold=0.99,draft_order=position,cache=dual" bash run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/frontier-arith-hard-cpu
MODEL=${MODEL:-diffspec/assets/llada-arith-hard}
export OMP_NUM_THREADS=1
read -r -a SPECS < <(python -c "from diffspec.bench.runner import suite; print(' '.join(suite('frontier', 'arith-hard')))")
read -r -a MORE <<< "${EXTRA:-}"
bench() { python -m diffspec bench --task arith-hard --model "$MODEL" --limit 500 --chunk 50 --resume \
            --methods "${SPECS[@]}" "${MORE[@]}" --out $OUT "$@"; }
if [[ "${1:-}" == assemble ]]; then bench; exit; fi
bench --shard 0/2 & bench --shard 1/2 & wait
