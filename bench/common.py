"""Shared helpers of the memdisc benchmarks: provenance, timing, peak memory, CSV output.

Timing returns the median and the 20th/80th percentiles in microseconds:
on CPU from ``torch.utils.benchmark.Timer`` blocks, on CUDA from
``triton.testing.do_bench`` (CUDA events) when triton is importable, else
from CUDA events directly.  Providers of one shape should be timed
interleaved (``time_interleaved``) so that a noisy machine shifts them alike.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
from typing import Callable, Dict, List, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def provenance(device: str) -> Dict[str, str]:
    """Device name, versions, git commit (with a '+dirty' mark), CPU count and the instruction set of each
    kernel family (memdisc ``cpu_isa``, torch ``aten_isa``, oneDNN cap ``onednn_isa``) for every CSV row."""
    import memdisc
    import memdisc.ops as ops
    from memdisc.artifacts import cpu_instruction_sets, git_commit

    isa = cpu_instruction_sets()
    name = torch.cuda.get_device_name() if device == "cuda" else isa["cpu"]
    return {"device": device, "device_name": name, "torch": torch.__version__, "memdisc": memdisc.__version__,
            "extension": str(ops.extension_loaded()), "cpu_isa": isa["memdisc"], "aten_isa": isa["aten"],
            "onednn_isa": isa["onednn"], "commit": git_commit(),
            "cpu_count": str(os.cpu_count()), "threads": str(torch.get_num_threads())}


def _percentiles(samples_us: Sequence[float]) -> Dict[str, float]:
    q = statistics.quantiles(samples_us, n=10, method="inclusive") if len(samples_us) > 1 else [samples_us[0]] * 9
    return {"median_us": statistics.median(samples_us), "p20_us": q[1], "p80_us": q[7]}


def time_cpu(fn: Callable[[], object], min_run_time: float = 0.2) -> List[float]:
    """Per-call times (us) of fn, one per torch.utils.benchmark block."""
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return [t / m.number_per_run * 1e6 for t in m.raw_times]


def time_cuda(fn: Callable[[], object], rep_ms: float = 100.0) -> List[float]:
    """Per-call times (us) on the current CUDA stream, from CUDA events."""
    try:
        from triton.testing import do_bench

        ms = do_bench(fn, rep=rep_ms, return_mode="all")
        return [t * 1e3 for t in ms]
    except ImportError:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(10, int(rep_ms))):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return times


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str, rounds: int = 3,
                     min_run_time: float = 0.1) -> Dict[str, Dict[str, float]]:
    """Time every provider in `rounds` alternating rounds; pool the samples per provider."""
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += time_cpu(fn, min_run_time) if device == "cpu" else time_cuda(fn, 1e3 * min_run_time)
    return {name: _percentiles(s) for name, s in samples.items()}


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak device memory (MiB) allocated during one call; NaN on CPU (no allocator statistics)."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def out_dir_arg(path: str) -> str:
    """argparse type of ``--out``: a directory (created if missing), checked before any timing runs."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"expected a directory for the CSV files, got the file {path!r}")
    return path


def write_csv_atomic(path: str, rows: List[Dict[str, object]]) -> None:
    """Write rows (dicts sharing keys) to path via a temporary file and os.replace."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(rows[0].keys())
    for row in rows[1:]:
        fields += [k for k in row if k not in fields]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
