#!/usr/bin/env bash
# One command for a GPU machine (torch with CUDA, nvcc, ninja, triton; no network):
#   build  build the extension with the CUDA kernels in place (TORCH_CUDA_ARCH_LIST, default 9.0);
#          always runs first (ninja makes it quick when nothing changed);
#   smoke  check that the CUDA kernels are registered, and compare them with the
#          PyTorch reference on a few shapes and dtypes (cuda_smoke.log);
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
step "CUDA kernels registered and equal to the reference -> $OUT/cuda_smoke.log"
if MEMDISC_REQUIRE_EXTENSION=1 "$PYTHON" - > "$OUT/cuda_smoke.log" 2>&1 <<'PY'
import sys

import torch

from memdisc.ops import library  # noqa: F401  (loads memdisc._C or raises)
from memdisc.ops.reference import discrepancy_backward_reference, discrepancy_reference, pgd_step_reference

info = torch.ops.memdisc.build_info()
print("build_info:", info, "| device:", torch.cuda.get_device_name())
assert "cuda=1" in info, "the extension was built without its CUDA kernels"
torch.manual_seed(0)
failures = 0


def report(name, err, tol):
    global failures
    ok = err <= tol
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}: err {err:.3g} tol {tol:.3g}")


def err_of(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


# (K, B, C): the paper's shape, C = 1, K = 0, every team size of the forward, vector and scalar paths.
for K, B, C in [(3, 100, 10), (1, 7, 1), (0, 5, 10), (2, 41, 33), (4, 64, 1000), (2, 9, 1001), (2, 3, 5000), (1, 3, 4099)]:
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for reverse in (False, True):
            for T, huge in [(1.0, False), (2.5, False), (1.0, True), (2.5, True)]:
                cur = (torch.randn(B, C, device="cuda") * 4).to(dtype)
                snap = (torch.randn(K, B, C, device="cuda") * 4).to(dtype)
                if huge and B > 2:  # +-1e4 logits on one row
                    cur[1] = cur[1] + 1e4
                    if K:
                        snap[:, 1] = snap[:, 1] - 1e4
                # First-order rounding bound: the scaled logits z/T carry eps * max|z/T| in the accumulator.
                m = max(cur.abs().max().item(), snap.abs().max().item() if snap.numel() else 0.0) / T
                eps = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
                grad = torch.rand(K, B, device="cuda", dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                ref = discrepancy_reference(cur.double(), snap.double(), T, reverse)
                eager = discrepancy_reference(cur, snap, T, reverse)
                out = torch.ops.memdisc.discrepancy(cur, snap, T, reverse)
                gref = discrepancy_backward_reference(grad.double(), cur.double(), snap.double(), ref[1], ref[2], ref[0], T, reverse)
                geager = discrepancy_backward_reference(grad, cur, snap, eager[1], eager[2], eager[0], T, reverse)
                gout = torch.ops.memdisc.discrepancy_backward(grad, cur, snap, out[1], out[2], out[0], T, reverse)
                tag = f"K={K} B={B} C={C} {str(dtype)[6:]} rev={int(reverse)} T={T} huge={int(huge)}"
                for what, o, e, r in [("kl", out[0], eager[0], ref[0]), ("lse_cur", out[1], eager[1], ref[1]),
                                      ("lse_snap", out[2], eager[2], ref[2]), ("grad_cur", gout[0], geager[0], gref[0]),
                                      ("grad_snap", gout[1], geager[1], gref[1])]:
                    # flash-attention's rule: at most twice the eager error in the same dtype, plus rounding.
                    rmax = r.abs().max().item() if r.numel() else 0.0
                    report(f"{what} {tag}", err_of(o, r), 2 * err_of(e, r) + 16 * eps * (1 + rmax) * (1 + m))

for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for shape in [(100, 3, 32, 32), (7, 13)]:
        x0 = torch.rand(shape, device="cuda").to(dtype)
        x = (x0 + 0.3 * torch.randn(shape, device="cuda")).to(dtype)
        g = torch.randn(shape, device="cuda").to(dtype) * (torch.rand(shape, device="cuda") > 0.2)
        active = torch.rand(shape[0], device="cuda") > 0.3
        for descent in (True, False):
            want, got = x.clone(), x.clone()
            pgd_step_reference(want, g, x0, active, 0.02, 0.2, 0.0, 1.0, descent)
            torch.ops.memdisc.pgd_step_(got, g, x0, active, 0.02, 0.2, 0.0, 1.0, descent)
            untouched = torch.equal(got[~active], x[~active])
            tag = f"pgd_step {tuple(shape)} {str(dtype)[6:]} descent={descent}"
            if dtype in (torch.float32, torch.float64):
                report(f"{tag} (bit-equal, inactive rows untouched)", 0.0 if torch.equal(got, want) and untouched else 1.0, 0.0)
            else:  # half: x - step rounds once here, twice in the reference (step*s is rounded to half first)
                report(f"{tag} (inactive rows untouched)", 0.0 if untouched else 1.0, 0.0)
                report(tag, err_of(got, want.double()), 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)  # 1 ulp at 1.0

print(f"{failures} failures")
sys.exit(1 if failures else 0)
PY
then
  record "cuda smoke: ok ($(tail -1 "$OUT/cuda_smoke.log"))"
else
  grep -E "FAIL|Error|error" "$OUT/cuda_smoke.log" | head -30 || true
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
