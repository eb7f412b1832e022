#!/usr/bin/env bash
# The main job: set-up, then the full comparison on Fashion-MNIST, over seeds 0-4.
# Extra arguments go to `memdisc compare` (e.g. --out DIR, --seed N).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
$PY -m memdisc.cli compare --repeats 5 "$@"
