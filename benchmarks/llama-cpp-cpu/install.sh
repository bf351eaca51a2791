#!/usr/bin/env bash
# A benchmark-only environment with llama.cpp's Python binding, built from source (issue #34, part 5).
# Kept out of diffspec's dependencies: `bash benchmarks/llama-cpp-cpu/install.sh [VENV_DIR]`.
set -euo pipefail
VENV="${1:-runs/llama-cpp-venv}"
python -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# CPU build with this CPU's vector instruction sets, read from /proc/cpuinfo, but never AMX: on the
# project's machine (2026-12-07) the CPU lists amx_tile / amx_int8 / amx_bf16, yet a GGML_NATIVE=ON
# build (which compiles ggml's AMX kernels) dies with SIGILL at its first forward, while AVX-512,
# AVX512-VNNI / BF16 / VBMI and AVX-VNNI instructions run (checked one by one with small C programs).
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $FLAGS " == *" $1 "* ]] && echo ON || echo OFF; }
ISA="-DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) \
-DGGML_BMI2=$(has bmi2) -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512_vbmi) \
-DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX_VNNI=$(has avx_vnni) \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
echo "llama.cpp CPU build: $ISA"
CMAKE_ARGS="-DGGML_NATIVE=OFF $ISA -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-1}" \
  "$VENV/bin/pip" install --no-cache-dir --verbose llama-cpp-python
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
