#!/usr/bin/env bash
# Syntax-check the CUDA ATen bindings (csrc/bindings/*_cuda.cpp) against the installed
# torch headers and the CUDA toolkit headers. The CPU build of torch lacks one generated
# header of c10/cuda (cuda_cmake_macros.h); an empty stand-in is enough for a syntax
# check. This does not replace a real build on a GPU machine (scripts/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NVCC=$(command -v nvcc)
CUDA_INC=""
for d in "$(dirname "$(readlink -f "$NVCC")")/../include" /usr/local/cuda/include /usr/local/cuda-*/include; do
  if [ -f "$d/cuda_runtime_api.h" ]; then CUDA_INC=$d; break; fi
done
if [ -z "$CUDA_INC" ]; then echo "[bindings] CUDA headers not found: check skipped"; exit 0; fi
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl" && touch "$stub/c10/cuda/impl/cuda_cmake_macros.h"
TORCH_INC=$($PY -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
for f in csrc/bindings/*_cuda.cpp; do
  # shellcheck disable=SC2086
  g++ -std=c++17 -fsyntax-only -w -DMEMDISC_WITH_CUDA -I"$stub" -Icsrc $TORCH_INC -I"$CUDA_INC" "$f"
  echo "ok    $f (syntax, against torch $($PY -c 'import torch; print(torch.__version__)') headers)"
done
