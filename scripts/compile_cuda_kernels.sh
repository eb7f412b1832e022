#!/usr/bin/env bash
# Compile every torch-free CUDA kernel (csrc/kernels/*.cu) with plain nvcc for
# sm_90 (H100/H200) and sm_80 (A100): catches kernel compile errors on machines
# without a GPU or a CUDA torch.  Prints one line per file and architecture;
# exits non-zero if any compile fails.
#   scripts/compile_cuda_kernels.sh            (NVCC=/path/to/nvcc to pick one)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [[ ! -x "$NVCC" ]]; then
  echo "compile_cuda_kernels: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi
ARCHS=(90 80)
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

echo "compile_cuda_kernels: $("$NVCC" --version | tail -1)"
shopt -s nullglob
sources=("$ROOT"/csrc/kernels/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "compile_cuda_kernels: no .cu files under csrc/kernels" >&2
  exit 2
fi
failed=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  for arch in "${ARCHS[@]}"; do
    start=$SECONDS
    if "$NVCC" -std=c++17 -O3 -lineinfo -I"$ROOT/csrc" -Werror all-warnings \
        -gencode "arch=compute_${arch},code=sm_${arch}" -c "$src" -o "$OUT/${name}.sm_${arch}.o" \
        > "$OUT/${name}.sm_${arch}.log" 2>&1; then
      echo "ok    csrc/kernels/${name}.cu sm_${arch} ($((SECONDS - start)) s)"
    else
      echo "FAIL  csrc/kernels/${name}.cu sm_${arch}"
      sed 's/^/      /' "$OUT/${name}.sm_${arch}.log"
      failed=1
    fi
  done
done
exit "$failed"
