"""``memdisc compare``: one burn-in (reused if present), then the no-attack
control and every defence on the same seeded stream, then the report.

Run directory::

    OUT/burnin/                 the burn-in run (snapshots)
    OUT/runs/NAME/              one online run each (resumable)
    OUT/results.json            everything below, with configuration and provenance
    OUT/results.md              the comparison table and notes
    OUT/*.png                   error curves, discrepancy histograms, ROC curves

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
from pathlib import Path
from typing import Any

from memdisc.artifacts import provenance, write_json
from memdisc.burnin import BurninConfig, resolve_device, run_burnin
from memdisc.config import build, field, merge, read_toml, section, to_dict
from memdisc.defenses import DEFENSES
from memdisc.online import OnlineConfig, run_online
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
    seed: int = field(0, "random seed of every phase")
    device: str = field("auto", "cpu, cuda or auto")
    out: str | None = field(None, "run directory (default: runs/compare-DATASET-MODEL-sSEED)")
    burnin: BurninConfig = section(BurninConfig, "burn-in options (dataset, model, seed, device, out come from above)")
    online: OnlineConfig = section(OnlineConfig, "online-phase options shared by every run")

    def __post_init__(self):
        unknown = [d for d in self.defense_list if d not in DEFENSES]
        if unknown:
            raise ValueError(f"defenses: unknown {unknown}; expected names from {', '.join(DEFENSES)}")
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
    cfg = build(CompareConfig, values)
    out = Path(cfg.out)
    cfg.burnin = dataclasses.replace(cfg.burnin, dataset=cfg.dataset, data_dir=cfg.data_dir, model=cfg.model,
                                     seed=cfg.seed, device=cfg.device, out=str(out / "burnin"))
    cfg.online = dataclasses.replace(cfg.online, burnin=str(out / "burnin"), seed=cfg.seed, device=cfg.device,
                                     out=str(out / "runs"))
    return cfg


def run_compare(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """Burn-in, control + every defence, results.json and the report.  Returns the results dict."""
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
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
