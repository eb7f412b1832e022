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
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memdisc.artifacts import atomic_write_text, provenance, read_json, remove_stale_temp_files, write_json
from memdisc.config import (OptionError, build, check_choice, check_int, check_seed, comparable, field, merge,
                            option_name, parse_int_list, read_toml, section, to_dict)
from memdisc.data import DATASETS, check_dataset_files
from memdisc.defenses import DEFENSES
from memdisc.eval.result import RunResult
from memdisc.models import MODELS
from memdisc.report import write_report
from memdisc.training.online import OnlineConfig, check_device, run_online
from memdisc.training.supervised import BurninConfig, check_model_weights, run_burnin

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
    data_dir: str | None = field(None, "directory holding the dataset files", path="data")
    model: str = field("cnn", "model name: cnn, resnet18")
    preset: str = field("auto", "defaults: cpu-demo, seed-cifar10, or auto (seed-cifar10 for cifar10+resnet18)")
    defenses: str = field(",".join(DEFENSES), "comma list of defences to compare (the control always runs)")
    seed: int = field(0, "random seed of every phase (the first seed with --repeats)")
    repeats: int = field(1, "independent repetitions with seeds seed, seed+1, ...: each in OUT/seed-N with its own "
                            "burn-in, plus a summary over seeds")
    device: str = field("auto", "cpu, cuda or auto")
    out: str | None = field(None, "run directory (default: runs/compare-DATASET-MODEL-sSEED)", path="run")
    burnin: BurninConfig = section(BurninConfig, "burn-in options (dataset, model, seed, device, out come from above)")
    online: OnlineConfig = section(OnlineConfig, "online-phase options shared by every run")

    def __post_init__(self):
        """Known defences, dataset and model; a seed in [0, 2**32); repeats >= 1; and every epoch
        the online phase reads (history_epochs, start_epoch) one the burn-in saves a snapshot at."""
        unknown = [d for d in self.defense_list if d not in DEFENSES]
        if unknown:
            raise OptionError("defenses", f"unknown {unknown}; expected names from {', '.join(DEFENSES)}")
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, sorted(MODELS))
        check_seed("seed", self.seed)
        check_int("repeats", self.repeats)
        b, o = self.burnin, self.online
        saved = [e for e in range(1, b.epochs + 1) if e % b.snapshot_every == 0 or e == b.epochs]
        read = {"history_epochs": parse_int_list("history_epochs", o.history_epochs),
                "start_epoch": [] if o.start_epoch is None else [o.start_epoch]}
        for name, epochs in read.items():
            missing = [e for e in epochs if e not in saved]
            if missing:
                raise OptionError(f"online.{name}", f"the burn-in saves no snapshot at epoch {missing[0]}: it saves "
                                  f"epochs {', '.join(map(str, saved))} (burnin.epochs {b.epochs}, "
                                  f"burnin.snapshot_every {b.snapshot_every})")
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
        raise ValueError(f"{option_name('preset')}: expected auto or one of {sorted(PRESETS)}, got {name!r}")
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
    """One comparison per seed (see the module docstring); returns the results (or the summary over seeds).

    Everything that can be checked is checked before any work or write (:func:`_check_start`).
    """
    seeds = [cfg] if cfg.repeats == 1 else [
        _propagate(dataclasses.replace(cfg, seed=seed, repeats=1, out=str(Path(cfg.out) / f"seed-{seed}")))
        for seed in range(cfg.seed, cfg.seed + cfg.repeats)]
    device = _check_start(cfg, seeds)
    if cfg.repeats == 1:
        return _run_one_seed(cfg, device, progress)
    per_seed = {}
    for i, sub in enumerate(seeds, 1):
        if progress:
            print(f"=== seed {sub.seed} ({i}/{cfg.repeats}) ===")
        per_seed[sub.seed] = _run_one_seed(sub, device, progress)
    summary = {**summarize_seeds(per_seed), "config": to_dict(cfg), "provenance": provenance(cfg.seed, device)}
    write_json(Path(cfg.out) / "summary.json", summary)
    path = atomic_write_text(Path(cfg.out) / "summary.md", summary_markdown(summary))
    if progress:
        print(path.read_text())
    return summary


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


def summarize_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
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
    first = next(iter(per_seed.values()))
    runs = {}
    for name in first["runs"]:
        runs[name] = {}
        for metric, get in metrics.items():
            values = [get(res["attack_effect"].get(name), RunResult.from_json(res["runs"][name]))
                      for res in per_seed.values()]
            runs[name][metric] = spread([v for v in values if v is not None])
        if name not in ("control", "ST") and all("ST" in res["attack_effect"] for res in per_seed.values()):
            runs[name]["vs_st"] = spread([res["attack_effect"][name] - res["attack_effect"]["ST"]
                                          for res in per_seed.values()])
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


# Options a comparison directory may be re-run with: which defences run, where, and how many seeds.
_RERUNNABLE = frozenset({"defenses", "device", "repeats"})


def _check_out_dir(cfg: CompareConfig) -> None:
    """Refuse a run directory whose config.json holds a comparison with another configuration
    (paths compared as :func:`memdisc.config.comparable` makes them: the same directory under
    another spelling, or moved, is the same comparison)."""
    path = Path(cfg.out) / "config.json"
    if not path.exists():
        return
    saved = read_json(path, "delete it (the burn-in and the runs in the directory check their own configurations)",
                      objects=("config",))
    saved, current = comparable(CompareConfig, saved["config"]), comparable(CompareConfig, to_dict(cfg))
    diff = sorted(k for k, v in current.items() if k not in _RERUNNABLE and saved.get(k) != v)
    if diff:
        raise ValueError(f"{path}: a comparison with another configuration (differs in {', '.join(diff)}); "
                         "use another --out or delete the directory")


def _check_start(cfg: CompareConfig, seeds: list[CompareConfig]) -> torch.device:
    """What a comparison checks before any work or write: the device, each seed's run directory
    (:func:`_check_out_dir`), the data files and a burn-in weights file.  Then it removes the temporary files that killed
    writes left in its own directories.  Returns the device."""
    device = check_device(cfg.online, "online.")
    for sub in seeds:
        _check_out_dir(sub)
    check_dataset_files(cfg.dataset, cfg.data_dir)
    check_model_weights(seeds[0].burnin)
    remove_stale_temp_files(*dict.fromkeys([cfg.out, *(sub.out for sub in seeds)]))
    return device


def _run_one_seed(cfg: CompareConfig, device: torch.device, progress: bool = True) -> dict[str, Any]:
    """Burn-in, control + every defence, results.json and the report.  Returns the results dict."""
    out = Path(cfg.out)
    write_json(out / "config.json", {"command": "compare", "config": to_dict(cfg),
                                     "provenance": provenance(cfg.seed, device)})
    burnin = run_burnin(cfg.burnin, progress=progress, device=device)
    names = ["control"] + cfg.defense_list
    runs: dict[str, RunResult] = {}
    for i, name in enumerate(names, 1):
        online = dataclasses.replace(cfg.online, defense="ST" if name == "control" else name,
                                     control=name == "control", out=str(out / "runs" / name))
        if progress:
            print(f"[{i}/{len(names)}] online run: {name}")
        runs[name] = run_online(online, progress=progress, device=device)
        if progress:
            r = runs[name]
            print(f"    error {100 * r.error_before_trigger:.2f}% -> {100 * r.error_after_trigger:.2f}% "
                  f"after the trigger ({r.steps_run} steps; {r.stop_reason})")
    results = {"config": {**to_dict(cfg), "dataset": cfg.dataset, "model": cfg.model},
               "provenance": provenance(cfg.seed, device),
               "burnin": {"test_error": burnin["final_test_error"], "epochs": len(burnin["history"]),
                          "seconds": burnin["seconds"]},
               "runs": {name: r.to_json() for name, r in runs.items()}}
    control = runs["control"]
    results["attack_effect"] = {name: r.error_delta - control.error_delta
                                for name, r in runs.items() if name != "control"}
    write_json(out / "results.json", results)
    paths = write_report(results, out)
    if progress:
        print((out / "results.md").read_text())
        print("written:", ", ".join(str(p) for p in [out / "results.json", *paths.values()]))
    return results
