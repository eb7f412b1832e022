#!/usr/bin/env bash
# The test suite, as CI runs it: set-up (with the optional Ray dependency, so the
# grid's Ray executor is tested), torch-free kernel checks (C++ unit
# tests, the vectorisation check, and with nvcc the CUDA kernels compiled for
# sm_80 and sm_90), then pytest with the compiled extension required (a missing
# build is a failure, not a silent fallback).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MEMDISC_EXTRAS=test,ray bash scripts/setup.sh

if command -v cmake >/dev/null 2>&1; then
  cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="80;90" >/dev/null
  cmake --build build-cmake -j2
  ctest --test-dir build-cmake --output-on-failure
else
  echo "[test] cmake not found: C++ kernel unit tests skipped"
fi
MEMDISC_REQUIRE_EXTENSION=1 $PY -m pytest -q "$@"
