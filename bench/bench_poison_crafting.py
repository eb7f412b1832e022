"""Crafting the "optimal" poisons of Yang et al.: the seed's finite differences against autograd,
and the generative attack, per poison point, on Fashion-MNIST (issue 13).

    python bench/bench_poison_crafting.py [--out bench/results/epyc-avx2] [--points 100] [--seed 0]
                                          [--fd-points 3] [--parts speed,sweep]

Victims (each pre-trained here for one epoch on 10 000 training images, SGD lr 0.05, momentum 0.9,
batch 64): the seed's MLP (784-64-10, ReLU, on raw pixels: ``mymodel.json``) and memdisc's "cnn"
(``build_model("cnn", 1, 10, 28)``).  Poison points: ``--points`` training images (a seeded draw),
labels ``y + 1 mod 10``.  The seed's objective throughout the speed comparison: the loss on 10
normal training points (not poison points) after one SGD step (lr 0.05, biases 2x) on the point.

Providers, in seconds per poison point per round:

* ``fd``: bench/fd_direct_attack.py, the seed's per-pixel finite differences, one full round
  (all 784 pixels, no extrapolation) on each of ``--fd-points`` points; the normal loss fed as
  10 batches of one point as in the seed (``fd``) and as one batch of 10 (``fd-batched-loss``,
  the obvious speed-up the seed leaves out; the speed-ups are also given against it);
* ``autograd-1``: memdisc.attacks.gradient, one point at a time (poison_gradient + the signed step);
* ``autograd-batched``: the same round on all ``--points`` points in one vmapped call (chunks of
  the default ``GradientConfig.chunk``), time divided by the points;
* ``autograd-defaults``: as ``autograd-batched`` with memdisc's defaults (``GradientConfig()``:
  its validation size);
* ``generative``: memdisc.attacks.generative with ``GenerativeConfig()``: the auto-encoder fit
  (once), one round, and the whole attack (fit + rounds + sampling) divided by the points.

Sign agreement: on one round from the same ``x_p`` (each FD point), the fraction of pixels where
the FD direction equals ``sign(dL/dx_p)`` by autograd for the same objective; also among the
pixels above 0 (on a black background a max-pool window holds tied maxima, where the function has
a kink: FD's +h sees the right derivative, autograd one subgradient) and among the quarter of
pixels with the largest ``|dL/dx_p|``; and the same in float64 (victim, points and FD), to tell
the method's differences from float32 rounding in ``L_i - L_0``.

``--parts sweep`` measures the defaults (``poison_crafting_defaults_cpu.csv``): for the direct
attack per step size, validation size and number of rounds, for the generative attack per
generator lr and number of rounds, the mean over the points of a *held-out* objective (the CE on
300 test images after the victim's plain SGD step, lr 0.05, on the point), against the uncrafted
points (clean pixels, labels y + 1).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir_arg, provenance, write_csv_atomic  # noqa: E402
from fd_direct_attack import SEED_DEFAULTS, FiniteDifferenceDirect  # noqa: E402

from memdisc.attacks.generative import (ConvAutoencoder, GenerativeConfig, craft_generative_poisons,  # noqa: E402
                                        fit_autoencoder, generative_round)
from memdisc.attacks.gradient import (GradientConfig, craft_gradient_poisons, poison_gradient,  # noqa: E402
                                      poison_objective)
from memdisc.data import iterate_minibatches, load_dataset  # noqa: E402
from memdisc.models import build_model  # noqa: E402

PRETRAIN = {"subset": 10_000, "epochs": 1, "lr": 0.05, "momentum": 0.9, "batch": 64}
HELDOUT = 300
SWEEP_STEPS = {10: (0.01, 0.02, 0.05, 0.1, 0.2), 100: (0.05, 0.1)}  # validation size: step sizes
SWEEP_ROUNDS = {10: (1, 2, 5, 10, 20), 100: (1, 2, 5, 10)}
SWEEP_GENERATIVE = {"generator_lr": (0.005, 0.05, 0.5), "rounds": (10, 100)}


def seed_mlp() -> nn.Module:
    """The seed's MNIST victim (``model/mymodel.json``): flatten - linear(784 -> 64) - ReLU - linear(64 -> 10)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


VICTIMS = {"seed-mlp": seed_mlp, "cnn": lambda: build_model("cnn", 1, 10, 28)}


def pretrain(name: str, train, seed: int) -> nn.Module:
    """The victim ``name`` after PRETRAIN's epochs on a seeded subset of ``train``."""
    torch.manual_seed(seed)
    model = VICTIMS[name]()
    g = torch.Generator().manual_seed(seed)
    subset = train.subset(torch.randperm(len(train), generator=g)[:PRETRAIN["subset"]])
    opt = torch.optim.SGD(model.parameters(), lr=PRETRAIN["lr"], momentum=PRETRAIN["momentum"])
    model.train()
    for _ in range(PRETRAIN["epochs"]):
        for x, y in iterate_minibatches(subset, PRETRAIN["batch"], g):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def test_error(model: nn.Module, test) -> float:
    x, y = test.tensors()
    with torch.no_grad():
        return float((model(x).argmax(1) != y).float().mean())


def seconds(fn, repeats: int = 1) -> float:
    """Median wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_rows(name, model, data, args, base) -> list[dict]:
    x_p, y_p, x_normal, y_normal, x_fit, x_val, y_val = data
    seed_cfg = GradientConfig(rounds=1, step_size=SEED_DEFAULTS["step"], victim_lr=SEED_DEFAULTS["victim_lr"],
                              bias_lr_scale=SEED_DEFAULTS["bias_lr_scale"], val_size=SEED_DEFAULTS["num_normal"])
    rows = []

    def row(provider, metric, value, **extra):
        rows.append({**base, "model": name, "provider": provider, "metric": metric, "value": value, **extra})

    fd_times, fdb_times = [], []
    # the seed's FD (float32, h 0.01), the same in float64 (rounding in L_i - L_0 ruled out), and float64
    # with h 1e-4 (the step's own non-linearity mostly ruled out), each against autograd's sign
    variants = {"fd-vs-autograd": (torch.float32, SEED_DEFAULTS["h"]),
                "fd-vs-autograd-float64": (torch.float64, SEED_DEFAULTS["h"]),
                "fd-h1e-4-vs-autograd-float64": (torch.float64, 1e-4)}
    kinds = ("all", "pixels_above_0", "top_quarter")
    agree = {(variant, kind): [] for variant in variants for kind in kinds}
    nets = {torch.float32: model, torch.float64: copy.deepcopy(model).double()}
    for i in range(args.fd_points):
        for batch, times in ((1, fd_times), (SEED_DEFAULTS["num_normal"], fdb_times)):
            fd = FiniteDifferenceDirect(model, x_normal, y_normal, normal_batch=batch)
            start = time.perf_counter()
            fd.direction(x_p[i], y_p[i])
            times.append(time.perf_counter() - start)
        for variant, (dtype, h) in variants.items():
            net, x_i, x_n = nets[dtype], x_p[i:i + 1].to(dtype), x_normal.to(dtype)
            d = FiniteDifferenceDirect(net, x_n, y_normal, h=h, normal_batch=SEED_DEFAULTS["num_normal"]).direction(
                x_i[0], y_p[i])
            g, _ = poison_gradient(net, x_i, y_p[i:i + 1], x_n, y_normal, seed_cfg.victim_lr,
                                   bias_lr_scale=seed_cfg.bias_lr_scale)
            same = g.flatten().sign() == d
            top = g.flatten().abs() >= g.flatten().abs().quantile(0.75)
            agree[variant, "all"].append(float(same.float().mean()))
            agree[variant, "pixels_above_0"].append(float(same[x_i.flatten() > 0].float().mean()))
            agree[variant, "top_quarter"].append(float(same[top].float().mean()))
    pixels = x_p[0].numel()
    fd_s, fdb_s = statistics.median(fd_times), statistics.median(fdb_times)
    row("fd", "s_per_point_round", fd_s, points=args.fd_points, pixels_timed=pixels, extrapolated="no",
        val_size=SEED_DEFAULTS["num_normal"], note="normal loss as 10 batches of 1 (seed)")
    row("fd-batched-loss", "s_per_point_round", fdb_s, points=args.fd_points, pixels_timed=pixels,
        extrapolated="no", val_size=SEED_DEFAULTS["num_normal"], note="normal loss as one batch of 10")
    for (variant, kind), values in agree.items():
        row(variant, f"sign_agreement_{kind}", statistics.median(values), points=args.fd_points,
            val_size=SEED_DEFAULTS["num_normal"], h=variants[variant][1],
            note="median over the FD points; same x_p and objective")

    singles = min(10, x_p.shape[0])
    one = seconds(lambda: [craft_gradient_poisons(model, x_p[i:i + 1], y_p[i:i + 1], x_normal, y_normal, seed_cfg)
                           for i in range(singles)], args.repeats) / singles
    batched = seconds(lambda: craft_gradient_poisons(model, x_p, y_p, x_normal, y_normal, seed_cfg), args.repeats)
    batched /= x_p.shape[0]
    row("autograd-1", "s_per_point_round", one, points=singles, val_size=seed_cfg.val_size)
    row("autograd-batched", "s_per_point_round", batched, points=x_p.shape[0], val_size=seed_cfg.val_size,
        chunk=seed_cfg.chunk)
    for provider, t in (("autograd-1", one), ("autograd-batched", batched)):
        row(provider, "speedup_vs_fd", fd_s / t, val_size=seed_cfg.val_size)
        row(provider, "speedup_vs_fd_batched_loss", fdb_s / t, val_size=seed_cfg.val_size)
    cfg = GradientConfig(rounds=1)
    t = seconds(lambda: craft_gradient_poisons(model, x_p, y_p, x_val, y_val, cfg), args.repeats) / x_p.shape[0]
    row("autograd-defaults", "s_per_point_round", t, points=x_p.shape[0], val_size=cfg.val_size, chunk=cfg.chunk,
        step_size=cfg.step_size)

    gcfg = GenerativeConfig()
    generator = ConvAutoencoder(1, 28)
    start = time.perf_counter()
    mse = fit_autoencoder(generator, x_fit, gcfg.ae_epochs, gcfg.ae_batch_size, gcfg.ae_lr,
                          torch.Generator().manual_seed(args.seed))
    row("generative", "s_ae_fit", time.perf_counter() - start, fit_images=x_fit.shape[0], ae_epochs=gcfg.ae_epochs,
        ae_mse_last=mse[-1])
    xs, ys, xv, yv = x_p[:gcfg.seed_batch], y_p[:gcfg.seed_batch], x_val[:gcfg.val_size], y_val[:gcfg.val_size]
    per_round = seconds(lambda: generative_round(generator, model, xs, ys, xv, yv, 0.0, gcfg.victim_lr,
                                                 gcfg.generator_lr), 10)
    row("generative", "s_per_round", per_round, seed_batch=gcfg.seed_batch, val_size=gcfg.val_size)
    start = time.perf_counter()
    craft_generative_poisons(model, x_fit, x_p, y_p, x_val, y_val, 10, gcfg, args.seed)
    whole = time.perf_counter() - start
    row("generative", "s_per_poison", whole / x_p.shape[0], points=x_p.shape[0], rounds=gcfg.rounds,
        note="fit + rounds + sampling, divided by the points")
    row("generative", "speedup_vs_fd_per_poison", fd_s * SEED_DEFAULTS["rounds"] / (whole / x_p.shape[0]),
        note=f"against FD's {SEED_DEFAULTS['rounds']} seed rounds per point")
    return rows


def heldout(model, x, y, x_test, y_test) -> float:
    """Mean over the points of the held-out CE after the victim's plain SGD step (lr 0.05) on each."""
    return float(poison_objective(model, x, y, x_test, y_test, SEED_DEFAULTS["victim_lr"], chunk=8).mean())


def sweep_rows(name, model, data, x_test, y_test, args, base) -> list[dict]:
    x_p, y_p, _, _, x_fit, x_val, y_val = data
    start_value = heldout(model, x_p, y_p, x_test, y_test)
    rows = [{**base, "model": name, "method": "none", "heldout_ce": start_value, "heldout_gain": 0.0}]
    for val_size, steps in SWEEP_STEPS.items():
        for step in steps:
            x, elapsed, done = x_p, 0.0, 0
            for rounds in SWEEP_ROUNDS[val_size]:
                cfg = GradientConfig(rounds=rounds - done, step_size=step, val_size=val_size)
                t0 = time.perf_counter()
                x = craft_gradient_poisons(model, x, y_p, x_val, y_val, cfg)
                elapsed, done = elapsed + time.perf_counter() - t0, rounds
                value = heldout(model, x, y_p, x_test, y_test)
                rows.append({**base, "model": name, "method": "gradient", "step_size": step, "val_size": val_size,
                             "rounds": rounds, "heldout_ce": value, "heldout_gain": value - start_value,
                             "linf_from_start": float((x - x_p).abs().amax(dim=(1, 2, 3)).mean()),
                             "s_crafting": elapsed})
                print(rows[-1]["model"], step, val_size, rounds, f"{value - start_value:+.5f}", flush=True)
    for generator_lr in SWEEP_GENERATIVE["generator_lr"]:
        for rounds in SWEEP_GENERATIVE["rounds"]:
            cfg = GenerativeConfig(generator_lr=generator_lr, rounds=rounds)
            t0 = time.perf_counter()
            x, y = craft_generative_poisons(model, x_fit, x_p, y_p, x_val, y_val, 10, cfg, args.seed)
            elapsed = time.perf_counter() - t0
            value = heldout(model, x, y, x_test, y_test)
            rows.append({**base, "model": name, "method": "generative", "generator_lr": generator_lr,
                         "rounds": rounds, "val_size": cfg.val_size, "heldout_ce": value,
                         "heldout_gain": value - start_value, "s_crafting": elapsed,
                         "linf_from_start": float((x - x_p).abs().amax(dim=(1, 2, 3)).mean())})
            print(name, "generative", generator_lr, rounds, f"{value - start_value:+.5f}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("bench", "results", "epyc-avx2"), type=out_dir_arg)
    ap.add_argument("--points", type=int, default=100, help="poison points of the batched and generative rows")
    ap.add_argument("--fd-points", type=int, default=3, help="points whose full FD round is timed")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each autograd round (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="seed-mlp,cnn")
    ap.add_argument("--parts", default="speed", help="comma-separated: speed (poison_crafting_cpu.csv), "
                                                      "sweep (the defaults, poison_crafting_defaults_cpu.csv)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"speed", "sweep"}:
        ap.error(f"--parts: expected speed and/or sweep, got {args.parts!r}")

    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g)
    x_p, y = train.batch(order[:args.points])
    y_p = (y + 1) % train.num_classes
    x_normal, y_normal = train.batch(order[args.points:args.points + SEED_DEFAULTS["num_normal"]])
    x_val, y_val = train.batch(order[args.points:args.points + 1000])  # the normal points come first
    x_fit, _ = train.batch(order[args.points + 1000:args.points + 11_000])
    x_test, y_test = test.batch(torch.arange(HELDOUT))
    data = (x_p, y_p, x_normal, y_normal, x_fit, x_val, y_val)

    speed, sweep = [], []
    for name in args.models.split(","):
        model = pretrain(name, train, args.seed)
        base = {**provenance("cpu"), "seed": str(args.seed), "victim_test_error": test_error(model, test),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}
        if "speed" in parts:
            speed += speed_rows(name, model, data, args, base)
            for r in (r for r in speed if r["model"] == name):
                print(name, r["provider"], r["metric"], f"{r['value']:.4g}", flush=True)
        if "sweep" in parts:
            sweep += sweep_rows(name, model, data, x_test, y_test, args, base)
    if speed:
        write_csv_atomic(os.path.join(args.out, "poison_crafting_cpu.csv"), speed)
    if sweep:
        write_csv_atomic(os.path.join(args.out, "poison_crafting_defaults_cpu.csv"), sweep)


if __name__ == "__main__":
    main()
