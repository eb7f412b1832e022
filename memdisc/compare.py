"""``memdisc compare``: one burn-in (reused if present), then the no-attack
control and every defence on the same seeded stream, then the report.

Run directory::

    OUT/burnin/                 the burn-in run (snapshots)
    OUT/runs/NAME/              one online run each (resumable)
    OUT/results.json            everything below, with configuration and provenance
    OUT/results.md              the comparison table and notes
    OUT/*.png                   error curves, discrepancy histograms, ROC curves

With ``--repeats N`` each seed gets that layout under ``OUT/seed-S/`` and
``OUT/summary.json`` / ``OUT/summary.md`` hold mean ± std over the seeds.

Presets set defaults that suit a set-up; TOML values and flags override them:

* ``cpu-demo``: Fashion-MNIST and the small CNN on two CPU cores (the default):
  the dataclass defaults, with the trigger crafted in 10 signed steps.
* ``seed-cifar10``: the seed code's CIFAR-10 / ResNet-18 set-up (ALGORITHM.md
  section 1): 40 burn-in epochs at lr 0.1, batch 256, crop + flip, snapshots
  every 10 epochs, historical epoch 20, stop at test error 0.18, the seed's
  DSC threshold schedule.  ``auto`` picks it for ``--dataset cifar10 --model resnet18``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from memdisc.artifacts import atomic_write_text, provenance, write_json
from memdisc.burnin import BurninConfig, resolve_device, run_burnin
from memdisc.config import build, field, merge, read_toml, section, to_dict
from memdisc.defenses import DEFENSES
from memdisc.online import OnlineConfig, check_device, run_online
from memdisc.report import write_report

PRESETS: dict[str, dict[str, Any]] = {
    # Measured (control + ST, seeds 0-2, bench/NOTES.md "Choosing the demo defaults"): the seed's
    # 2-step trigger gave an attack effect of +7.9 / +4.2 / +11.4 pp; a 10-step trigger (same
    # eps 0.2, step 2*eps/10) gave +7.8 / +8.2 / +11.7 pp, so the demo crafts the trigger in 10 steps.
    "cpu-demo": {"online": {"attack": {"trigger_steps": 10}}},
    "seed-cifar10": {
        "burnin": {"epochs": 40, "batch_size": 256, "lr": 0.1, "weight_decay": 1e-4, "augment": True,
                   "snapshot_every": 10},
        "online": {"history_epochs": "20", "stop_error": 0.18, "max_steps": 100, "lr": 0.1, "momentum": 0.9,
                   "dsc": {"threshold": "seed"}},
    },
}


@dataclasses.dataclass
class CompareConfig:
    dataset: str = field("fashion-mnist", "dataset name: fashion-mnist, mnist, cifar10, cifar100, svhn")
    data_dir: str | None = field(None, "directory holding the dataset files")
    model: str = field("cnn", "model name: cnn, resnet18")
    preset: str = field("auto", "defaults: cpu-demo, seed-cifar10, or auto (seed-cifar10 for cifar10+resnet18)")
    defenses: str = field(",".join(DEFENSES), "comma list of defences to compare (the control always runs)")
    seed: int = field(0, "random seed of every phase (the first seed with --repeats)")
    repeats: int = field(1, "independent repetitions with seeds seed, seed+1, ...: each in OUT/seed-N with its own "
                            "burn-in, plus a summary over seeds")
    device: str = field("auto", "cpu, cuda or auto")
    out: str | None = field(None, "run directory (default: runs/compare-DATASET-MODEL-sSEED)")
    burnin: BurninConfig = section(BurninConfig, "burn-in options (dataset, model, seed, device, out come from above)")
    online: OnlineConfig = section(OnlineConfig, "online-phase options shared by every run")

    def __post_init__(self):
        unknown = [d for d in self.defense_list if d not in DEFENSES]
        if unknown:
            raise ValueError(f"defenses: unknown {unknown}; expected names from {', '.join(DEFENSES)}")
        if self.repeats < 1:
            raise ValueError(f"repeats: expected >= 1, got {self.repeats}")
        if self.out is None:
            self.out = f"runs/compare-{self.dataset}-{self.model}-s{self.seed}"

    @property
    def defense_list(self) -> list[str]:
        return [d.strip() for d in self.defenses.split(",") if d.strip()]


# Options of the sections that compare sets itself (from its top-level options); not flags of compare.
SHARED_FIELDS = frozenset({f"burnin.{n}" for n in ("dataset", "data_dir", "model", "seed", "device", "out")}
                          | {f"online.{n}" for n in ("burnin", "defense", "control", "seed", "device", "out")})


def _preset_name(values: dict[str, Any]) -> str:
    name = values.get("preset", "auto")
    if name == "auto":
        return "seed-cifar10" if (values.get("dataset"), values.get("model")) == ("cifar10", "resnet18") else "cpu-demo"
    if name not in PRESETS:
        raise ValueError(f"preset: expected auto or one of {sorted(PRESETS)}, got {name!r}")
    return name


def load_compare_config(toml_path: Path | None = None, overrides: dict[str, Any] | None = None) -> CompareConfig:
    """Defaults < preset < TOML < flags; the burn-in and online sections get the shared top-level values."""
    values = merge(read_toml(toml_path), overrides or {})
    values = merge(PRESETS[_preset_name(values)], values)
    return _propagate(build(CompareConfig, values))


def _propagate(cfg: CompareConfig) -> CompareConfig:
    """Give the burn-in and online sections the shared top-level values."""
    out = Path(cfg.out)
    cfg.burnin = dataclasses.replace(cfg.burnin, dataset=cfg.dataset, data_dir=cfg.data_dir, model=cfg.model,
                                     seed=cfg.seed, device=cfg.device, out=str(out / "burnin"))
    cfg.online = dataclasses.replace(cfg.online, burnin=str(out / "burnin"), seed=cfg.seed, device=cfg.device,
                                     out=str(out / "runs"))
    return cfg


def run_compare(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """One comparison per seed (see the module docstring); returns the results (or the summary over seeds)."""
    if cfg.repeats == 1:
        return _run_one_seed(cfg, progress)
    per_seed = {}
    for seed in range(cfg.seed, cfg.seed + cfg.repeats):
        if progress:
            print(f"=== seed {seed} ({seed - cfg.seed + 1}/{cfg.repeats}) ===")
        sub = _propagate(dataclasses.replace(cfg, seed=seed, repeats=1, out=str(Path(cfg.out) / f"seed-{seed}")))
        per_seed[seed] = _run_one_seed(sub, progress)
    summary = {**summarize_seeds(per_seed), "config": to_dict(cfg),
               "provenance": provenance(cfg.seed, resolve_device(cfg.device))}
    write_json(Path(cfg.out) / "summary.json", summary)
    path = atomic_write_text(Path(cfg.out) / "summary.md", summary_markdown(summary))
    if progress:
        print(path.read_text())
    return summary


def summarize_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per run name, the per-seed values and their mean and standard deviation over seeds."""
    metrics = {
        "error_before_trigger": lambda res, r: r["error_before_trigger"],
        "error_after_trigger": lambda res, r: r["error_after_trigger"],
        "error_delta": lambda res, r: r["error_delta"],
        "attack_effect": lambda res, r: res["attack_effect"].get(r["name"]),
        "steps_run": lambda res, r: r["steps_run"],
        "auroc_sample": lambda res, r: (r["detection"]["per_sample"] or {}).get("auroc"),
        "auroc_batch": lambda res, r: (r["detection"]["per_batch"] or {}).get("auroc"),
    }
    first = next(iter(per_seed.values()))
    runs = {}
    for name in first["runs"]:
        runs[name] = {}
        for metric, get in metrics.items():
            values = [get(res, {**res["runs"][name], "name": name}) for res in per_seed.values()]
            values = [v for v in values if v is not None]
            arr = np.asarray(values, dtype=float)
            runs[name][metric] = {"values": values, "mean": float(arr.mean()) if values else None,
                                  "std": float(arr.std(ddof=1)) if len(values) > 1 else None}
    return {"seeds": list(per_seed), "runs": runs}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary over seeds as a Markdown table: mean ± std (per-seed values)."""
    def cell(m, scale=100.0, fmt="{:+.2f}"):
        if m["mean"] is None:
            return "n/a"
        std = "" if m["std"] is None else f" ± {scale * m['std']:.2f}"
        return fmt.format(scale * m["mean"]) + std

    seeds = summary["seeds"]
    lines = [f"# Comparison over seeds {', '.join(map(str, seeds))}", "",
             "Mean ± standard deviation over seeds (each seed: its own burn-in, stream, splits and attack).",
             "Attack effect = the run's trigger error delta minus the no-attack control's, in points.", "",
             "| run | err before trigger % | err after trigger % | Δ err (pp) | attack effect (pp) | per-seed effect (pp) "
             "| steps | AUROC (sample) | AUROC (batch) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        per_seed = ", ".join(f"{100 * v:+.1f}" for v in r["attack_effect"]["values"]) or "n/a"
        lines.append(f"| {name} | {cell(r['error_before_trigger'], fmt='{:.2f}')} | "
                     f"{cell(r['error_after_trigger'], fmt='{:.2f}')} | {cell(r['error_delta'])} | "
                     f"{cell(r['attack_effect'])} | {per_seed} | {cell(r['steps_run'], 1.0, '{:.1f}')} | "
                     f"{cell(r['auroc_sample'], 1.0, '{:.3f}')} | {cell(r['auroc_batch'], 1.0, '{:.3f}')} |")
    prov, cfg = summary.get("provenance", {}), summary.get("config", {})
    lines += ["", "Per-seed tables, plots and every number: `seed-N/results.md`, `seed-N/results.json`.",
              f"Dataset {cfg.get('dataset')}, model {cfg.get('model')}; memdisc {prov.get('memdisc')}, "
              f"torch {prov.get('torch')}, commit `{prov.get('commit')}`, device {prov.get('device')}."]
    return "\n".join(lines) + "\n"


# Options a comparison directory may be re-run with: which defences run, where, and how many seeds.
_RERUNNABLE = frozenset({"defenses", "device", "repeats"})


def _check_out_dir(cfg: CompareConfig) -> None:
    """Refuse a run directory whose config.json holds a comparison with another configuration
    (before anything in it is overwritten)."""
    path = Path(cfg.out) / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text()).get("config", {})
    diff = sorted(k for k, v in to_dict(cfg).items() if k not in _RERUNNABLE and saved.get(k) != v)
    if diff:
        raise ValueError(f"out: {cfg.out} holds a comparison with another configuration (differs in "
                         f"{', '.join(diff)}); use another --out or delete the directory")


def _run_one_seed(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """Burn-in, control + every defence, results.json and the report.  Returns the results dict."""
    out = Path(cfg.out)
    device = check_device(cfg.online)
    _check_out_dir(cfg)
    write_json(out / "config.json", {"command": "compare", "config": to_dict(cfg),
                                     "provenance": provenance(cfg.seed, device)})
    burnin = run_burnin(cfg.burnin, progress=progress)
    names = ["control"] + cfg.defense_list
    runs: dict[str, Any] = {}
    for i, name in enumerate(names, 1):
        online = dataclasses.replace(cfg.online, defense="ST" if name == "control" else name,
                                     control=name == "control", out=str(out / "runs" / name))
        if progress:
            print(f"[{i}/{len(names)}] online run: {name}")
        runs[name] = run_online(online, progress=progress)
        if progress:
            r = runs[name]
            print(f"    error {100 * r['error_before_trigger']:.2f}% -> {100 * r['error_after_trigger']:.2f}% "
                  f"after the trigger ({r['steps_run']} steps; {r['stop_reason']})")
    results = {"config": {**to_dict(cfg), "dataset": cfg.dataset, "model": cfg.model},
               "provenance": provenance(cfg.seed, device),
               "burnin": {"test_error": burnin["final_test_error"], "epochs": len(burnin["history"]),
                          "seconds": burnin["seconds"]},
               "runs": runs}
    control = runs["control"]
    results["attack_effect"] = {name: r["error_delta"] - control["error_delta"]
                                for name, r in runs.items() if name != "control"}
    write_json(out / "results.json", results)
    paths = write_report(results, out)
    if progress:
        print((out / "results.md").read_text())
        print("written:", ", ".join(str(p) for p in [out / "results.json", *paths.values()]))
    return results
