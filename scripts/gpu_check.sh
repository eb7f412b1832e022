#!/usr/bin/env bash
# One command for a GPU machine (torch with CUDA, nvcc, ninja, triton; no network):
#   build  build the extension with the CUDA kernels in place (TORCH_CUDA_ARCH_LIST, default 9.0);
#          always runs first (ninja makes it quick when nothing changed);
#   smoke  check that the CUDA kernels are registered, then run the CUDA cases of
#          tests/test_ops.py (pytest -m cuda: every op against the reference) (cuda_smoke.log);
#   tests  run the whole pytest suite with MEMDISC_REQUIRE_EXTENSION=1;
#   bench  run bench/bench_kernels.py --device cuda --out OUT_DIR;
#   online run bench/bench_online_step.py --device cuda --variants --out OUT_DIR.
# Logs go to OUT_DIR (build.log, env.txt, cuda_smoke.log, pytest.log, pytest.xml,
# bench.log, bench_online.log, summary.txt).  Exits non-zero if a step fails; a
# failed build stops the run.
#   scripts/gpu_check.sh OUT_DIR [STEP ...]      (default: smoke tests bench online)
# The whole run can exceed one 10-minute device call (torch.compile of every benchmark
# shape); split it, e.g. `gpu_check.sh OUT smoke tests`, then `gpu_check.sh OUT bench`,
# then `gpu_check.sh OUT online`.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: scripts/gpu_check.sh OUT_DIR [smoke] [tests] [bench] [online]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
shift
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=(smoke tests bench online)
for s in "${STEPS[@]}"; do
  case "$s" in smoke|tests|bench|online) ;; *) echo "gpu_check: unknown step '$s' (expected smoke, tests, bench, online)" >&2; exit 2;; esac
done
wants() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }
cd "$ROOT"
PYTHON="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, also for bench/
SUMMARY="$OUT/summary.txt"
touch "$SUMMARY"  # appended to, so split runs into one OUT_DIR keep every step's line
status=0

step() { echo; echo "== gpu_check: $*"; }
record() { echo "$1" | tee -a "$SUMMARY"; }

step "environment -> $OUT/env.txt"
{
  echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
  nvcc --version | tail -2 || echo "nvcc not found"
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

step "build the extension (python setup.py build_ext --inplace) -> $OUT/build.log"
start=$SECONDS
if "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  record "build: ok ($((SECONDS - start)) s)"
else
  tail -50 "$OUT/build.log"
  record "build: FAILED (see build.log)"
  exit 1
fi

if wants smoke; then
step "CUDA kernels registered, then pytest -m cuda tests/test_ops.py (every op against the reference) -> $OUT/cuda_smoke.log"
# Two steps joined by &&: without the CUDA kernels the -m cuda tests would compare the reference with itself.
if MEMDISC_REQUIRE_EXTENSION=1 "$PYTHON" -c "
import sys, torch
from memdisc.ops.extension import extension_report, missing_kernels
print(extension_report(), '| device:', torch.cuda.get_device_name())
sys.exit(f'no compiled kernel for {missing_kernels()}' if missing_kernels() else 0)" > "$OUT/cuda_smoke.log" 2>&1 \
  && MEMDISC_REQUIRE_EXTENSION=1 "$PYTHON" -m pytest -q -m cuda tests/test_ops.py >> "$OUT/cuda_smoke.log" 2>&1; then
  record "cuda smoke: ok ($(tail -1 "$OUT/cuda_smoke.log"))"
else
  grep -E "FAIL|Error|error|no compiled kernel" "$OUT/cuda_smoke.log" | head -30 || true
  record "cuda smoke: FAILED (see cuda_smoke.log)"
  status=1
fi
fi

if wants tests; then
step "pytest (MEMDISC_REQUIRE_EXTENSION=1) -> $OUT/pytest.log"
start=$SECONDS
if MEMDISC_REQUIRE_EXTENSION=1 "$PYTHON" -m pytest -q -rs --junitxml="$OUT/pytest.xml" tests 2>&1 | tee "$OUT/pytest.log"; then
  record "pytest: ok ($((SECONDS - start)) s; $(tail -1 "$OUT/pytest.log"))"
else
  record "pytest: FAILED ($(tail -1 "$OUT/pytest.log"))"
  status=1
fi
fi

if wants bench; then
step "benchmark (bench/bench_kernels.py --device cuda --out $OUT) -> $OUT/bench.log"
start=$SECONDS
if MEMDISC_REQUIRE_EXTENSION=1 "$PYTHON" bench/bench_kernels.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log"; then
  record "bench: ok ($((SECONDS - start)) s)"
else
  record "bench: FAILED (see bench.log)"
  status=1
fi
fi

if wants online; then
step "online-step benchmark (bench/bench_online_step.py --device cuda --variants) -> $OUT/bench_online.log"
start=$SECONDS
if MEMDISC_REQUIRE_EXTENSION=1 "$PYTHON" bench/bench_online_step.py --device cuda --variants --out "$OUT" 2>&1 \
    | tee "$OUT/bench_online.log"; then
  record "bench_online: ok ($((SECONDS - start)) s)"
else
  record "bench_online: FAILED (see bench_online.log)"
  status=1
fi
fi

step "summary ($SUMMARY)"
cat "$SUMMARY"
exit "$status"
