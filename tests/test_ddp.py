"""One run on two processes (torchrun, gloo on the CPU) against the same run on one: a short burn-in and
short online runs give the same decisions and, within float tolerance, the same numbers; a process
killed mid-run makes the whole job fail, not hang, and the job then resumes; a checkpoint refuses
another number of processes; a rank whose peer stops taking part fails within the collectives' timeout.

Every run is a fresh interpreter on one torch thread per process, on the tiny Fashion-MNIST-format
data of tests/conftest.py.  Tolerance: the ranks' partial sums (losses, gradients, counts) add up in
another order than one process's sums, so floats agree to about 1e-6 relative per step; after a
few dozen SGD steps the weights agree to ``ATOL`` and every recorded score and error to ``RTOL``.
Both online runs start from the same (one-process) burn-in: an online run under attack is chaotic
(sign-gradient steps of the attack and of the correction, a model being degraded), so it turns the
~1e-5 by which two burn-ins differ (the same as between two instruction sets on one process) into
other decisions a few steps later; the online phase itself is what these tests compare.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

ROOT = Path(__file__).resolve().parents[1]
ATOL, RTOL = 1e-4, 1e-4
BURNIN = ["burnin", "--device", "cpu", "--epochs", "2", "--batch-size", "64", "--snapshot-every", "1"]
ONLINE = ["online", "--device", "cpu", "--history-epochs", "1", "--batch-size", "32", "--max-steps", "4",
          "--stop-error", "1.0", "--checkpoint-every", "2", "--val-size", "32", "--heldout-size", "64"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                MEMDISC_DIST_TIMEOUT="60")


def _command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "memdisc.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "memdisc.cli", *args]


def _run(nproc: int, args: list[str], cwd: Path, expect: int = 0) -> str:
    done = subprocess.run(_command(nproc, args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _close(a, b, where: str = "") -> None:
    """Same structure; equal strings, bools and ints; floats within RTOL / ATOL."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not (isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        assert b == pytest.approx(a, rel=RTOL, abs=ATOL), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def burnins(tiny_fashion_mnist, tmp_path_factory) -> dict[int, Path]:
    """The same burn-in on one process and on two."""
    root = tmp_path_factory.mktemp("ddp-burnin")
    out = {}
    for nproc in (1, 2):
        out[nproc] = root / f"p{nproc}"
        _run(nproc, [*BURNIN, "--data-dir", str(tiny_fashion_mnist), "--out", str(out[nproc])], root)
    return out


def test_a_burn_in_on_two_processes_equals_one(burnins):
    one, two = (torch.load(burnins[n] / "checkpoint.pt", weights_only=False) for n in (1, 2))
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, atol=ATOL, rtol=RTOL, msg=key)
    for a, b in zip(one["extra"]["history"], two["extra"]["history"], strict=True):
        assert b["test_error"] == a["test_error"]  # the same predictions: errors are counts over 256 images
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=RTOL)
    assert one["extra"]["processes"] == 1 and two["extra"]["processes"] == 2
    config = json.loads((burnins[2] / "config.json").read_text())
    assert config["provenance"]["processes"] == 2
    assert not list(burnins[2].rglob(".*.tmp"))  # no temporary file left behind


@pytest.mark.slow
@pytest.mark.parametrize("defense, extra", [
    ("DSC-sample", []),
    ("DSC-batch", []),
    ("MD-reweight", ["--filter-quantile", "0.5"]),
])
def test_an_online_run_on_two_processes_makes_the_same_decisions(burnins, tmp_path, defense, extra):
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        _run(nproc, [*ONLINE, "--burnin", str(burnins[1]), "--defense", defense, *extra, "--out", str(out)], tmp_path)
        results[nproc] = json.loads((out / "result.json").read_text())
    one, two = results[1], results[2]
    # the decisions: how many rows the defence acted on at each step, how many steps, why it stopped
    assert two["curve"]["corrected_fraction"] == one["curve"]["corrected_fraction"]
    assert two["steps_run"] == one["steps_run"] and two["stop_reason"] == one["stop_reason"]
    assert any(one["curve"]["corrected_fraction"])  # not vacuous: the defence acted
    for key in ("curve", "scores", "error_before_trigger", "error_after_trigger", "trigger_md"):
        _close(one[key], two[key], key)
    for rule in ("per_sample", "per_batch"):  # the ROC's steps may reorder at near-ties; its area may not move
        _close(one["detection"][rule]["auroc"], two["detection"][rule]["auroc"], rule)
    assert two["provenance"]["processes"] == 2


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (torchrun's workers)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


@pytest.mark.slow
def test_a_killed_process_fails_the_job_which_then_resumes(tiny_fashion_mnist, tmp_path):
    out = tmp_path / "run"
    args = [*BURNIN[:3], "--epochs", "40", "--batch-size", "16", "--data-dir", str(tiny_fashion_mnist),
            "--out", str(out)]
    with open(tmp_path / "log.txt", "wb") as log:
        job = subprocess.Popen(_command(2, args), cwd=tmp_path, env=_env() | {"MEMDISC_DIST_TIMEOUT": "600"},
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "snapshots" / "epoch_003.pt").exists():  # so checkpoint.pt holds epoch 2 or later
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.1)
        workers = _children(job.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        assert job.wait(timeout=60) != 0  # the whole job fails, long before the collectives' 600 s timeout
    finally:
        if job.poll() is None:
            job.kill()
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["epoch"]
    assert 2 <= saved < 40
    # another number of processes is refused, naming the file and what to do
    refused = _run(1, args, tmp_path, expect=2)
    assert "written by a run on 2 process(es), resumed on 1" in refused and "checkpoint.pt" in refused
    # the same command resumes (a short finish: the epochs asked for are the saved ones + 1)
    finish = [a if a != "40" else str(saved + 1) for a in args]
    assert f"resuming {out} from epoch {saved}" in _run(2, finish, tmp_path)
    history = json.loads((out / "history.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, saved + 2))
    _run(1, finish, tmp_path)  # a finished burn-in is read back on any number of processes


def _silent_peer(rank: int, port: int, out: str) -> None:
    """Rank 0 waits at a barrier that rank 1 never reaches (rank 1 sleeps): rank 0 must fail."""
    from memdisc.runtime.distributed import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), MEMDISC_DIST_TIMEOUT="3")
    comm, _ = init_distributed(torch.device("cpu"))
    if rank == 1:
        time.sleep(20)
        return
    started = time.monotonic()
    try:
        comm.barrier()
        outcome = "returned"
    except RuntimeError as exc:
        outcome = f"raised after {time.monotonic() - started:.1f} s: {exc}"
    Path(out).write_text(outcome)
    os._exit(0)  # leave at once: the group's teardown would wait for the sleeping peer


def test_a_rank_whose_peer_stops_taking_part_fails_within_the_timeout(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_silent_peer, args=(port, str(tmp_path / "outcome")), nprocs=2, join=False,
                                 start_method="spawn")
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "outcome").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        outcome = (tmp_path / "outcome").read_text()
    finally:
        for process in context.processes:
            process.kill()
    assert outcome.startswith("raised after"), outcome
    assert float(outcome.split()[2]) < 15, outcome


def test_the_timeout_variable_is_checked(monkeypatch):
    from memdisc.runtime.distributed import timeout

    monkeypatch.setenv("MEMDISC_DIST_TIMEOUT", "2.5")
    assert timeout().total_seconds() == 2.5
    for bad in ("0", "soon", "-1", "inf", "nan"):
        monkeypatch.setenv("MEMDISC_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="MEMDISC_DIST_TIMEOUT: expected a number of seconds > 0"):
            timeout()


GRIDS = {
    "study": ["study", "--device", "cpu", "--model", "cnn", "--attacks", "label-flip", "--settings",
              "end-to-end,transfer", "--fractions", "0.25", "--repeats", "1", "--train-subset", "256", "--val-size",
              "64", "--test-subset", "128", "--end-to-end-epochs", "2", "--transfer-epochs", "2"],
    "detect": ["detect", "--device", "cpu", "--model", "cnn", "--attacks", "badnets", "--detectors", "asset,MD",
               "--settings", "end-to-end,transfer", "--repeats", "1", "--train-subset", "200", "--val-size", "64",
               "--test-subset", "128", "--base-per-class", "4", "--badnets-fraction", "0.1", "--md-snapshot-epochs",
               "1", "--end-to-end-epochs", "3", "--transfer-epochs", "3"],
}


def _without_timings(value):
    """A result with its timings and provenance left out (they differ from run to run)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if k not in ("provenance", "timing") and not k.endswith("seconds")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(GRIDS))
def test_a_grid_on_two_processes_equals_one(tiny_fashion_mnist, tmp_path, command):
    """The cells' training (end-to-end, transfer, ASSET's offset model) as DDP: every number of every cell
    within tolerance.  Detection: a ranking statistic may swap a near-tie (scores equal to ~1e-7), so AUROC
    is compared to 2e-3 and the ROC's steps not at all."""
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        printed = _run(nproc, [*GRIDS[command], "--data-dir", str(tiny_fashion_mnist), "--out", str(out)], tmp_path)
        assert printed.count("written: ") == 1  # rank 1's standard output is dropped
        results[nproc] = _without_timings(json.loads((out / "results.json").read_text()))
    one, two = results[1], results[2]
    assert not one["failures"] and not two["failures"]
    for a, b in zip(one["cells"], two["cells"], strict=True):
        if command == "detect":
            assert b["payload"]["detection"]["auroc"] == pytest.approx(a["payload"]["detection"]["auroc"], abs=2e-3)
            for result in (a, b):
                del result["payload"]["detection"]["roc"], result["payload"]["detection"]["auroc"]
        _close(a, b, a["id"])


class _DropoutNet(torch.nn.Module):
    """A memdisc-shaped model (features, linear head) with dropout: its forwards draw from the global RNG."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 32), torch.nn.ReLU(),
                                        torch.nn.Dropout(0.5))
        self.head = torch.nn.Linear(32, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _two_ranks_train(rank: int, store: str, out: str) -> None:
    """Each rank: a BatchNorm cnn trained end to end and ASSET on a dropout model (batches of 33 rows: unequal
    shards), over two gloo ranks; what each rank ends with goes to ``out.RANK``."""
    import torch.distributed as dist

    from memdisc.detectors.asset import ASSETDetector
    from memdisc.models import build_model
    from memdisc.training.fit import FitConfig, train_end_to_end

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(99, 1, 28, 28, generator=g), torch.randint(0, 10, (99,), generator=g)
        torch.manual_seed(0)
        net = build_model("cnn", in_channels=1, num_classes=10, image_size=28, norm="bn")
        train_end_to_end(net, x[:66], y[:66], x[66:], y[66:], FitConfig(epochs=2, batch_size=33))
        torch.manual_seed(1)
        asset = ASSETDetector(epochs=2, batch_size=33, vnet_steps=3, lr=1e-2, seed=0)
        asset.fit(_DropoutNet(), x[66:], y[66:])
        scores = asset.score(_DropoutNet(), x[:66], y[:66])
        torch.save({"state": net.state_dict(), "scores": scores}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_end_with_the_same_batchnorm_buffers_and_asset_with_dropout_does_not_part_them(tmp_path):
    """BatchNorm's running statistics come from each rank's shard and dropout draws per row of the shard:
    rank 0's buffers and random state are copied to the others (else the ranks' models and ASSET's later
    draws, hence its collectives, part ways)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.spawn(_two_ranks_train, args=(str(tmp_path / "store"), out), nprocs=2)
    zero, one = (torch.load(f"{out}.{rank}") for rank in (0, 1))
    for key, value in zero["state"].items():
        assert torch.equal(one["state"][key], value), key
    assert torch.equal(zero["scores"], one["scores"])
