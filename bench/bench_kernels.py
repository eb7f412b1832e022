"""Kernel microbenchmarks: eager reference vs torch.compile(reference) vs memdisc, side by side.

    python bench/bench_kernels.py [--device cpu|cuda] [--out DIR] [--quick | --full] [--threads N]
                                  [--isa native|all|default|avx2|avx512]

Ops: ``discrepancy`` (forward), ``discrepancy_fb`` (forward + backward of
kl.sum()), ``pgd_step`` (in place).  Shapes: the paper's (K=1, B=100, C=10;
PGD 100x3x32x32), the CPU targets (K=8, B=1024, C in {10, 100, 1000};
PGD 256x3x32x32) and scoring shapes (large K and B; PGD with active fractions
1 / 0.5 / 0.1).  ``--quick`` (the CPU default) keeps the scoring shapes
small enough to finish in a few minutes; ``--full`` runs the largest ones.

Byte models (from the kernel headers), s = bytes per element:
    discrepancy     (K+1)·B·C·s read + (2K+1)·B·4 written
    discrepancy_fb  forward + (K+1)·B·C·s read + (K+1)·B·C·s written
    pgd_step        f·B·D·s·4 (x, grad, x0 read, x written; f = active fraction)
GB/s is bytes / median time; %copy compares with ``dst.copy_(src)`` of the same
number of bytes into a preallocated buffer, timed in the same run (read + write
counted, as for the kernels).
The baselines are imported from memdisc.ops.reference, never copied.
One CSV row per (op, provider, shape, dtype) goes to DIR/kernels_<device>.csv.

CPU kernel variants: the extension picks its instruction set once per process
(MEMDISC_CPU_ISA caps it), so ``--isa all`` runs the whole benchmark once per
variant this CPU runs (default, avx2, avx512), each in its own process with its
own eager and compile baselines timed in the same run, and writes one CSV; the
``cpu_isa`` column tells the variants apart.  ``--isa avx2`` runs one variant;
``native`` (the default) is whatever this process picks.  Each child caps torch
to the same instruction set (ATEN_CPU_CAPABILITY, which torch.compile's code
generator also follows, and ONEDNN_MAX_CPU_ISA; a fresh inductor cache), so a
variant is compared with eager and compile as they run on a CPU of that kind
(``aten_isa`` and ``onednn_isa`` columns).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir_arg, peak_memory_mb, provenance, time_interleaved, write_csv_atomic  # noqa: E402

import memdisc.ops as ops  # noqa: E402
from memdisc.ops.extension import kernel_isa  # noqa: E402
from memdisc.ops.reference import discrepancy_reference, pgd_step_reference  # noqa: E402

PAPER_DISC = [(1, 100, 10)]
TARGET_DISC = [(8, 1024, 10), (8, 1024, 100), (8, 1024, 1000)]
SCORING_DISC = {"quick": [(16, 10000, 10), (64, 10000, 10), (8, 10000, 1000)],
                "full": [(64, 100000, 10), (16, 100000, 100), (64, 10000, 1000)]}
PAPER_PGD = [(100, 1.0)]
TARGET_PGD = [(256, 1.0)]
SCORING_PGD = {"quick": [(2000, 1.0), (2000, 0.5), (2000, 0.1)],
               "full": [(10000, 1.0), (10000, 0.5), (10000, 0.1)]}


@dataclass
class Config:
    device: str = "cpu"
    out: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    size: str = "quick"                 # quick | full
    dtype: str = "float32"
    threads: int = 0                    # 0: torch's default
    rounds: int = 3
    min_run_time: float = 0.1
    seed: int = 0
    isa: str = "native"                 # native | all | default | avx2 | avx512 (CPU kernel variant)
    providers: List[str] = field(default_factory=lambda: ["eager", "compile", "memdisc"])


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _discrepancy_cases(cfg: Config, dtype: torch.dtype):
    compiled = _compiled(discrepancy_reference)
    impls = {"eager": lambda a, b: discrepancy_reference(a, b)[0],
             "compile": lambda a, b: compiled(a, b)[0],
             "memdisc": lambda a, b: ops.discrepancy(a, b)}
    s = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    for K, B, C in PAPER_DISC + TARGET_DISC + SCORING_DISC[cfg.size]:
        a = torch.randn(B, C, device=cfg.device, dtype=dtype, generator=g) * 3
        b = torch.randn(K, B, C, device=cfg.device, dtype=dtype, generator=g) * 3
        fwd_bytes = (K + 1) * B * C * s + (2 * K + 1) * B * 4
        yield ("discrepancy", f"K={K} B={B} C={C}", fwd_bytes,
               {p: (lambda f=f, a=a, b=b: f(a, b)) for p, f in impls.items()})
        if (K, B, C) in PAPER_DISC + TARGET_DISC:  # scoring is forward-only
            ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()

            def fb(f, ag=ag, bg=bg):
                f(ag, bg).sum().backward()
                ag.grad = bg.grad = None

            yield ("discrepancy_fb", f"K={K} B={B} C={C}", fwd_bytes + 2 * (K + 1) * B * C * s,
                   {p: (lambda f=f, fb=fb: fb(f)) for p, f in impls.items()})


def _pgd_cases(cfg: Config, dtype: torch.dtype):
    compiled = _compiled(pgd_step_reference)
    impls = {"eager": pgd_step_reference, "compile": compiled,
             "memdisc": lambda x, g, x0, act, *r: ops.pgd_step_(x, g, x0, step=r[0], eps=r[1], lo=r[2], hi=r[3],
                                                              active=act, descent=r[4])}
    s = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    for B, frac in PAPER_PGD + TARGET_PGD + SCORING_PGD[cfg.size]:
        shape = (B, 3, 32, 32)
        x0 = torch.rand(shape, device=cfg.device, dtype=dtype, generator=gen)
        grad = torch.randn(shape, device=cfg.device, dtype=dtype, generator=gen)
        x = x0.clone()
        active = None if frac == 1.0 else torch.rand(B, device=cfg.device, generator=gen) < frac
        nbytes = int(round(frac * B * 3 * 32 * 32 * s * 4))
        label = f"B={B}x3x32x32 active={frac:g}"
        yield ("pgd_step", label, nbytes,
               {p: (lambda f=f, x=x, grad=grad, x0=x0, active=active: f(x, grad, x0, active, 0.02, 0.2, 0.0, 1.0, True))
                for p, f in impls.items()})


def _copy_gbps(nbytes: int, cfg: Config) -> float:
    """Copy bandwidth (GB/s, read + write counted) of ``dst.copy_(src)`` moving nbytes in all, timed now.

    Into a buffer allocated once, like the in-place kernels: a clone would also time the allocator
    and, above the mmap threshold, the page faults of fresh memory."""
    src = torch.ones(max(nbytes // 2, 1), dtype=torch.uint8, device=cfg.device)
    dst = torch.zeros_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, cfg.device, rounds=1, min_run_time=cfg.min_run_time)["copy"]
    return 2 * src.numel() / (t["median_us"] * 1e3)


def run(cfg: Config) -> List[Dict[str, object]]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    dtype = getattr(torch, cfg.dtype)
    prov = provenance(cfg.device)
    rows: List[Dict[str, object]] = []
    cases = list(_discrepancy_cases(cfg, dtype)) + list(_pgd_cases(cfg, dtype))
    for op, shape, nbytes, fns in cases:
        fns = {p: fns[p] for p in cfg.providers}
        for fn in fns.values():  # warm-up: compiles, first-touch allocations
            fn()
        times = time_interleaved(fns, cfg.device, rounds=cfg.rounds, min_run_time=cfg.min_run_time)
        copy = _copy_gbps(nbytes, cfg)
        for provider, t in times.items():
            gbps = nbytes / (t["median_us"] * 1e3)
            rows.append({"op": op, "provider": provider, "shape": shape, "dtype": cfg.dtype, **{k: round(v, 2)
                         for k, v in t.items()},
                         "peak_mem_mb": round(peak_memory_mb(fns[provider], cfg.device), 2),
                         "bytes": nbytes, "gbps": round(gbps, 3), "copy_gbps": round(copy, 3),
                         "pct_copy": round(100 * gbps / copy, 1),
                         "speedup_vs_eager": round(times["eager"]["median_us"] / t["median_us"], 3)
                         if "eager" in times else math.nan,
                         "speedup_vs_compile": round(times["compile"]["median_us"] / t["median_us"], 3)
                         if "compile" in times else math.nan,
                         **prov, "config": repr(asdict(cfg))})
        print(f"{op:15s} {shape:32s} " + "  ".join(f"{p}={t['median_us']:.1f}us" for p, t in times.items()),
              flush=True)
    return rows


ISAS = ["default", "avx2", "avx512"]
# oneDNN's name for the cap that matches each variant (its baseline, SSE4.1, is what torch's "default" builds for).
ONEDNN_CAP = {"default": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE"}


def runnable_isas() -> List[str]:
    """The CPU kernel variants this process's CPU runs (capped by MEMDISC_CPU_ISA if set)."""
    if not ops.extension_loaded():
        raise SystemExit("--isa needs the compiled extension (memdisc._C)")
    best = kernel_isa()
    return ISAS[:ISAS.index(best) + 1]


def run_per_isa(cfg: Config, isas: List[str]) -> List[Dict[str, object]]:
    """The benchmark once per variant, each in a child process with MEMDISC_CPU_ISA set; rows concatenated."""
    rows: List[Dict[str, object]] = []
    for isa in isas:
        with tempfile.TemporaryDirectory() as tmp:
            args = [sys.executable, os.path.abspath(__file__), "--device", cfg.device, "--out", tmp, f"--{cfg.size}",
                    "--dtype", cfg.dtype, "--threads", str(cfg.threads), "--rounds", str(cfg.rounds), "--isa", "native"]
            print(f"--- cpu kernels: {isa}", flush=True)
            capped = {"MEMDISC_CPU_ISA": isa, "ATEN_CPU_CAPABILITY": isa, "ONEDNN_MAX_CPU_ISA": ONEDNN_CAP[isa],
                      "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor")}
            subprocess.run(args, env={**os.environ, **capped}, check=True)
            with open(os.path.join(tmp, f"kernels_{cfg.device}.csv"), newline="") as f:
                for row in csv.DictReader(f):
                    if row["cpu_isa"] != isa:
                        raise SystemExit(f"asked for the {isa} kernels, the child ran {row['cpu_isa']}")
                    rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(v: str) -> object:
    try:
        return float(v)
    except ValueError:
        return v


def print_table(rows: List[Dict[str, object]]) -> None:
    print(f"\n{'op':15s} {'shape':32s} {'provider':8s} {'isa':7s} {'median us':>11s} {'GB/s':>8s} {'%copy':>6s} "
          f"{'x eager':>8s} {'x compile':>9s}")
    for r in rows:
        print(f"{r['op']:15s} {r['shape']:32s} {r['provider']:8s} {r.get('cpu_isa', ''):7s} {r['median_us']:11.1f} "
              f"{r['gbps']:8.2f} {r['pct_copy']:6.1f} {r['speedup_vs_eager']:8.2f} {r['speedup_vs_compile']:9.2f}")


def main(argv=None) -> Tuple[Config, str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=Config.out, type=out_dir_arg, help="directory for the CSV")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick", help="small scoring shapes (default)")
    size.add_argument("--full", action="store_const", dest="size", const="full", help="the largest scoring shapes")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--isa", default="native", choices=["native", "all"] + ISAS,
                    help="CPU kernel variant: native (this process's pick), all (each this CPU runs), or one")
    args = ap.parse_args(argv)
    cfg = Config(device=args.device, out=args.out, size=args.size or "quick", dtype=args.dtype, threads=args.threads,
                 rounds=args.rounds, isa=args.isa)
    if cfg.isa != "native" and cfg.device != "cpu":
        ap.error("--isa selects CPU kernel variants; use it with --device cpu")
    if cfg.isa == "native":
        rows = run(cfg)
    else:
        isas = runnable_isas()
        if cfg.isa != "all" and cfg.isa not in isas:
            ap.error(f"--isa {cfg.isa}: this CPU runs {', '.join(isas)}")
        rows = run_per_isa(cfg, isas if cfg.isa == "all" else [cfg.isa])
    path = os.path.join(cfg.out, f"kernels_{cfg.device}.csv")
    write_csv_atomic(path, rows)
    print_table(rows)
    print(f"\nwrote {path}")
    return cfg, path


if __name__ == "__main__":
    main()
