#!/usr/bin/env bash
# A benchmark-only environment with llama.cpp's Python binding, built from source (issue #34, part 5).
# Kept out of diffspec's dependencies: `bash benchmarks/llama-cpp-cpu/install.sh [VENV_DIR]`.
set -euo pipefail
VENV="${1:-runs/llama-cpp-venv}"
python -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# CPU build; GGML_NATIVE picks this CPU's instruction sets (AVX2 + FMA here).
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-1}" \
  "$VENV/bin/pip" install --no-cache-dir --verbose llama-cpp-python
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
