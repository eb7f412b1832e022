"""Throughput of one online step: the seed semantics run eagerly (the seed-code
port, memdisc.oracle.seed) against memdisc's fast path, side by side.

    python bench/bench_online_step.py [--device cpu|cuda] [--models cnn,resnet18] [--ks 1,4,16]
                                      [--repeats 5] [--out bench/results]

Methods: ST; AT-seed; DSC-batch and DSC-sample (correction + train step); one
accumulative crafting step of the attack.  Scenarios for DSC: ``all`` (the
threshold is below every discrepancy, so every row runs the 10 correction steps:
the worst case) and, for DSC-sample, ``half`` (the threshold is the median
per-sample discrepancy of the batch, so about half the rows move).  The train
step uses lr = 0 so the weights, and with them the workload, stay fixed across
repeats.  Providers are timed interleaved (repeat r of every provider before
repeat r+1) so machine noise hits them alike.  A profile of the fast DSC step
gives the share of time spent in the memdisc kernels versus everything else.
On CUDA, AT-seed and DSC also get a ``memdisc-graph`` provider: the same
defence with the correction loop captured as a CUDA graph (``Precision(cuda_graph=True)``).
Results: one CSV row per (model, K, method, scenario, provider) and a table printed last.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir_arg, provenance, write_csv_atomic  # noqa: E402

from memdisc.attacks import AccumulativeAttack, AttackConfig, AttackData  # noqa: E402
from memdisc.defenses import DSC, Defense, SeedAT, ThresholdSchedule  # noqa: E402
from memdisc.models import build_model, classifier_head  # noqa: E402
from memdisc.oracle import seed as ref  # noqa: E402
from memdisc.runtime import Precision  # noqa: E402
from memdisc.snapshots import SnapshotSet  # noqa: E402

SHAPES = {"cnn": (1, 28, 10), "resnet18": (3, 32, 10)}  # channels, side, classes
VARIANTS = {"memdisc-nchw": Precision(channels_last=False), "memdisc": Precision(),
            "memdisc-bf16": Precision(autocast="bfloat16")}
GRAPH = Precision(cuda_graph=True)  # a provider of its own on CUDA: the captured correction loop


def _setup(model_name: str, K: int, batch: int, device: str, seed: int = 0):
    channels, side, classes = SHAPES[model_name]
    torch.manual_seed(seed)
    model = build_model(model_name, channels, classes, side).to(device)
    snaps = []
    for _ in range(K):  # snapshots: the model with its weights nudged, as after some training
        h = copy.deepcopy(model)
        with torch.no_grad():
            for p in h.parameters():
                p.add_(0.05 * p.std().nan_to_num(0.01) * torch.randn_like(p))
        snaps.append(h.eval())
    x = torch.rand(batch, channels, side, side, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    return model, snaps, x, y


def _median_md(model, snaps, x) -> float:
    s = SnapshotSet(snaps)
    model.eval()
    with torch.no_grad():
        md = s.discrepancy(model(x), x).mean(0)
    return float(md.median())


def _quality(correct, model, snaps, x, y) -> dict:
    """What DSC is for, measured in float32 on its corrected batch: mean CE and mean MD."""
    xc = correct()
    model.eval()
    with torch.no_grad():
        logits = model(xc)
        md = SnapshotSet(snaps).discrepancy(logits, xc).mean()
        ce = torch.nn.functional.cross_entropy(logits, y)
    return {"post_ce": float(ce), "post_md": float(md)}


def _providers(method: str, scenario: str, model, snaps, x, y, variants: bool = False):
    """{provider: zero-argument callable doing one online step} for one method.

    The reference runs on ``model`` and ``snaps`` as given; every memdisc provider gets
    its own copies, so a memory-format conversion of one provider never reaches another.
    """
    opt_ref = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    tau = -1.0 if scenario == "all" else _median_md(model, snaps, x)
    hist = snaps if len(snaps) > 1 else snaps[0]

    def copies():
        m = copy.deepcopy(model)
        return m, [copy.deepcopy(h) for h in snaps], torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9)

    if method == "ST":
        m, _, opt = copies()
        fast = Defense()
        return {"reference": lambda: ref.seed_train_step(model, opt_ref, x, y),
                "memdisc": lambda: fast.train_step(m, opt, x, y, 0)}
    if method == "AT-seed":
        fns = {"reference": lambda: ref.seed_train_step(model, opt_ref, ref.seed_at_correct(model, x, y), y)}
        for name, precision in [("memdisc", Precision())] + ([("memdisc-graph", GRAPH)] if x.is_cuda else []):
            m, _, opt = copies()
            fast = SeedAT(precision=precision)
            fns[name] = (lambda f=fast, m=m, o=opt: f.train_step(m, o, x, y, 0))
        return fns
    if method.startswith("DSC"):
        mode = method.split("-")[1]

        def reference():
            xc, _ = ref.seed_dsc_correct(model, hist, x, y, 0, tau0=tau, tau_slope=0.0, per_sample=mode == "sample")
            ref.seed_train_step(model, opt_ref, xc, y)
        fns = {"reference": reference}
        chosen = {name: p for name, p in VARIANTS.items() if name == "memdisc" or variants}
        if x.is_cuda:
            chosen["memdisc-graph"] = GRAPH
        for name, precision in chosen.items():
            m, hs, opt = copies()
            fast = DSC(SnapshotSet(hs), mode=mode, schedule=ThresholdSchedule("fixed", tau0=tau), precision=precision)
            fns[name] = (lambda f=fast, m=m, o=opt: f.train_step(m, o, x, y, 0))
            fns[name].correct = (lambda f=fast, m=m: f.correct(m, x, y, 0)[0])
        return fns
    if method == "craft":
        m, _, _ = copies()
        cfg = AttackConfig()
        n_val = 100
        data = AttackData(classifier_head(m).out_features, x_val=x[:n_val].flip(0).contiguous(),
                          y_val=y[:n_val].flip(0).contiguous(), x_trigger=x, y_trigger=y)
        attack = AccumulativeAttack(cfg, data, seed=0)
        attack.prepare(m)
        x_trig, y_trig = attack.trigger_batch(m)
        eps, steps, step_size = cfg.poison_schedule()
        return {"reference": lambda: ref.seed_craft_accumulative(
                    model, x, y, x_trig, y_trig, attack.x_val, attack.y_val, eps=eps, steps=steps,
                    step_size=step_size, gamma=cfg.gamma),
                "memdisc": lambda: attack.poison(m, x, y, 0)}
    raise ValueError(f"method: unknown {method!r}")


def _time(fns: dict, device: str, repeats: int) -> dict:
    """Interleaved wall times (ms) of each provider: one warm-up, then ``repeats`` rounds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r > 0:
                times[name].append(1e3 * (time.perf_counter() - t0))
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
        out[name] = {"median_ms": statistics.median(ts), "p20_ms": q[1], "p80_ms": q[7]}
    return out


def kernel_share(fn, device: str) -> dict:
    """Share of self time in memdisc ops vs the rest, from torch.profiler over one call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        fn()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    total = kernels = 0.0
    for ev in prof.key_averages():
        t = getattr(ev, attr, 0.0) or 0.0
        if ev.key.startswith("memdisc::"):
            kernels += t
        # On CUDA a kernel's time shows on its own (device) row and again on the CPU op that launched
        # it: the total counts the device rows only, as torch's own table does.
        if device != "cuda" or ev.device_type == DeviceType.CUDA:
            total += t
    return {"kernel_share": kernels / total if total else float("nan"), "profiled_ms": total / 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--ks", default="1,4,16")
    ap.add_argument("--methods", default="ST,AT-seed,DSC-batch,DSC-sample,craft")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", action="store_true", help="also time DSC with channels-last and bf16 autocast")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    type=out_dir_arg, help="directory for the CSV")
    args = ap.parse_args(argv)
    prov = provenance(args.device)
    rows = []
    for model_name in args.models.split(","):
        for K in [int(k) for k in args.ks.split(",")]:
            model, snaps, x, y = _setup(model_name, K, args.batch, args.device)
            for method in args.methods.split(","):
                if K > 1 and not method.startswith("DSC"):
                    continue  # only DSC depends on K
                scenarios = ["all", "half"] if method == "DSC-sample" else ["all"]
                for scenario in scenarios:
                    fns = _providers(method, scenario, model, snaps, x, y, args.variants)
                    t = _time(fns, args.device, args.repeats)
                    share = kernel_share(fns["memdisc"], args.device) if method.startswith("DSC") else {}
                    base = t["reference"]["median_ms"]
                    quality = {name: _quality(fn.correct, model, snaps, x, y) for name, fn in fns.items()
                               if hasattr(fn, "correct")}
                    for provider, stats in t.items():
                        rows.append({"model": model_name, "K": K, "batch": args.batch, "method": method,
                                     "scenario": scenario, "provider": provider, **{k: round(v, 3) for k, v in stats.items()},
                                     "samples_per_s": round(1e3 * args.batch / stats["median_ms"], 1),
                                     "speedup_vs_reference": round(base / stats["median_ms"], 3),
                                     **({k: round(v, 4) for k, v in share.items()} if provider == "memdisc" else {}),
                                     **{k: round(v, 5) for k, v in quality.get(provider, {}).items()},
                                     **prov})
                    for provider in t:
                        if provider != "reference":
                            print(f"{model_name:9s} K={K:<3d} {method:10s} {scenario:5s} reference {base:9.1f} ms  "
                                  f"{provider} {t[provider]['median_ms']:9.1f} ms  "
                                  f"x{base / t[provider]['median_ms']:.2f}", flush=True)
    path = os.path.join(args.out, f"online_step_{args.device}_{args.models.replace(',', '-')}.csv")
    write_csv_atomic(path, rows)
    print(f"\nwritten {path}\n")
    print(f"{'model':9s} {'K':>3s} {'method':10s} {'scen':5s} {'variant':14s} {'ref samp/s':>11s} {'memdisc samp/s':>14s} "
          f"{'speedup':>8s} "
          f"{'kernel share':>12s}")
    for r in rows:
        if r["provider"] != "reference":
            ref_row = next(q for q in rows if q["provider"] == "reference" and
                           (q["model"], q["K"], q["method"], q["scenario"]) == (r["model"], r["K"], r["method"], r["scenario"]))
            share = r.get("kernel_share")
            print(f"{r['model']:9s} {r['K']:3d} {r['method'][:10]:10s} {r['scenario']:5s} {r['provider'][8:] or 'fp32':14s} "
                  f"{ref_row['samples_per_s']:11.0f} "
                  f"{r['samples_per_s']:14.0f} {r['speedup_vs_reference']:8.2f} "
                  f"{'' if share is None else f'{100 * share:.1f}%':>12s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
