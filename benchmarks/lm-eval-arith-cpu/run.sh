#!/usr/bin/env bash
# lm-evaluation-harness on the bundled models, next to `diffspec eval` on the same 100 `arith` problems.
# Run from the repository root (CPU, offline; about 20 minutes on 2 busy cores):
#   bash benchmarks/lm-eval-arith-cpu/run.sh           # everything, then results.json + table.md
#   bash benchmarks/lm-eval-arith-cpu/run.sh compare   # only lm-eval vs diffspec eval (arith, arith_mc)
#   bash benchmarks/lm-eval-arith-cpu/run.sh choice    # only arith_choice (lm-eval, whole-answer likelihood)
# Needs the eval extra: pip install -e '.[eval]'   (lm-eval 0.4.13)
set -euo pipefail
OUT=benchmarks/lm-eval-arith-cpu
WHAT=${1:-all}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LM="python -m diffspec.evaluation.harness --model diffspec --limit 100 --device cpu --batch_size 32"

if [[ $WHAT == all || $WHAT == compare ]]; then
  for method in vanilla ar; do   # vanilla: the bundled LLaDA model (full steps); ar: the bundled Qwen3 AR target
    rm -rf "$OUT/lm-eval-generate-$method" "$OUT/lm-eval-likelihood-$method"
    # generation: arith (GSM8K format, strict / flexible match)
    $LM --tasks arith --model_args method=$method,cost_out=$OUT/lm-eval-generate-$method-cost.json \
      --output_path $OUT/lm-eval-generate-$method/
    diffspec eval --task arith --limit 100 --method $method --batch-size 32 --out $OUT/diffspec-eval-generate-$method.json
    # likelihood: arith_mc (MMLU format: the letter " A".." D" with the highest log-likelihood)
    $LM --tasks arith_mc --model_args method=$method,cost_out=$OUT/lm-eval-likelihood-$method-cost.json \
      --output_path $OUT/lm-eval-likelihood-$method/
    diffspec eval --task arith-mc --scoring likelihood --limit 100 --method $method --batch-size 32 \
      --out $OUT/diffspec-eval-likelihood-$method.json
  done
fi
if [[ $WHAT == all || $WHAT == choice ]]; then
  # likelihood of whole answers in the task's own format (lm-eval only): exact for the AR target, the
  # Monte-Carlo ELBO for the LLaDA model at mc_num 1, 8 and 32 (without LLaDA's greedy check, which
  # multiple-choice metrics never read and which costs a forward per answer token)
  rm -rf "$OUT"/lm-eval-choice-*/
  $LM --tasks arith_choice --model_args method=ar,cost_out=$OUT/lm-eval-choice-ar-cost.json \
    --output_path $OUT/lm-eval-choice-ar/
  for mc in 1 8 32; do
    $LM --tasks arith_choice --model_args method=vanilla,mc_num=$mc,is_check_greedy=false,cost_out=$OUT/lm-eval-choice-vanilla-mc$mc-cost.json \
      --output_path $OUT/lm-eval-choice-vanilla-mc$mc/
  done
fi
python $OUT/summarize.py $OUT
