"""The summary of a comparison over seeds: each metric's spread over the seeds, each defence's attack
effect against ST's on the same seeds, and its Markdown table (``OUT/summary.json``, ``summary.md``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from memdisc.experiments.compare import Comparison


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation (ddof 1) and the 95 % Student-t interval of the mean of per-seed values.

    ``ci95 = mean -/+ t_{0.975, n-1} * std / sqrt(n)``; std and ci95 are None for fewer than 2 values.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"values": [], "mean": None, "std": None, "ci95": None}
    mean = float(arr.mean())
    if arr.size < 2:
        return {"values": list(values), "mean": mean, "std": None, "ci95": None}
    import scipy.stats  # here, not at the top: it is 2 s of every `memdisc compare` start

    std = float(arr.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.975, arr.size - 1)) * std / math.sqrt(arr.size)
    return {"values": list(values), "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def summarize_seeds(per_seed: dict[int, Comparison]) -> dict[str, Any]:
    """Per run name, the per-seed values of each metric with their spread (:func:`spread`), and per
    defence the paired per-seed difference of its attack effect from ST's (``vs_st``: negative is a
    defence that held the attack better than training on the batches as received)."""
    metrics = {
        "error_before_trigger": lambda effect, r: r.error_before_trigger,
        "error_after_trigger": lambda effect, r: r.error_after_trigger,
        "error_delta": lambda effect, r: r.error_delta,
        "attack_effect": lambda effect, r: effect,
        "steps_run": lambda effect, r: r.steps_run,
        "auroc_sample": lambda effect, r: (r.detection["per_sample"] or {}).get("auroc"),
        "auroc_batch": lambda effect, r: (r.detection["per_batch"] or {}).get("auroc"),
    }
    effects = {seed: comparison.attack_effect for seed, comparison in per_seed.items()}
    first = next(iter(per_seed.values()))
    runs = {}
    for name in first.runs:
        runs[name] = {}
        for metric, get in metrics.items():
            values = [get(effects[seed].get(name), comparison.runs[name]) for seed, comparison in per_seed.items()]
            runs[name][metric] = spread([v for v in values if v is not None])
        if name not in ("control", "ST") and all("ST" in effect for effect in effects.values()):
            runs[name]["vs_st"] = spread([effect[name] - effect["ST"] for effect in effects.values()])
    return {"seeds": list(per_seed), "runs": runs}


def _interval(m: dict[str, Any], scale: float = 100.0, fmt: str = "{:+.2f}") -> str:
    """``mean ± std [lo, hi]`` of a :func:`spread`, scaled (n/a when empty)."""
    if m["mean"] is None:
        return "n/a"
    text = fmt.format(scale * m["mean"])
    if m["std"] is not None:
        lo, hi = m["ci95"]
        text += f" ± {scale * m['std']:.2f} [{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"
    return text


def _verdict(m: dict[str, Any]) -> str:
    """Whether a paired difference's 95 % interval excludes 0."""
    if m["ci95"] is None:
        return "one seed: no interval"
    lo, hi = m["ci95"]
    return "lower than ST" if hi < 0 else "higher than ST" if lo > 0 else "not distinguishable from ST"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary over seeds as Markdown: mean ± std [95 % interval] per metric, then each defence's
    attack effect against ST's on the same seeds, with the conclusion its interval supports."""
    seeds = summary["seeds"]
    lines = [f"# Comparison over {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             "Mean ± standard deviation [95 % Student-t interval of the mean] over seeds (each seed: its own "
             "burn-in, stream, splits and attack).",
             "Attack effect = the run's trigger error delta minus the no-attack control's, in points.", "",
             "| run | err before trigger % | err after trigger % | attack effect (pp) | per-seed effect (pp) "
             "| steps | AUROC (sample) | AUROC (batch) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        per_seed = ", ".join(f"{100 * v:+.1f}" for v in r["attack_effect"]["values"]) or "n/a"
        lines.append(f"| {name} | {_interval(r['error_before_trigger'], fmt='{:.2f}')} | "
                     f"{_interval(r['error_after_trigger'], fmt='{:.2f}')} | {_interval(r['attack_effect'])} | "
                     f"{per_seed} | {_interval(r['steps_run'], 1.0, '{:.1f}')} | "
                     f"{_interval(r['auroc_sample'], 1.0, '{:.3f}')} | {_interval(r['auroc_batch'], 1.0, '{:.3f}')} |")
    paired = {name: r["vs_st"] for name, r in summary["runs"].items() if "vs_st" in r}
    if paired:
        lines += ["", "Each defence's attack effect minus ST's on the same seed (pp), and what its 95 % interval "
                  "supports:", "", "| defence | effect − ST's effect (pp) | conclusion at 95 % |", "|---|---|---|"]
        lines += [f"| {name} | {_interval(m)} | {_verdict(m)} |" for name, m in paired.items()]
    prov, cfg = summary.get("provenance", {}), summary.get("config", {})
    isa = prov.get("cpu_isa", {})
    lines += ["", "Per-seed tables, plots and every number: `seed-N/results.md`, `seed-N/results.json`.",
              f"Dataset {cfg.get('dataset')}, model {cfg.get('model')}; memdisc {prov.get('memdisc')}, "
              f"torch {prov.get('torch')}, commit `{prov.get('commit')}`, device {prov.get('device')}; "
              f"CPU {isa.get('cpu')}, instruction sets: memdisc kernels {isa.get('memdisc')}, ATen "
              f"{isa.get('aten')}, oneDNN {isa.get('onednn')}."]
    return "\n".join(lines) + "\n"
