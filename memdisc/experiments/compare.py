"""``memdisc compare``: one burn-in (reused if present), then the no-attack
control and every defence on the same seeded stream, then the report.

It is a preset of the experiment grid (``memdisc.experiments.runner``): one axis, ``run``
(``control`` then each defence), times the seeds; a seed's burn-in is the prerequisite its
cells share, each cell one online run (a ``RunResult``), and each seed's report is written
once its cells are done.

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
import functools
from pathlib import Path
from typing import Any

import torch

from memdisc.artifacts import atomic_write_text, provenance, read_json, remove_stale_temp_files, write_json
from memdisc.config import (OptionError, build, check_choice, check_int, check_list, check_seed, comparable, field,
                            merge, option_name, read_toml, section, to_dict)
from memdisc.data import DATASETS, check_dataset_files
from memdisc.defenses import DEFENSES
from memdisc.eval.result import RunResult
from memdisc.experiments.grid import Cell, Grid
from memdisc.experiments.report import write_report
from memdisc.experiments.results import CellResult
from memdisc.experiments.executors import LOCAL, ExecutorConfig
from memdisc.experiments.runner import run_grid
from memdisc.experiments.summary import summarize_seeds, summary_markdown
from memdisc.models import MODELS
from memdisc.training.online import OnlineConfig, check_device, run_online
from memdisc.training.supervised import BurninConfig, check_model_weights, run_burnin

#: The defences compare runs by default, written out: a defence added to the registry
#: (memdisc.defenses.DEFENSES) joins a comparison only when asked for.
DEFAULT_DEFENSES = ["ST", "GC", "AT-seed", "AT-madry", "DSC-batch", "DSC-sample"]

PRESETS: dict[str, dict[str, Any]] = {
    # Measured (control + ST, seeds 0-2, bench/NOTES.md "Choosing the demo defaults"): the seed's
    # 2-step trigger gave an attack effect of +7.9 / +4.2 / +11.4 pp; a 10-step trigger (same
    # eps 0.2, step 2*eps/10) gave +7.8 / +8.2 / +11.7 pp, so the demo crafts the trigger in 10 steps.
    "cpu-demo": {"online": {"attack": {"trigger_steps": 10}}},
    "seed-cifar10": {
        "burnin": {"epochs": 40, "batch_size": 256, "lr": 0.1, "weight_decay": 1e-4, "augment": True,
                   "snapshot_every": 10},
        "online": {"history_epochs": [20], "stop_error": 0.18, "max_steps": 100, "lr": 0.1, "momentum": 0.9,
                   "dsc": {"threshold": "seed"}},
    },
}


@dataclasses.dataclass
class CompareConfig:
    dataset: str = field("fashion-mnist", "dataset name: fashion-mnist, mnist, cifar10, cifar100, svhn")
    data_dir: str | None = field(None, "directory holding the dataset files", path="data")
    model: str = field("cnn", "model name: cnn, resnet18")
    preset: str = field("auto", "defaults: cpu-demo, seed-cifar10, or auto (seed-cifar10 for cifar10+resnet18)")
    defenses: list[str] = field(DEFAULT_DEFENSES, f"defences to compare, of {', '.join(DEFENSES)} (the control "
                                                  "always runs)")
    seed: int = field(0, "random seed of every phase (the first seed with --repeats)")
    repeats: int = field(1, "independent repetitions with seeds seed, seed+1, ...: each in OUT/seed-N with its own "
                            "burn-in, plus a summary over seeds")
    device: str = field("auto", "cpu, cuda or auto")
    out: str | None = field(None, "run directory (default: runs/compare-DATASET-MODEL-sSEED)", path="run")
    burnin: BurninConfig = section(BurninConfig, "burn-in options (dataset, model, seed, device, out come from above)")
    online: OnlineConfig = section(OnlineConfig, "online-phase options shared by every run")

    def __post_init__(self):
        """A list of distinct known defences; known dataset and model; a seed in [0, 2**32); repeats >= 1;
        and every epoch the online phase reads (history_epochs, start_epoch) one the burn-in saves a
        snapshot at."""
        check_list("defenses", self.defenses, str)
        unknown = [d for d in self.defenses if d not in DEFENSES]
        if unknown:
            raise OptionError("defenses", f"unknown {unknown}; expected names from {', '.join(DEFENSES)}")
        if len(set(self.defenses)) != len(self.defenses):
            raise OptionError("defenses", f"expected each defence once, got {self.defenses!r}")
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, sorted(MODELS))
        check_seed("seed", self.seed)
        check_int("repeats", self.repeats)
        if self.seed + self.repeats > 2 ** 32:
            raise OptionError("repeats", f"seeds {self.seed}..{self.seed + self.repeats - 1} go past the last seed "
                                         f"2**32 - 1; expected at most {2 ** 32 - self.seed}")
        b, o = self.burnin, self.online
        saved = [e for e in range(1, b.epochs + 1) if e % b.snapshot_every == 0 or e == b.epochs]
        read = {"history_epochs": o.history_epochs,
                "start_epoch": [] if o.start_epoch is None else [o.start_epoch]}
        for name, epochs in read.items():
            missing = [e for e in epochs if e not in saved]
            if missing:
                raise OptionError(f"online.{name}", f"the burn-in saves no snapshot at epoch {missing[0]}: it saves "
                                  f"epochs {', '.join(map(str, saved))} (burnin.epochs {b.epochs}, "
                                  f"burnin.snapshot_every {b.snapshot_every})")
        if self.out is None:
            self.out = f"runs/compare-{self.dataset}-{self.model}-s{self.seed}"


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


@dataclasses.dataclass
class BurninSummary:
    """What a comparison reports of its burn-in."""
    test_error: float
    epochs: int
    seconds: float


@dataclasses.dataclass
class Comparison:
    """One seed's comparison, the typed ``OUT/results.json``: the configuration (with dataset and
    model), provenance, the burn-in, and every run by name (``control`` first, then each defence)."""
    config: dict[str, Any]
    provenance: dict[str, Any]
    burnin: BurninSummary
    runs: dict[str, RunResult]

    @property
    def attack_effect(self) -> dict[str, float]:
        """Per attacked run: its trigger error delta minus the no-attack control's."""
        control = self.runs["control"]
        return {name: r.error_delta - control.error_delta for name, r in self.runs.items() if name != "control"}

    def to_json(self) -> dict[str, Any]:
        """The object written to ``results.json``."""
        return {"config": self.config, "provenance": self.provenance, "burnin": dataclasses.asdict(self.burnin),
                "runs": {name: r.to_json() for name, r in self.runs.items()}, "attack_effect": self.attack_effect}


def compare_grid(cfg: CompareConfig) -> Grid:
    """The comparison as a grid: the runs (``control``, then each defence) x the seeds, laid out as
    ``OUT/runs/NAME`` (one seed) or ``OUT/seed-S/runs/NAME``; compare writes its own results files."""
    return Grid("compare", Path(cfg.out), {"run": ["control", *cfg.defenses]},
                list(range(cfg.seed, cfg.seed + cfg.repeats)), RunResult,
                layout="runs/{run}" if cfg.repeats == 1 else "seed-{seed}/runs/{run}", results_file=None)


def _seed_config(cfg: CompareConfig, seed: int) -> CompareConfig:
    """The comparison of one seed: ``cfg`` itself with one repeat, else its own ``OUT/seed-S``."""
    if cfg.repeats == 1:
        return cfg
    return _propagate(dataclasses.replace(cfg, seed=seed, repeats=1, out=str(Path(cfg.out) / f"seed-{seed}")))


def run_online_cell(seeds: dict[int, CompareConfig], device: torch.device, progress: bool, cell: Cell,
                    directory: Path) -> RunResult:
    """One cell of the comparison: the online run ``cell.axes["run"]`` of its seed, in ``directory``."""
    name = cell.axes["run"]
    online = dataclasses.replace(seeds[cell.seed].online, defense="ST" if name == "control" else name,
                                 control=name == "control", out=str(directory))
    result = run_online(online, progress=progress, device=device)
    if progress:
        print(f"    error {100 * result.error_before_trigger:.2f}% -> {100 * result.error_after_trigger:.2f}% "
              f"after the trigger ({result.steps_run} steps; {result.stop_reason})")
    return result


def run_compare(cfg: CompareConfig, progress: bool = True,
                executor: ExecutorConfig = LOCAL) -> Comparison | dict[str, Any]:
    """One comparison per seed (see the module docstring), its online runs where ``executor`` puts them
    (:mod:`memdisc.experiments.executors`; the burn-in runs here, at the executor's thread count);
    returns the :class:`Comparison` (one seed) or the summary over seeds (``--repeats``;
    :func:`memdisc.experiments.summary.summarize_seeds`).

    Everything that can be checked is checked before any work or write (:func:`_check_start`);
    a failed run raises :class:`memdisc.experiments.runner.GridError` once every other run is done.
    """
    grid = compare_grid(cfg)
    seeds = {seed: _seed_config(cfg, seed) for seed in grid.seeds}
    device = _check_start(cfg, list(seeds.values()))
    burnins: dict[int, BurninSummary] = {}
    per_seed: dict[int, Comparison] = {}

    def prepare(seed: int) -> None:
        """The seed's config.json, then its burn-in (returned from its files when finished)."""
        sub = seeds[seed]
        if progress and cfg.repeats > 1:
            print(f"=== seed {seed} ({seed - cfg.seed + 1}/{cfg.repeats}) ===")
        write_json(Path(sub.out) / "config.json", {"command": "compare", "config": to_dict(sub),
                                                    "provenance": provenance(seed, device)})
        history = run_burnin(sub.burnin, progress=progress, device=device)
        burnins[seed] = BurninSummary(history["final_test_error"], len(history["history"]), history["seconds"])

    def finish(seed: int, results: list[CellResult]) -> None:
        """The seed's results.json and report."""
        sub = seeds[seed]
        per_seed[seed] = Comparison({**to_dict(sub), "dataset": sub.dataset, "model": sub.model},
                                    provenance(seed, device), burnins[seed],
                                    {r.cell.axes["run"]: r.payload for r in results})
        _write_seed(per_seed[seed], Path(sub.out), progress)

    with executor.start(device) as cells:
        run_grid(grid, functools.partial(run_online_cell, seeds, device, progress), prepare=prepare,
                 finish=finish, executor=cells, retries=executor.retry_limit, progress=progress)
    if cfg.repeats == 1:
        return per_seed[cfg.seed]
    summary = {**summarize_seeds(per_seed), "config": to_dict(cfg), "provenance": provenance(cfg.seed, device)}
    write_json(Path(cfg.out) / "summary.json", summary)
    path = atomic_write_text(Path(cfg.out) / "summary.md", summary_markdown(summary))
    if progress:
        print(path.read_text())
    return summary


def _write_seed(comparison: Comparison, out: Path, progress: bool) -> None:
    """``results.json``, ``results.md`` and the figures of one seed's comparison in ``out``."""
    write_json(out / "results.json", comparison.to_json())
    paths = write_report(comparison, out)
    if progress:
        print((out / "results.md").read_text())
        print("written:", ", ".join(str(p) for p in [out / "results.json", *paths.values()]))


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


