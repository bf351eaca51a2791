#!/usr/bin/env bash
# Issue #35 item 3: the frontier suite (every family's knob) on the hard task, 500 test problems,
# the bundled arith-hard model. Two processes of one thread share the rows 50 problems at a time
# (--shard; greedy, so the ids equal a one-process run's), and the run is resumable: run it again
# after a stop and it goes on where it left off (the rows are saved under rows/).
#   bash run.sh            decode (cheap rows first, so the claim's rows land early), then the table
#   bash run.sh assemble   the table, results.json and pareto.png from the saved rows, in the suite's
#                          order, without decoding (the same as `diffspec bench --suite frontier
#                          --task arith-hard ... --resume`)
# EXTRA: method specs to add after the suite's rows (decoded in the same order as the suite's
# rows of their kind; the attempts of item 4, more of Fast-dLLM's curve), e.g.
#   EXTRA="psd:threshold=0.95,draft_order=position,depths=1;2;3;4;5;6;7;8,cache=dual" bash run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/frontier-arith-hard-cpu
MODEL=${MODEL:-diffspec/assets/llada-arith-hard}
export OMP_NUM_THREADS=1
read -r -a SUITE < <(python -c "from diffspec.bench.runner import suite; print(' '.join(suite('frontier', 'arith-hard')))")
# Fast-dLLM's curve beyond the suite's dual-cache sweep, so the claim is judged against all of it:
# on this task its dual cache tops out at 16x fewer FLOPs than vanilla, below the 3-12x band the
# claim is about, where its prefix cache and no cache (more accurate, more FLOPs) are; threshold 1.0
# commits one cell a step. And PSD's left-to-right drafts at depth 1 only: how much of PSD's accuracy
# is the left-to-right order rather than the speculation.
REFERENCE="fast-dllm:cache=dual,policy=threshold,threshold=0.999 fast-dllm:cache=prefix,policy=threshold,threshold=0.9
fast-dllm:cache=prefix,policy=threshold,threshold=0.99 fast-dllm:cache=none,policy=threshold,threshold=0.9
fast-dllm:cache=none,policy=threshold,threshold=0.99 fast-dllm:cache=dual,policy=threshold,threshold=1.0
psd:threshold=1.0,draft_order=position,depths=1,cache=dual"
read -r -a MORE <<< "$(echo $REFERENCE) ${EXTRA:-}"
# The decoding order: the baseline first, then Fast-dLLM and vanilla at a quarter of the steps (with
# the baseline, item 2's targets), the cached PSD rows and DualDiffusion's
# masked view (the rows the claim is about), then the rest, the two that cost more than vanilla last.
read -r -a ORDER < <(python - "${SUITE[@]}" "${MORE[@]}" <<'PY'
import sys
specs = sys.argv[1:]
def rank(i_s):
    i, s = i_s
    if i == 0: return 0
    if s.startswith("fast-dllm") or s == "vanilla:steps=32": return 1  # (and item 2's targets)
    if s.startswith("psd") and "cache=dual" in s: return 2
    if s.startswith("dualdiffusion") and "verifier_view=masked" in s: return 3
    if "leftward" in s or ("draft_order=position" in s and "cache=" not in s): return 6
    if s.startswith("dkv-cache"): return 5
    return 4
print(" ".join(s for _, s in sorted(enumerate(specs), key=lambda i_s: (rank(i_s), i_s[0]))))
PY
)
bench() { python -m diffspec bench --task arith-hard --model "$MODEL" --limit 500 --chunk 50 --resume \
            --out $OUT "$@"; }
if [[ "${1:-}" == assemble ]]; then bench --methods "${SUITE[@]}" "${MORE[@]}"; exit; fi
bench --methods "${ORDER[@]}" --shard 0/2 & bench --methods "${ORDER[@]}" --shard 1/2 & wait
bench --methods "${SUITE[@]}" "${MORE[@]}"  # the table in the suite's order (decodes nothing)
