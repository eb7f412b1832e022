#!/usr/bin/env bash
# Install everything memdisc needs on a fresh Debian machine with Python 3.11.
# Idempotent: a second run only rebuilds the extension if its sources changed.
#   PYTHON=python3.11 bash scripts/setup.sh
#   MEMDISC_EXTRAS=test,ray bash scripts/setup.sh    (the optional dependencies to install; default: test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Default dataset (no download at run time): Debian's Fashion-MNIST package.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "[setup] installing dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

# torch is pinned and installed first, alone, so pip never resolves it itself
# (an unpinned resolve pulls several GB of CUDA wheels).
if ! $PY -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  $PY -m pip install -q "torch==2.13.0"
fi
# Build requirements of the extension (the build runs without isolation, against this torch).
$PY -m pip install -q setuptools wheel pybind11 ninja
echo "[setup] building memdisc and its kernels"
$PY -m pip install -q --no-build-isolation -e ".[${MEMDISC_EXTRAS:-test}]"
$PY -m memdisc.cli info
