"""`memdisc compare` killed with SIGKILL (no exception, no cleanup) at seeded random points of every
phase, then run again to completion, gives bit for bit the results of an uninterrupted run, and
leaves no temporary file behind.

Each kill waits until the run writes a file that marks a phase (burn-in started, an epoch saved,
an online run started or mid-stream, the last run done, results written so the report is being
drawn), then a seeded random delay.  Both runs are fresh interpreters on one torch thread
(bit-equal weights need one fixed thread count) on the tiny Fashion-MNIST-format data of
tests/conftest.py.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Files that mark the phases, in the order a comparison writes them (paths under its run directory).
MARKERS = ["burnin/config.json", "burnin/snapshots/epoch_001.pt", "runs/control/state.pt", "runs/DSC-sample/state.pt",
           "runs/DSC-sample/result.json", "results.json"]
# Everything in results.json that a resumed run must reproduce exactly (timings and provenance differ).
RUN_KEYS = ("error_after_burnin", "error_before_trigger", "error_after_trigger", "error_delta", "steps_run",
            "stop_reason", "stop_error", "trigger_md", "curve", "scores", "detection")
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # memdisc.artifacts' temporary files


def _command(data_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "memdisc.cli", "compare", "--data-dir", str(data_dir), "--device", "cpu",
            "--out", str(out), "--defenses", "DSC-sample", "--burnin-epochs", "2",
            "--online-history-epochs", "1", "--online-batch-size", "32", "--online-max-steps", "3",
            "--online-stop-error", "1.0", "--online-checkpoint-every", "1", "--online-eval-size", "100",
            "--online-val-size", "32", "--online-heldout-size", "64"]


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``cmd``; its output (progress bars included) goes to a log file, never to a pipe that could fill."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with open(cwd / f"log-{time.monotonic_ns()}.txt", "wb") as log:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, cwd: Path) -> None:
    assert proc.wait(timeout=300) == 0, "\n".join(p.read_text() for p in sorted(cwd.glob("log-*.txt")))


def _written_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def _kill_after(cmd: list[str], cwd: Path, marker: Path, delay: float, timeout: float = 120.0) -> bool:
    """Run ``cmd`` and SIGKILL it ``delay`` seconds after it (re)writes ``marker``; False if it finished first."""
    started = time.time() - 0.01
    proc = _start(cmd, cwd)
    deadline = time.monotonic() + timeout
    while not _written_since(marker, started) and proc.poll() is None:
        assert time.monotonic() < deadline, f"{marker} was not written"
        time.sleep(0.01)
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return not finished


def _results(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {"burnin": {k: results["burnin"][k] for k in ("test_error", "epochs")},
            "attack_effect": results["attack_effect"],
            "runs": {name: {k: run[k] for k in RUN_KEYS} for name, run in results["runs"].items()}}


def test_sigkill_at_random_points_resumes_to_identical_results(tiny_fashion_mnist, tmp_path):
    reference = tmp_path / "reference"
    uninterrupted = _start(_command(tiny_fashion_mnist, reference), tmp_path)  # runs beside the killed ones

    out = tmp_path / "killed"
    cmd = _command(tiny_fashion_mnist, out)
    rng = random.Random(9)
    killed = 0
    for marker in MARKERS:
        killed += _kill_after(cmd, tmp_path, out / marker, rng.uniform(0.0, 0.6))
    assert killed >= len(MARKERS) - 2  # nearly every phase was interrupted, not run to its end
    # what a kill inside a write leaves in the directories the comparison and its burn-in own
    for folder in (out, out / "burnin", out / "burnin" / "snapshots"):
        (folder / ".results.json.k1ll3d_0.tmp").write_bytes(b"half a file")
    _finish(_start(cmd, tmp_path), tmp_path)
    _finish(uninterrupted, tmp_path)

    assert _results(out) == _results(reference)
    for png in ("error_curves.png", "md_histograms.png", "roc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p for p in out.rglob("*") if TEMP_NAME.fullmatch(p.name)] == []
