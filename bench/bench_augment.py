"""Burn-in augmentation: memdisc's ``augment_batch`` vs torchvision.transforms.v2, timed and checked.

    python bench/bench_augment.py [--out DIR] [--threads N] [--rounds R] [--batches B]

The augmentation (memdisc.data.stream.augment_batch): for each sample independently, zero-pad
by p (2 for 28x28, 4 for 32x32), crop the H x W window at ``(dy, dx) ~ U{0..2p}^2``, mirror it
with probability 1/2.  Providers, on the burn-in batch shapes (128x1x28x28 Fashion-MNIST,
128x3x32x32 CIFAR), float32, CPU:

    memdisc        augment_batch(x, generator): one gather for the whole batch
    v2-per-sample  v2.Compose([RandomCrop(H, padding=p), RandomHorizontalFlip()]) applied to each
                   sample, then stacked: the same distribution (faithful)
    v2-batched     the same Compose applied once to the [b, C, H, W] tensor: v2 draws ONE crop and
                   ONE flip for the whole batch (not faithful; timed to show what the shortcut costs)

Distribution check, per provider, on an "index image" (pixel value = h*W + w + 1, so each output's
crop offset and flip can be read back from two centre pixels) over ``--batches`` batches:
``distinct_draws`` is the mean number of distinct (dy, dx, flip) per batch (1 for the batched v2;
``distinct_expected`` = n (1 - (1 - 1/n)^b) for b independent uniform draws on n cells), ``chi2_p``
the p-value of Pearson's chi-square test of the pooled draws against the uniform law on the
n = (2p+1)^2 x 2 cells (small: not that law).

One CSV row per (provider, shape) goes to DIR/augment_cpu.csv, with provenance and torchvision's
version.  Needs torchvision (e.g. the CUDA-torch venv: MEMDISC_DISABLE_EXTENSION=1 is fine, no
memdisc kernel is involved).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir_arg, provenance, time_interleaved, write_csv_atomic  # noqa: E402

from memdisc.data.stream import augment_batch  # noqa: E402

SHAPES = {"fashion-mnist": (128, 1, 28, 28), "cifar": (128, 3, 32, 32)}
FAITHFUL = {"memdisc": True, "v2-per-sample": True, "v2-batched": False}


@dataclass
class Config:
    out: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    threads: int = 1
    rounds: int = 3
    min_run_time: float = 0.2
    batches: int = 200  # distribution check: batches per provider and shape
    seed: int = 0


def padding_of(h: int) -> int:
    """augment_batch's default padding for an image of side h."""
    return 4 if h >= 32 else 2


def providers(shape, seed: int) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each provider as ``x [b, C, H, W] float -> augmented x`` (v2 draws from torch's global generator)."""
    from torchvision.transforms import v2

    h = shape[2]
    pipeline = v2.Compose([v2.RandomCrop(h, padding=padding_of(h)), v2.RandomHorizontalFlip()])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return {"memdisc": lambda x: augment_batch(x, gen),
            "v2-per-sample": lambda x: torch.stack([pipeline(xi) for xi in x]),
            "v2-batched": pipeline}


def index_image(shape) -> torch.Tensor:
    """[b, C, H, W] float with pixel (h, w) = h*W + w + 1 in every sample and channel (0 is padding)."""
    b, c, h, w = shape
    return (torch.arange(h * w, dtype=torch.float32) + 1).view(1, 1, h, w).expand(b, c, h, w).contiguous()


def read_draws(out: torch.Tensor, p: int) -> torch.Tensor:
    """(dy, dx, flip) int64 [b, 3] of each output of an index image, from two centre pixels:
    ``out[h0, w0] - 1 = (dy + h0 - p) * W + (dx + w' - p)`` with ``w' = W-1-w0`` if flipped else ``w0``."""
    _, _, h, w = out.shape
    h0, w0 = h // 2, w // 2
    v, right = out[:, 0, h0, w0].long() - 1, out[:, 0, h0, w0 + 1].long() - 1
    flip = (right - v == -1).long()
    assert bool(((right - v).abs() == 1).all()), "centre pixels outside the image: not a crop + flip"
    dy = v // w - h0 + p
    dx = v % w - torch.where(flip.bool(), torch.full_like(v, w - 1 - w0), torch.full_like(v, w0)) + p
    return torch.stack([dy, dx, flip], 1)


def distribution(fn: Callable[[torch.Tensor], torch.Tensor], shape, batches: int) -> Dict[str, float]:
    """Mean distinct draws per batch and the chi-square p-value of the pooled draws against uniform."""
    from scipy.stats import chisquare

    p = padding_of(shape[2])
    x = index_image(shape)
    draws = [read_draws(fn(x), p) for _ in range(batches)]
    distinct = sum(len(torch.unique(d, dim=0)) for d in draws) / batches
    d, n = torch.cat(draws), 2 * (2 * p + 1) ** 2
    cells = (d[:, 0] * (2 * p + 1) + d[:, 1]) * 2 + d[:, 2]
    counts = torch.bincount(cells, minlength=n).double()
    return {"distinct_draws": round(distinct, 2), "distinct_expected": round(n * (1 - (1 - 1 / n) ** shape[0]), 2),
            "chi2_p": float(chisquare(counts.numpy()).pvalue)}


def run(cfg: Config) -> List[Dict[str, object]]:
    import torchvision

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prov = provenance("cpu")
    rows = []
    for name, shape in SHAPES.items():
        fns = providers(shape, cfg.seed)
        x = torch.rand(shape, generator=torch.Generator().manual_seed(cfg.seed))
        times = time_interleaved({k: (lambda f=f: f(x)) for k, f in fns.items()}, "cpu", cfg.rounds,
                                 cfg.min_run_time)
        for provider, t in times.items():
            dist = distribution(fns[provider], shape, cfg.batches)
            rows.append({"op": "augment", "provider": provider, "dataset": name, "shape": "x".join(map(str, shape)),
                         "dtype": "float32", **{k: round(v, 2) for k, v in t.items()},
                         "samples_per_s": round(shape[0] / t["median_us"] * 1e6),
                         "speedup_vs_memdisc": round(times["memdisc"]["median_us"] / t["median_us"], 4),
                         "faithful": FAITHFUL[provider], **dist, "torchvision": torchvision.__version__,
                         **prov, "config": str(asdict(cfg))})
            print(f"{name:14s} {provider:14s} {t['median_us']:10.1f} us  x{rows[-1]['speedup_vs_memdisc']:<8} "
                  f"distinct {dist['distinct_draws']:6.1f}  chi2 p {dist['chi2_p']:.3g}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=Config.out, type=out_dir_arg, help="directory for the CSV")
    ap.add_argument("--threads", type=int, default=Config.threads, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=Config.rounds)
    ap.add_argument("--batches", type=int, default=Config.batches)
    args = ap.parse_args(argv)
    cfg = Config(out=args.out, threads=args.threads, rounds=args.rounds, batches=args.batches)
    rows = run(cfg)
    path = os.path.join(cfg.out, "augment_cpu.csv")
    write_csv_atomic(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
