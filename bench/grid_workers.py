"""Wall time of one real grid under each executor (issue 15): ``memdisc study`` with ``--executor
processes --workers 1`` against ``--workers 2``, beside the local executor and Ray (2 CPUs, one a cell).

    python bench/grid_workers.py [--out bench/results/epyc-avx2] [--work runs/bench-grid-workers]
                                 [--repeats 3] [--executors NAME,...]   (of processes-1,
                                 processes-1-t1, processes-2, ray, local; default all but local)

Each run is the command a user types, in a fresh process and a fresh run directory (so worker start,
Ray's start and every per-seed cache, the clean backbone and the poisons, are in the time): ``python -m
memdisc.cli study`` on Fashion-MNIST (the Debian package's files), the ``cnn``, 2000 training, 500
validation and 2000 test rows, label-flip and noise at fraction 0.2, the three settings (2 epochs end to
end and transfer, the one-pass stream), one seed: 9 cells, the 3 clean baselines among them.  The
executors, in one round per repeat (their order rotating from round to round, so that a load change on
the shared machine does not fall on one executor):

* ``local``: the cells one after the other in the command's process, at torch's default thread count;
* ``processes-1`` / ``processes-2``: ``--executor processes --workers 1`` / ``2``; the cells run with
  ``max(1, cores // workers)`` torch threads (2 and 1 on 2 cores);
* ``processes-1-t1``: ``--workers 1`` under ``OMP_NUM_THREADS=1``: one cell at a time at one thread, so
  that its ratio to ``processes-2`` is the gain of running two cells at once alone, and its ratio to
  ``processes-1`` that of a second thread;
* ``ray``: ``--executor ray`` (a Ray instance started for the run on this machine, its CPUs all the
  cores), ``--cell-cpus 1``: two cells at a time, one thread each.

OMP_NUM_THREADS is removed from the children's environment (it would fix every executor's thread
count), but for ``processes-1-t1``.  Each row: the executor, the repeat, the cells' thread count, the wall seconds of the command,
the sum of the cells' own training and crafting seconds (from their results), whether every number of
every cell equals the first run's at the same thread count (timings and provenance aside; across
thread counts CPU results differ in the last bits), and provenance with the 1-minute load average
before the run.  Rows go to ``OUT/grid_workers.csv`` (rewritten after each run); a summary (median wall
time per executor and its ratio to ``processes-1``, the ratio of each round) is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, out_dir_arg, provenance, write_csv_atomic  # noqa: E402

STUDY = ["--dataset", "fashion-mnist", "--device", "cpu", "--model", "cnn", "--attacks", "label-flip,noise",
         "--fractions", "0.2", "--repeats", "1", "--train-subset", "2000", "--val-size", "500",
         "--test-subset", "2000", "--end-to-end-epochs", "2", "--end-to-end-patience", "none",
         "--transfer-epochs", "2", "--transfer-patience", "none"]
"""The grid: 9 cells of ``memdisc study`` (module docstring)."""

EXECUTORS = {"local": [], "processes-1": ["--executor", "processes", "--workers", "1"],
             "processes-1-t1": ["--executor", "processes", "--workers", "1"],
             "processes-2": ["--executor", "processes", "--workers", "2"],
             "ray": ["--executor", "ray", "--cell-cpus", "1"]}

ENVIRONMENT = {"processes-1-t1": {"OMP_NUM_THREADS": "1"}}
"""What an executor's command runs with besides this environment (less OMP_NUM_THREADS)."""

def _numbers(obj):
    """A cell's result without timings and provenance."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items() if k != "provenance" and not k.endswith("seconds")}
    return [_numbers(v) for v in obj] if isinstance(obj, list) else obj


def run_once(name: str, work: Path, log: Path) -> tuple[float, dict, int]:
    """One command in a fresh directory: its wall seconds, its results file and the cells' thread count
    (as the study recorded it in its config.json)."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, **ENVIRONMENT.get(name, {})}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    with open(log, "w") as stream:
        proc = subprocess.run([sys.executable, "-m", "memdisc.cli", "study", *STUDY, "--out", str(out),
                               *EXECUTORS[name]], env=env, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name}: memdisc study exited with {proc.returncode}; see {log}")
    return seconds, json.loads((out / "results.json").read_text()), json.loads((out / "config.json").read_text())[
        "threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=out_dir_arg, default=os.path.join(REPO, "bench", "results", "epyc-avx2"))
    parser.add_argument("--work", type=Path, default=Path(REPO) / "runs" / "bench-grid-workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--executors", default="processes-1,processes-1-t1,processes-2,ray",
                        help=f"comma list of {', '.join(EXECUTORS)} (default: all but local)")
    args = parser.parse_args()
    names = [n.strip() for n in args.executors.split(",") if n.strip()]
    if not names or any(n not in EXECUTORS for n in names):
        parser.error(f"--executors: expected a comma list of {', '.join(EXECUTORS)}, got {args.executors!r}")
    if args.repeats < 1:
        parser.error(f"--repeats: expected an integer >= 1, got {args.repeats}")
    args.work.mkdir(parents=True, exist_ok=True)
    base = provenance("cpu")
    rows, reference, path = [], {}, os.path.join(args.out, "grid_workers.csv")
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            load = os.getloadavg()[0]
            seconds, results, threads = run_once(name, args.work, args.work / f"{name}.log")
            cells = [c["payload"] for c in results["cells"]]
            if results["failures"] or len(cells) != 9:
                raise SystemExit(f"{name}: {len(results['failures'])} failed cells, {len(cells)} finished")
            numbers = [_numbers(c) for c in cells]
            same = reference.setdefault(str(threads), numbers) == numbers
            rows.append({"executor": name, "repeat": repeat, "cell_threads": threads, "cells": len(cells),
                         "wall_s": round(seconds, 2),
                         "cell_work_s": round(sum(c["train_seconds"] + c["craft_seconds"] for c in cells), 2),
                         "same_numbers_as_first_at_these_threads": same, **base, "load1": load,
                         "command": "memdisc study " + " ".join(STUDY + EXECUTORS[name])})
            print(f"[{repeat + 1}/{args.repeats}] {name}: {seconds:.1f} s (load {load:.2f}; numbers "
                  f"{'as' if same else 'NOT as'} the first run at {threads} threads)", flush=True)
            write_csv_atomic(path, rows)
    print(f"\n{path}\nmedian wall seconds over {args.repeats} repeats, and the ratio to processes-1:")
    median = {n: statistics.median(r["wall_s"] for r in rows if r["executor"] == n) for n in names}
    for name in names:
        ratio = f"{median['processes-1'] / median[name]:.2f}x" if "processes-1" in median else "n/a"
        print(f"  {name:12s} {median[name]:7.1f} s   {ratio} as fast")
    for one in ("processes-1", "processes-1-t1"):
        if one in names and "processes-2" in names:
            wall = {(r["repeat"], r["executor"]): r["wall_s"] for r in rows}
            ratios = [wall[k, one] / wall[k, "processes-2"] for k in range(args.repeats)]
            print(f"  {one} / processes-2 per round:", ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
