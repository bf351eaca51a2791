#!/usr/bin/env bash
# The GPU run of issue #22 in one command (benchmarks/gpu/README.md):
#
#   bash benchmarks/gpu/run.sh OUT_DIR [--dry-run] [--tar FILE]
#
# Stages, in this order, each with its own time limit inside one overall budget
# (DIFFSPEC_GPU_BUDGET_S, default 450 s = 7.5 min; none for --dry-run). DIFFSPEC_GPU_BUDGET_S=none
# means no budget and no per-stage limit: every stage runs to its end (a dry run checks outputs,
# not speed, so a loaded machine must not fail it).
#   env          python / torch / GPU / git facts                     -> OUT_DIR/env.json
#   install      pip install -e '.[test]', offline (the project only) -> logs/install.log
#   cuda-tests   pytest -m cuda tests                                 -> cuda-tests.xml, cuda-report.json
#   gpu-timings  python -m diffspec.bench.gpu (8B shapes, random weights) -> gpu/gpu.json, gpu/gpu.md
#   decode-loop  python -m diffspec.bench.decode_loop (every method eager vs --compile, host syncs per forward)
#                -> decode/decode.json, decode/decode.md
#   bench-SUITE  diffspec bench --suite SUITE, bundled models, bf16, CUDA, --limit 500 (d2sd 200) -> bench/SUITE/
#   summary      python -m diffspec.bench.gpu --summarize OUT_DIR     -> summary.json, summary.md
# --dry-run: the same stages on CPU with tiny shapes, --limit 2 and three suites (steps d2sd threshold);
# the default test suite runs it (tests/test_gpu_script.py).
# A stage that fails or runs out of time is recorded in OUT_DIR/stages.tsv and the next one runs;
# the exit status is 0 only if every stage passed. --tar FILE packs OUT_DIR into FILE at the end
# (the device tool brings back at most 8 files).
#
# Environment: PYTHON (default python3), DIFFSPEC_SKIP_INSTALL=1 (skip pip), DIFFSPEC_GPU_BUDGET_S (seconds, or none),
# DIFFSPEC_GPU_SUITES (space-separated, default "steps cache psd dual threshold d2sd"; dry run "steps d2sd threshold"),
# DIFFSPEC_GPU_LIMIT (examples per suite, default 500; dry run 2), DIFFSPEC_GPU_LIMIT_D2SD (default 200),
# DIFFSPEC_GPU_SKIP (stage names not to run, e.g. "cuda-tests gpu-timings" for a rerun of the suites),
# DIFFSPEC_GPU_DTYPE (bench dtype, default bfloat16),
# DIFFSPEC_PIP_ARGS (default "--no-index --no-build-isolation": the device machine is offline).
set -euo pipefail

usage() { echo "usage: bash benchmarks/gpu/run.sh OUT_DIR [--dry-run] [--tar FILE]" >&2; exit 2; }
OUT_DIR="" DRY=0 TAR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --tar) [ $# -ge 2 ] || usage; TAR="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT_DIR" ] || usage; OUT_DIR="$1" ;;
  esac
  shift
done
[ -n "$OUT_DIR" ] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/bench"
: >"$OUT_DIR/stages.tsv"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then PY="$(command -v python3 || command -v python)"; fi
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's diffspec even if the install stage failed

if [ "$DRY" = 1 ]; then
  BUDGET="${DIFFSPEC_GPU_BUDGET_S:-none}" LIMIT="${DIFFSPEC_GPU_LIMIT:-2}" DEVICE=cpu MIN_STAGE=3
  DTYPE="${DIFFSPEC_GPU_DTYPE:-bfloat16}" GPU_ARGS=(--dry-run)
  # one diffusion suite, the AR suite and the --methods path: the rest differ only in their specs
  SUITES="${DIFFSPEC_GPU_SUITES:-steps d2sd threshold}" TESTS=tests/test_cuda.py
else
  BUDGET="${DIFFSPEC_GPU_BUDGET_S:-450}" LIMIT="${DIFFSPEC_GPU_LIMIT:-500}" DEVICE=cuda MIN_STAGE=20
  DTYPE="${DIFFSPEC_GPU_DTYPE:-bfloat16}" GPU_ARGS=()
  SUITES="${DIFFSPEC_GPU_SUITES:-steps cache psd dual threshold d2sd dream frontier}" TESTS=tests
fi
# d2sd decodes one prompt at a time: at batch 1 a 3.5 M-parameter model is launch-bound on a GPU
# as on a CPU (benchmarks/d2sd-cpu: 341 s for 500 problems), so by default it gets 200 problems.
LIMIT_D2SD="${DIFFSPEC_GPU_LIMIT_D2SD:-$([ "$DRY" = 1 ] && echo "$LIMIT" || echo $(( LIMIT < 200 ? LIMIT : 200 )))}"
SKIP=" ${DIFFSPEC_GPU_SKIP:-} "
UNLIMITED=0  # DIFFSPEC_GPU_BUDGET_S=none: no overall budget, no stage timeout
case "$BUDGET" in
  none) UNLIMITED=1 ;;
  ''|*[!0-9]*) echo "run.sh: DIFFSPEC_GPU_BUDGET_S must be a number of seconds or none, not '$BUDGET'" >&2; exit 2 ;;
esac
RESERVE=15  # seconds kept back for the summary and the tarball
FAILED=0

# run_stage NAME CAP_SECONDS CMD...: run CMD with limit min(CAP, what is left of the budget)
# (no limit at all when UNLIMITED=1: the limit column of stages.tsv then says -),
# output to logs/NAME.log, one line in stages.tsv; never stops the script.
run_stage() {
  local name="$1" cap="$2"; shift 2
  local left limit status rc start dur note=""
  if [[ "$SKIP" == *" $name "* ]]; then skip_stage "$name" "DIFFSPEC_GPU_SKIP"; return 0; fi
  if [ "$UNLIMITED" = 1 ]; then
    limit=- left=-
  else
    left=$((BUDGET - SECONDS - RESERVE))
    limit=$(( cap < left ? cap : left ))
  fi
  if [ "$UNLIMITED" = 0 ] && [ "$limit" -lt "$MIN_STAGE" ]; then
    printf '%s\tno-time\t-\t0\t%s\t%s\n' "$name" "$limit" "budget ${BUDGET}s spent" >>"$OUT_DIR/stages.tsv"
    echo "[run.sh] $name: not run, ${left}s of the ${BUDGET}s budget left"
    FAILED=1
    return 0
  fi
  echo "[run.sh] $name: started ($([ "$UNLIMITED" = 1 ] && echo 'no limit' || echo "limit ${limit}s"), $(date +%T))"
  start=$SECONDS
  set +e
  if [ "$UNLIMITED" = 1 ]; then
    "$@" >"$OUT_DIR/logs/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
  fi
  rc=$?
  set -e
  dur=$((SECONDS - start))
  case "$rc" in
    0) status=ok ;;
    124|137) if [ "$UNLIMITED" = 1 ]; then status=failed; else status=timeout; note="stopped after ${limit}s"; fi ;;
    *) status=failed ;;
  esac
  if [ "$name" = cuda-tests ] && [ "$rc" = 5 ]; then status=ok; note="no tests collected"; fi
  if [ -f "$OUT_DIR/logs/$name.note" ]; then note="$note$(tr '\n\t' '  ' <"$OUT_DIR/logs/$name.note")"; fi
  [ "$status" = ok ] || FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dur" "$limit" "$note" >>"$OUT_DIR/stages.tsv"
  echo "[run.sh] $name: $status (exit $rc, ${dur}s)${note:+ - $note}"
  if [ "$status" != ok ]; then tail -n 15 "$OUT_DIR/logs/$name.log" | sed 's/^/    /'; fi
}

skip_stage() {  # skip_stage NAME REASON: not run on purpose (not a failure)
  printf '%s\tskipped\t-\t0\t-\t%s\n' "$1" "$2" >>"$OUT_DIR/stages.tsv"
  echo "[run.sh] $1: skipped ($2)"
}

echo "[run.sh] $( [ "$DRY" = 1 ] && echo 'dry run (CPU, tiny shapes)' || echo 'GPU run' ): out $OUT_DIR, $([ "$UNLIMITED" = 1 ] && echo 'no time budget' || echo "budget ${BUDGET}s"), python $PY"

# ---- env: what ran where
run_stage env 30 "$PY" - "$OUT_DIR/env.json" "$DRY" <<'PYEOF'
import json, platform, subprocess, sys, torch
env = {"dry_run": sys.argv[2] == "1", "python": platform.python_version(), "executable": sys.executable,
       "torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
       "machine": platform.machine(), "platform": platform.platform()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1), capability=f"{p.major}.{p.minor}")
def sh(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return p.stdout.strip() if p.returncode == 0 else None
    except Exception:
        return None
env["git_commit"] = sh(["git", "rev-parse", "HEAD"])  # None where the tree came without .git
status = sh(["git", "status", "--porcelain"]) if env["git_commit"] else None
env["git_dirty"] = None if status is None else bool(status)
env["nvidia_smi"] = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                        "--format=csv,noheader"])
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
PYEOF

# ---- install: the project only, offline (the device machine reaches no registry)
if [ "${DIFFSPEC_SKIP_INSTALL:-0}" = 1 ]; then
  skip_stage install "DIFFSPEC_SKIP_INSTALL=1"
else
  PIP_ARGS="${DIFFSPEC_PIP_ARGS:---no-index --no-build-isolation}"
  run_stage install 120 bash -c '
    "$1" -m pip install $2 -e ".[test]" && exit 0
    echo "pip install -e .[test] failed; retrying with --no-deps" | tee "$3"
    "$1" -m pip install $2 --no-deps -e .' _ "$PY" "$PIP_ARGS" "$OUT_DIR/logs/install.note"
fi

# ---- the CUDA tests (skipped without CUDA); their measurements (bf16 agreement...) go to cuda-report.json
run_stage cuda-tests 150 env DIFFSPEC_CUDA_REPORT="$OUT_DIR/cuda-report.json" \
  "$PY" -m pytest -m cuda "$TESTS" -rA -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$OUT_DIR/cuda-tests.xml"

# ---- large-shape timings on random weights
run_stage gpu-timings 150 "$PY" -m diffspec.bench.gpu --out "$OUT_DIR/gpu" "${GPU_ARGS[@]}"

# ---- every method's decode loop on the bundled models: eager vs --compile, host syncs per forward
run_stage decode-loop 120 "$PY" -m diffspec.bench.decode_loop --out "$OUT_DIR/decode" --dtype "$DTYPE" "${GPU_ARGS[@]}"

# ---- the bench suites on the bundled models, most valuable first
for suite in $SUITES; do
  case "$suite" in
    steps) cap=45 ;; cache) cap=60 ;; psd) cap=90 ;; dual) cap=100 ;; threshold) cap=40 ;; d2sd) cap=240 ;;
    *) cap=90 ;;
  esac
  [ "$DRY" = 1 ] && cap=60
  if [ "$suite" = threshold ]; then  # benchmarks/threshold-cpu's command
    spec=(--methods vanilla:steps=48 fast-dllm:cache=dual,policy=threshold,threshold=0.9
          fast-dllm:cache=dual,policy=threshold,threshold=0.95 fast-dllm:cache=dual,policy=threshold,threshold=0.99)
  else
    spec=(--suite "$suite")
  fi
  n="$LIMIT"; [ "$suite" = d2sd ] && n="$LIMIT_D2SD"
  run_stage "bench-$suite" "$cap" "$PY" -m diffspec.cli bench "${spec[@]}" --limit "$n" \
    --device "$DEVICE" --dtype "$DTYPE" --out "$OUT_DIR/bench/$suite"
done

# ---- summary (outside the budget check: it takes a second)
RESERVE=0 MIN_STAGE=1 BUDGET=$((SECONDS + 30)) run_stage summary 30 "$PY" -m diffspec.bench.gpu --summarize "$OUT_DIR"
[ -f "$OUT_DIR/summary.md" ] && cat "$OUT_DIR/summary.md"
if [ -n "$TAR" ]; then
  mkdir -p "$(dirname "$TAR")"
  tar -czf "$TAR" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")" && echo "[run.sh] packed $OUT_DIR into $TAR"
fi
echo "[run.sh] done in ${SECONDS}s: $( [ "$FAILED" = 0 ] && echo 'every stage passed' || echo 'some stage failed, timed out or was not run (stages.tsv)')"
exit "$FAILED"
