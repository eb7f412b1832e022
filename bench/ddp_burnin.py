"""A burn-in on two processes (torchrun, DDP over gloo) against one process, and the share of the gradient
all-reduce in the two-process epoch.

    python bench/ddp_burnin.py [--out DIR] [--repeats 3] [--train-subset 12000] [--epochs 2] [--batch-size 128]

Per repeat, interleaved (so a busy machine shifts them alike), ``memdisc burnin`` on Fashion-MNIST (the
``cnn``, the first ``--train-subset`` training rows, the whole test set) as

* ``1proc-2threads``: one process using both cores (``OMP_NUM_THREADS=2``), the way to use one machine;
* ``1proc-1thread``: one process on one core;
* ``2proc-ddp``: ``torchrun --standalone --nproc-per-node 2``, one thread each (torchrun's default).

Recorded: the epochs' seconds as the run's history.json measures them (training and the test error),
the command's wall time (interpreter start-up, data loading and torch.distributed's rendezvous
included), and the final test error (equal across the three up to float sums: the same global batches).
The communication share: in a separate two-process run of this script (``--probe``, under torchrun), the
median time of one all-reduce of a buffer the size of the cnn's gradients (DDP sends them as one bucket
per step) times the steps of an epoch, over the two-process epoch time measured above.  Rows go to
DIR/ddp_burnin_cpu.csv (default DIR: bench/results) with provenance.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, out_dir_arg, provenance, write_csv_atomic  # noqa: E402

CONFIGS = {
    "1proc-2threads": (1, 2),
    "1proc-1thread": (1, 1),
    "2proc-ddp": (2, 1),
}


def _command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "memdisc.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
            "memdisc.cli", *args]


def run_burnin(name: str, opts: argparse.Namespace, scratch: str) -> dict:
    nproc, threads = CONFIGS[name]
    out = tempfile.mkdtemp(dir=scratch)
    args = ["burnin", "--device", "cpu", "--epochs", str(opts.epochs), "--batch-size", str(opts.batch_size),
            "--train-subset", str(opts.train_subset), "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=REPO)
    started = time.perf_counter()
    subprocess.run(_command(nproc, args), env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    history = json.load(open(os.path.join(out, "history.json")))
    return {"config": name, "processes": nproc, "threads_per_process": threads,
            "epoch_seconds": sum(h["seconds"] for h in history["history"]), "wall_seconds": wall,
            "test_error": history["final_test_error"]}


def probe() -> None:
    """Under torchrun: the median seconds of one all-reduce of the cnn's gradient size; rank 0 prints JSON."""
    import torch.distributed as dist

    from memdisc.models import build_model

    dist.init_process_group("gloo")
    numel = sum(p.numel() for p in build_model("cnn", in_channels=1, num_classes=10, image_size=28).parameters())
    buffer = torch.randn(numel)
    times = []
    for _ in range(220):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        print(json.dumps({"numel": numel, "allreduce_seconds": statistics.median(times[20:])}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=out_dir_arg, default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.probe:
        return probe()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(opts.repeats):
            for name in CONFIGS:
                row = run_burnin(name, opts, scratch)
                rows.append({"repeat": repeat, **row})
                print(json.dumps(rows[-1]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    printed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              os.path.abspath(__file__), "--probe"], env=env, check=True, capture_output=True,
                             text=True).stdout
    comm = json.loads(printed.strip().splitlines()[-1])
    steps = opts.epochs * math.ceil(opts.train_subset / opts.batch_size)
    ddp_epochs = statistics.median(r["epoch_seconds"] for r in rows if r["config"] == "2proc-ddp")
    share = comm["allreduce_seconds"] * steps / ddp_epochs
    print(f"all-reduce of {comm['numel']} floats: {1e6 * comm['allreduce_seconds']:.0f} us x {steps} steps = "
          f"{100 * share:.1f} % of the 2-process epochs ({ddp_epochs:.2f} s)")
    settings = {"train_subset": opts.train_subset, "epochs": opts.epochs, "batch_size": opts.batch_size,
                "allreduce_us": round(1e6 * comm["allreduce_seconds"], 1), "gradient_numel": comm["numel"],
                "comm_share_2proc": round(share, 4)}
    info = provenance("cpu")
    write_csv_atomic(os.path.join(opts.out, "ddp_burnin_cpu.csv"), [{**row, **settings, **info} for row in rows])


if __name__ == "__main__":
    main()
