#!/usr/bin/env bash
# CI's second stage: the whole CUDA build of memdisc, on a machine with no GPU.
# In a virtual environment of its own (default .venv-ci-cu130) with torch 2.14.1 (the CUDA 13.0
# build) and torchvision 0.29.1, on a copy of the working tree (the CPU stage's in-place build
# is left alone), it
#   1. builds memdisc with its CUDA kernels for sm_80 and sm_90 (`pip install -e`, no variable
#      set by hand: setup.py finds the CUDA toolkit and torch picks the C++ standard);
#   2. imports it with MEMDISC_REQUIRE_EXTENSION=1 and checks that the build reports CUDA, both
#      architectures and C++20, and that every op has a CPU and a CUDA kernel registered;
#   3. runs the test suite under that torch (the torchvision parity tests run here).
# A CUDA build that fails to compile, link, load or register fails this script.
#   bash scripts/test_cuda_torch.sh [pytest args]     (MEMDISC_CUDA_VENV=DIR to pick the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=$(realpath -m "${MEMDISC_CUDA_VENV:-.venv-ci-cu130}")
TORCH=2.14.1
VISION=0.29.1
CUDA=13.0
ARCHS="8.0;9.0"

[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
VPY="$VENV/bin/python"
has_torch="import sys, torch, torchvision
sys.exit(torch.__version__.split('+')[0] != '$TORCH' or torch.version.cuda != '$CUDA'
         or torchvision.__version__.split('+')[0] != '$VISION')"
if ! "$VPY" -c "$has_torch" 2>/dev/null; then
  echo "[cuda-torch] installing torch==$TORCH torchvision==$VISION into $VENV (about 3 minutes, 5.5 GB)"
  "$VPY" -m pip install -q "torch==$TORCH" "torchvision==$VISION" setuptools wheel pybind11 ninja
  "$VPY" -c "$has_torch" || { echo "[cuda-torch] the venv does not hold torch $TORCH with CUDA $CUDA" >&2; exit 1; }
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The tracked and untracked-but-not-ignored files, as they are now (no build outputs).
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
done | xargs -0 cp -P --parents -t "$work" --
cd "$work"
echo "[cuda-torch] building memdisc with CUDA kernels ($ARCHS) against torch $TORCH"
start=$SECONDS
TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install -q --no-build-isolation -e ".[test]"
echo "[cuda-torch] built in $((SECONDS - start)) s"

ARCHS="$ARCHS" MEMDISC_REQUIRE_EXTENSION=1 "$VPY" - <<'PY'
import json
import os
import subprocess
import sys

from memdisc.ops.extension import extension_report, missing_kernels

report = extension_report()
print(json.dumps(report, indent=2))
compiled, built = report["compiled_with"], report["built_against"] or {}
problems = [f"no compiled kernel for {op}" for op in missing_kernels()]
if compiled.get("cuda") != "1" or built.get("cuda") is None:
    problems.append(f"the build has no CUDA kernels ({built.get('cuda_skipped')})")
archs = ",".join(str(round(float(a) * 100)) for a in os.environ["ARCHS"].split(";"))
if compiled.get("cuda_arch") != archs:
    problems.append(f"compiled for architectures {compiled.get('cuda_arch')}, expected {archs}")
for key in ("cxx", "cuda_cxx"):
    if int(compiled.get(key, 0)) < 202002:
        problems.append(f"{key} = {compiled.get(key)}: torch 2.14 needs C++20 (202002)")
info = json.loads(subprocess.run([sys.executable, "-m", "memdisc.cli", "info"], check=True,
                                 capture_output=True, text=True).stdout)
if info["extension_build"] != json.loads(json.dumps(report)):
    problems.append("`memdisc info` does not report the loaded CUDA build")
if problems:
    sys.exit("[cuda-torch] FAILED:\n  " + "\n  ".join(problems))
print(f"[cuda-torch] CUDA build: every op has CPU and CUDA kernels; architectures {archs}; C++20")
PY
MEMDISC_REQUIRE_EXTENSION=1 "$VPY" -m pytest -q "$@"
