"""``memdisc detect``: find the poisoned rows of a training set, over attacks x training settings x
detectors x seeds (issue 14; the seed is ASSET, Pan et al., USENIX Security 2023, whose notebook
detects BadNets on CIFAR-10 with a ResNet-18).

It is a grid (``memdisc.experiments``): the axes ``attack``, ``setting`` and ``detector`` times the
seeds ``seed .. seed + repeats - 1`` (:class:`DetectGrid`).  One cell is one detector scoring one
poisoned training set, then the set without what it flagged retrained and measured
(:class:`DetectResult`).

Per seed (:meth:`DetectRun.prepare`, the study's draw, :class:`memdisc.experiments.study.StudyRun`):
``train_subset`` training rows and ``val_size`` validation rows (disjoint, from the training split),
``test_subset`` test rows, and the **base set**: ``base_per_class`` clean rows of every class from the
training split, apart from both (the notebook's 1,000 held-out rows, 100 per class; it draws them from
the test set, which it also tests on).  The clean backbone (one model trained end to end on the clean
training rows) is trained only when a cell needs it: the transfer setting's frozen feature extractor
and the clean-label attack's model.

Per (attack, setting, seed), the first cell that needs it makes, and caches:

* the poisoned set (``seed-S/poisons/ATTACK-fF.pt``, as the study's): ``round(fraction * N)`` rows
  replaced, the fraction from the attack's section;
* the **suspect model** (``seed-S/suspects/ATTACK-SETTING.pt``): the setting's victim trained on the
  poisoned set (``end-to-end``: a fresh model, every parameter, early stopping; ``transfer``: the clean
  backbone frozen, its head retrained), with copies of it after the epochs of ``md.snapshot_epochs``
  (the historical models MD compares the final model with), its clean test error and its attack
  success rate (ASR, backdoor attacks).

A cell then builds the detector ``DETECTORS[name](snapshots, **options)`` (the snapshots for MD, None
for the others; a detector with a ``seed`` option gets the cell's seed), fits it on the base set with
the suspect model, scores every training row, flags by its own rule, and measures
(:func:`memdisc.eval.detection.detection_summary`: AUROC, TPR at ``fpr`` FPR; TPR and FPR of the
flags).  Remove-and-retrain: the setting's victim trained again, from the same initialisation and
seed, on the rows not flagged; its clean test error and ASR.

Run directory::

    OUT/config.json                          the configuration and provenance
    OUT/seed-S/backbone.pt                   the clean backbone, when a cell needed it
    OUT/seed-S/poisons/ATTACK-fF.pt          a poisoned training set
    OUT/seed-S/suspects/ATTACK-SETTING.pt    a suspect model, its snapshots, error and ASR
    OUT/seed-S/cells/ATTACK-SETTING-DETECTOR/  one cell: result.json (its DetectResult), scores.pt
    OUT/results.json                         every cell (memdisc.experiments.GridResults)
    OUT/results.md, scores.png, roc.png      (detect_report.py)

Interrupt it and run the same command again: finished cells are read back, never rerun; the
backbone, poisons and suspects are read from their files.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
import typing
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memdisc.artifacts import atomic_torch_save, load_torch_file, provenance, remove_stale_temp_files
from memdisc.attacks import build_attack
from memdisc.attacks.backdoor import BackdoorAttack
from memdisc.attacks.badnets import BadNetsConfig
from memdisc.attacks.blended import BlendedConfig
from memdisc.attacks.clean_label import CleanLabelConfig
from memdisc.attacks.label_flip import FlippingLabelConfig, NoisyLabelConfig
from memdisc.config import (OptionError, build, check_choice, check_int, check_list, check_number, check_seed,
                            field, merge, option_name, read_toml, section, to_dict)
from memdisc.data import DATASETS, check_dataset_files
from memdisc.detectors import DETECTORS
from memdisc.detectors.md import REDUCTIONS
from memdisc.eval.classification import attack_success_rate, error_rate
from memdisc.eval.detection import detection_summary
from memdisc.experiments.detect_report import write_detect_report
from memdisc.experiments.detect_result import DetectResult
from memdisc.experiments.executors import LOCAL, ExecutorConfig, made_once
from memdisc.experiments.grid import Cell, Grid
from memdisc.experiments.results import GridResults
from memdisc.experiments.study import (SeededGrid, StudyRun, check_run_dir, refuse_shared_fields, run_and_report,
                                      section_of)
from memdisc.models import MODELS
from memdisc.runtime.device import resolve_device
from memdisc.snapshots import SnapshotSet
from memdisc.training.fit import FitConfig, TrainingLog, train_end_to_end, train_transfer
from memdisc.training.victim import frozen_copy, trained_module

__all__ = ["DETECT_ATTACKS", "DETECT_SETTINGS", "DETECT_DETECTORS", "MDOptions", "DetectConfig",
           "load_detect_config", "DetectGrid", "detect_grid", "DetectRun", "run_detect"]

DETECT_ATTACKS = ("badnets", "blended", "clean-label", "noisy-label", "flipping-label")
"""The attacks the grid runs, each a section of :class:`DetectConfig` (``clean-label``: ``clean_label``):
three backdoors and the ASSET seed's two label controls (no backdoor, no ASR)."""

MODEL_ATTACKS = ("clean-label",)
"""The attacks that read a model (a copy of the seed's clean backbone); the others read the rows only."""

DETECT_SETTINGS = ("end-to-end", "transfer")
"""The training settings of the suspect model (the study's, without the stream)."""

DETECT_DETECTORS = tuple(DETECTORS)
"""Every registered detector."""


def _documented_args(cls: type) -> dict[str, str]:
    """``{argument: its description}`` from the ``Args:`` block of ``cls``'s docstring (a line
    ``name: text`` indented one level, continued by lines indented further)."""
    lines = (inspect.getdoc(cls) or "").splitlines()
    if "Args:" not in lines:
        return {}
    out: dict[str, str] = {}
    for line in lines[lines.index("Args:") + 1:]:
        if not line.startswith("    "):
            break
        head, sep, text = line.strip().partition(": ")
        if not line.startswith("        ") and sep and head.isidentifier():
            out[head] = text
        elif out:
            out[list(out)[-1]] += " " + line.strip()
    return out


def _options_section(name: str, qualname: str, **grid_defaults: Any) -> type:
    """A config dataclass of detector ``name``'s keyword options, their defaults and types read from its
    constructor (one place for each default; ``grid_defaults`` replace some for this grid, and the help
    says the detector's own), so that each is a TOML key ``[SECTION]`` and a flag; the seed is the
    grid's.  Its ``__post_init__`` builds the detector once, so a bad value is refused before any cell
    runs, named by its key and flag.  ``qualname``: the module-level name it is bound to, so that a
    configuration pickles (a grid's cells go to worker processes and Ray with it)."""
    cls = DETECTORS[name]
    hints = typing.get_type_hints(cls.__init__)
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.kind is p.KEYWORD_ONLY and p.name != "seed"]

    def check(self):
        try:
            cls(None, **dataclasses.asdict(self))
        except ValueError as exc:
            option, _, expected = str(exc).partition(": ")
            raise OptionError(option, expected) from None

    described = _documented_args(cls)

    def option(p: inspect.Parameter):
        own = "" if p.name not in grid_defaults else f"; the detector's own default: {p.default!r}"
        text = described.get(p.name, f"see {cls.__module__}").rstrip(".")
        return p.name, hints[p.name], field(grid_defaults.get(p.name, p.default), f"{name}: {text}{own}")
    section = dataclasses.make_dataclass(qualname, [option(p) for p in params], namespace={"__post_init__": check})
    section.__module__ = __name__
    return section


SUSPECT_FORMAT = "memdisc-suspect-1"

AssetOptions = _options_section("asset", "AssetOptions", lr=1e-3, vnet_lr=1e-3, epochs=2)
"""ASSET's options in the grid: the notebook's, but for the learning rates and 2 epochs (its 1e-4 were set for
a ResNet-18's 8,192 features; on the cnn's 128 the Vnet barely learns in 100 steps and the offset model
hardly moves: measured on tuning seeds apart from the reported ones, bench/detector_settings.py and
bench/NOTES.md)."""
SpectralOptions = _options_section("spectral", "SpectralOptions")
ClusteringOptions = _options_section("activation-clustering", "ClusteringOptions")


@dataclasses.dataclass
class MDOptions:
    """Memorization discrepancy as a detector: which snapshots of the suspect's training it compares the
    final model with, and how the K per-snapshot discrepancies are reduced."""

    snapshot_epochs: list[int] = field([1, 2, 3], "epochs after which the suspect model is copied as a snapshot "
                                                  "(epochs past the end of training are left out)")
    reduce: str = field("mean", f"reduction over the snapshots: {', '.join(REDUCTIONS)}")

    def __post_init__(self):
        check_list("snapshot_epochs", self.snapshot_epochs, int)
        if not self.snapshot_epochs or len(set(self.snapshot_epochs)) != len(self.snapshot_epochs):
            raise OptionError("snapshot_epochs", f"expected distinct epochs, e.g. [1, 2, 3], got "
                                                 f"{self.snapshot_epochs!r}")
        for epoch in self.snapshot_epochs:
            check_int("snapshot_epochs", epoch)
        check_choice("reduce", self.reduce, REDUCTIONS)


@dataclasses.dataclass
class DetectFit(FitConfig):
    """Training of the suspect model and of the retrained one: :class:`FitConfig` with the grid's shorter
    defaults (a backdoor is learned within a few epochs; the grid trains 6 models per attack and seed)."""

    epochs: int = field(10, "maximum training epochs")
    patience: int | None = field(3, "stop after N epochs without a lower validation loss (none: train every "
                                    "epoch; the best epoch's weights are kept either way)")


@dataclasses.dataclass
class DetectConfig(SeededGrid):
    """The options of ``memdisc detect``: what to run (dataset, model, attacks, settings, detectors, seeds),
    the sizes of each seed's draw, one section per setting (its training options), per attack (its
    options, its ``fraction`` included) and MD's snapshots.  The settings' ``seed`` is set per cell."""

    dataset: str = field("fashion-mnist", "dataset name: fashion-mnist, mnist, cifar10, cifar100, svhn")
    data_dir: str | None = field(None, "directory holding the dataset files", path="data")
    model: str = field("cnn", f"model name: {', '.join(m for m in MODELS if not m.startswith('tv-'))}, or a "
                              "torchvision victim (tv-*, needs torchvision)")
    attacks: list[str] = field(["badnets", "blended"], f"attacks to run, of {', '.join(DETECT_ATTACKS)}")
    settings: list[str] = field(["end-to-end"], f"training settings, of {', '.join(DETECT_SETTINGS)}")
    detectors: list[str] = field(list(DETECT_DETECTORS), f"detectors to run, of {', '.join(DETECT_DETECTORS)}")
    fpr: float = field(0.05, "the false-positive rate at which the TPR is reported")
    seed: int = field(0, "random seed of the first repetition (data, initialisation, attacks, training, detectors)")
    repeats: int = field(3, "repetitions with seeds seed, seed+1, ...: each its own data draw and poisons")
    train_subset: int = field(6000, "training rows drawn from the training split (what the attacks poison and "
                                    "the detectors score)")
    val_size: int = field(1000, "validation rows from the training split, apart from the training rows "
                                "(early stopping)")
    test_subset: int = field(2000, "test rows drawn from the test split (clean error, ASR)")
    base_per_class: int = field(100, "clean base-set rows per class from the training split, apart from the "
                                     "others (the detectors' clean reference; ASSET's 100)")
    device: str = field("auto", "cpu, cuda or auto")
    out: str | None = field(None, "run directory (default: runs/detect-DATASET-MODEL-sSEED)", path="run")
    end_to_end: DetectFit = section(DetectFit, "end-to-end training (suspect, retrained and clean backbone)")
    transfer: DetectFit = section(DetectFit, "transfer training of the head on the frozen clean backbone")
    badnets: BadNetsConfig = section(BadNetsConfig, "BadNets options")
    blended: BlendedConfig = section(BlendedConfig, "Blended options")
    clean_label: CleanLabelConfig = section(CleanLabelConfig, "clean-label (label-consistent) backdoor options")
    noisy_label: NoisyLabelConfig = section(NoisyLabelConfig, "noisy-label control options (the ASSET seed's)")
    flipping_label: FlippingLabelConfig = section(FlippingLabelConfig, "flipping-label control options (the ASSET "
                                                                       "seed's)")
    md: MDOptions = section(MDOptions, "MD as a detector: snapshots and reduction")
    asset: AssetOptions = section(AssetOptions, "ASSET options")
    spectral: SpectralOptions = section(SpectralOptions, "spectral-signature options")
    activation_clustering: ClusteringOptions = section(ClusteringOptions, "activation-clustering options")

    def __post_init__(self):
        """Known dataset and model; attacks, settings and detectors distinct and known; fpr in [0, 1];
        a seed in [0, 2**32); counts >= 1."""
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, sorted(MODELS))
        for name, known in (("attacks", DETECT_ATTACKS), ("settings", DETECT_SETTINGS),
                            ("detectors", DETECT_DETECTORS)):
            values = getattr(self, name)
            check_list(name, values, str)
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise OptionError(name, f"expected a non-empty list of names from {', '.join(known)}, got {values!r}")
            if len(set(values)) != len(values):
                raise OptionError(name, f"expected each name once, got {values!r}")
        check_number("fpr", self.fpr, 0.0, 1.0)
        for setting in self.settings:
            epochs = getattr(self, section_of(setting)).epochs
            if "MD" in self.detectors and max(self.md.snapshot_epochs) >= epochs:
                raise OptionError("md.snapshot_epochs", f"expected epochs before the last of {setting} training "
                                                        f"({epochs}), got {self.md.snapshot_epochs!r}")
        check_seed("seed", self.seed)
        for name in ("repeats", "train_subset", "val_size", "test_subset", "base_per_class"):
            check_int(name, getattr(self, name))
        if self.out is None:
            self.out = f"runs/detect-{self.dataset}-{self.model}-s{self.seed}"

    def attack_options(self, attack: str, fraction: float | None = None):
        """The options of ``attack`` (at ``fraction`` when given)."""
        options = getattr(self, section_of(attack))
        return options if fraction is None else dataclasses.replace(options, fraction=fraction)

    def fraction(self, attack: str) -> float:
        return float(self.attack_options(attack).fraction)


SHARED_FIELDS = frozenset(f"{section_of(s)}.seed" for s in DETECT_SETTINGS)
"""Options the grid sets itself (per cell, from its seed): not flags, refused in a TOML file."""


def load_detect_config(toml_path: Path | None = None, overrides: dict[str, Any] | None = None) -> DetectConfig:
    """Defaults < TOML < flags; an option the grid sets itself (:data:`SHARED_FIELDS`) is refused by name."""
    values = merge(read_toml(toml_path), overrides or {})
    refuse_shared_fields(values, SHARED_FIELDS, "detection grid")
    return build(DetectConfig, values)


# ----------------------------------------------------------------------------- the grid

class DetectGrid(Grid):
    """The grid's cells: per seed, attack x setting x detector, each axis in its order."""


def detect_grid(cfg: DetectConfig) -> DetectGrid:
    """The grid under ``cfg.out``, one directory per cell ``seed-S/cells/ATTACK-SETTING-DETECTOR``; the
    grid's results go to ``OUT/results.json``."""
    axes = {"attack": list(cfg.attacks), "setting": list(cfg.settings), "detector": list(cfg.detectors)}
    return DetectGrid("detect", Path(cfg.out), axes, cfg.seeds(), DetectResult,
                      layout="seed-{seed}/cells/{attack}-{setting}-{detector}")


# ----------------------------------------------------------------------------- per seed

@dataclasses.dataclass
class Suspect:
    """A model trained on a poisoned set: the victim, its snapshots (epochs), clean test error, ASR."""
    model: nn.Module
    snapshots: list[nn.Module]
    snapshot_epochs: list[int]
    clean_error: float
    asr: float | None
    train_seconds: float
    training: dict[str, Any]


class DetectRun(StudyRun):
    """One run of the grid: the study's per-seed data draw, backbone and poison cache, plus each seed's
    base set and the cached suspect models; calling the object runs one cell."""

    blind_attacks = tuple(a for a in DETECT_ATTACKS if a not in MODEL_ATTACKS)

    def __init__(self, cfg: DetectConfig, device: torch.device, progress: bool = True):
        super().__init__(cfg, device, progress)
        self.base: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def load_splits(self) -> None:
        """The study's check, and room for the base set after the training and validation rows."""
        super().load_splits()
        cfg, n_train = self.cfg, len(self._splits["train"])
        need = cfg.train_subset + cfg.val_size + cfg.base_per_class * self._splits["train"].num_classes
        if need > n_train:
            raise ValueError(f"{option_name('base_per_class')}: train_subset + val_size + base_per_class x classes = "
                             f"{need} rows, but the {cfg.dataset} training split has {n_train}")

    def prepare(self, seed: int) -> None:
        """The study's draw, then the base set: the first ``base_per_class`` rows of each class in the rest
        of the permutation of the training split the draw took its rows from; then each attack's row count
        checked against the training rows (a fraction an attack cannot take is refused before any
        training, naming its option)."""
        if seed in self.base:
            return
        super().prepare(seed)
        cfg, train = self.cfg, self._splits["train"]
        rest = self.train_order[seed][cfg.train_subset + cfg.val_size:]
        _, labels = train.batch(rest)
        rows = torch.cat([rest[labels == c][:cfg.base_per_class] for c in range(train.num_classes)])
        if rows.numel() < cfg.base_per_class * train.num_classes:
            raise ValueError(f"{option_name('base_per_class')}: the rest of the {cfg.dataset} training split has "
                             f"fewer than {cfg.base_per_class} rows of some class")
        x, y = train.batch(rows)
        self.base[seed] = (x.to(self.device), y.to(self.device))
        for attack in cfg.attacks:
            try:
                self.attacker(seed, attack).choose(self.data[seed].y_train.cpu(), torch.Generator())
            except ValueError as exc:  # OptionError, or choose's "fraction: ..." (too few eligible rows)
                option, _, expected = str(exc).partition(": ")
                raise ValueError(f"{option_name(section_of(attack) + '.' + option)}: {expected}") from None

    def attacker(self, seed: int, attack: str):
        """The attack object of the cell (for its backdoor at test time)."""
        data = self.data[seed]
        return build_attack(attack, seed, self.cfg.attack_options(attack), num_classes=data.num_classes,
                            x_val=data.x_val, y_val=data.y_val)

    def _measure(self, model: nn.Module, seed: int, attack: str) -> tuple[float, float | None]:
        """(clean test error, ASR or None) of ``model``."""
        data = self.data[seed]
        error = error_rate(model, data.x_test, data.y_test)
        attacker = self.attacker(seed, attack)
        if not isinstance(attacker, BackdoorAttack):
            return error, None
        return error, attack_success_rate(model, attacker, data.x_test, data.y_test)

    def _train(self, setting: str, seed: int, x: torch.Tensor, y: torch.Tensor,
               keep_epochs: list[int] = ()) -> tuple[nn.Module, list[nn.Module], list[int], TrainingLog, float]:
        """The setting's victim trained on ``(x, y)``; copies after the epochs in ``keep_epochs``."""
        data = self.data[seed]
        victim = self._victim(setting, seed)
        snapshots, epochs = [], []

        def keep(epoch: int) -> None:
            if epoch in keep_epochs:
                snapshots.append(frozen_copy(victim))
                epochs.append(epoch)

        train = train_end_to_end if setting == "end-to-end" else train_transfer
        start = time.perf_counter()
        log = train(victim, x, y, data.x_val, data.y_val, self.cfg.training(setting, seed), on_epoch=keep)
        return victim.eval(), snapshots, epochs, log, time.perf_counter() - start

    def _suspect_options(self, seed: int, attack: str, setting: str) -> dict[str, Any]:
        """What a suspect model is a function of, as its file records it (a file of other options is refused)."""
        cfg = self.cfg
        return {"attack": to_dict(cfg.attack_options(attack)), "training": to_dict(cfg.training(setting, seed)),
                "snapshot_epochs": list(cfg.md.snapshot_epochs), "model": cfg.model}

    def suspect(self, seed: int, attack: str, setting: str) -> Suspect:
        """The model trained in ``setting`` on the seed's ``attack`` set: read from its file, else trained,
        measured and saved (by one of the cells that run at once), with its snapshots: the copies after
        the epochs of ``md.snapshot_epochs`` *before* its best epoch (the weights it ends with; a copy at or
        after it is not a historical model of the final one)."""
        path = self.seed_dir(seed) / "suspects" / f"{attack}-{setting}.pt"
        victim, options = self._victim(setting, seed), self._suspect_options(seed, attack, setting)
        with made_once(path):  # cells running at once: one trains it, the others wait and read it
            if path.exists():
                saved = load_torch_file(path, "delete it to train the suspect model again")
                if not isinstance(saved, dict) or saved.get("format") != SUSPECT_FORMAT \
                        or saved.get("options") != options:
                    raise ValueError(f"{path}: not the {attack} suspect model of this grid's options; delete it to "
                                     "train it again")
                trained_module(victim).load_state_dict(saved["state"])
                snapshots = []
                for state in saved["snapshots"]:
                    snapshot = self._victim(setting, seed)
                    trained_module(snapshot).load_state_dict(state)
                    snapshots.append(frozen_copy(snapshot))
                return Suspect(victim.eval(), snapshots, saved["snapshot_epochs"], saved["clean_error"], saved["asr"],
                               saved["train_seconds"], saved["training"])
            data = self.data[seed]
            x, y = self.poisoned_set(seed, attack, self.cfg.fraction(attack)).apply(data.x_train, data.y_train)
            self._say(f"    seed {seed}: training the suspect model ({attack}, {setting})")
            model, snapshots, epochs, log, seconds = self._train(setting, seed, x, y, self.cfg.md.snapshot_epochs)
            kept = [(s, e) for s, e in zip(snapshots, epochs) if e < log.best_epoch]
            snapshots, epochs = [s for s, _ in kept], [e for _, e in kept]
            error, asr = self._measure(model, seed, attack)
            atomic_torch_save({"format": SUSPECT_FORMAT, "options": options,
                               "state": trained_module(model).state_dict(),
                               "snapshots": [trained_module(s).state_dict() for s in snapshots],
                               "snapshot_epochs": epochs, "clean_error": error, "asr": asr, "train_seconds": seconds,
                               "training": dataclasses.asdict(log), "provenance": provenance(seed, self.device)}, path)
            return Suspect(model, snapshots, epochs, error, asr, seconds, dataclasses.asdict(log))

    def detector(self, name: str, seed: int, suspect: Suspect):
        """``DETECTORS[name]`` with its options: MD gets the suspect's snapshots, a seeded detector the seed."""
        cls = DETECTORS[name]
        section = getattr(self.cfg, section_of(name), None)
        options: dict[str, Any] = {} if name == "MD" or section is None else dataclasses.asdict(section)
        snapshots = None
        if name == "MD":
            if not suspect.snapshots:
                raise ValueError(f"{option_name('md.snapshot_epochs')}: none of {self.cfg.md.snapshot_epochs} comes "
                                 f"before the suspect's best epoch ({suspect.training['best_epoch']}), the weights "
                                 "it ends with; give earlier epochs")
            snapshots, options["reduce"] = SnapshotSet(suspect.snapshots), self.cfg.md.reduce
        if "seed" in inspect.signature(cls).parameters:
            options["seed"] = seed
        return cls(snapshots, **options), options

    def __call__(self, cell: Cell, directory: Path) -> DetectResult:
        """One cell (module docstring)."""
        attack, setting, name, seed = cell.axes["attack"], cell.axes["setting"], cell.axes["detector"], cell.seed
        cfg, data = self.cfg, self.data[seed]
        suspect = self.suspect(seed, attack, setting)
        poisons = self.poisoned_set(seed, attack, cfg.fraction(attack))
        x, y = poisons.apply(data.x_train, data.y_train)
        poisoned = torch.zeros(x.shape[0], dtype=torch.bool)
        poisoned[poisons.rows] = True
        detector, options = self.detector(name, seed, suspect)
        start = time.perf_counter()
        detector.fit(suspect.model, *self.base[seed])
        scores = detector.score(suspect.model, x, y)
        flags = detector.flag(scores, y).cpu()
        detect_seconds = time.perf_counter() - start
        scores = scores.detach().cpu().double()
        detection = detection_summary(scores, poisoned, fpr=cfg.fpr)
        detection.update(flagged=int(flags.sum()), tpr=float((flags & poisoned).sum() / poisoned.sum()),
                         fpr=float((flags & ~poisoned).sum() / (~poisoned).sum()))
        keep = (~flags).to(x.device)
        after: dict[str, Any] = {"clean_error": None, "asr": None, "removed": int(flags.sum()), "train_seconds": 0.0,
                                 "training": None}
        if keep.any():
            model, _, _, log, seconds = self._train(setting, seed, x[keep], y[keep])
            error, asr = self._measure(model, seed, attack)
            after.update(clean_error=error, asr=asr, train_seconds=seconds, training=dataclasses.asdict(log))
        file = atomic_torch_save({"scores": scores, "poisoned": poisoned, "flags": flags}, directory / "scores.pt")
        retrained = ("every row flagged: nothing to retrain on" if after["clean_error"] is None else
                     f"retrained: clean error {100 * after['clean_error']:.2f}%"
                     + ("" if after["asr"] is None else f", ASR {100 * after['asr']:.1f}%"))
        self._say(f"    {name}: AUROC {detection['auroc']:.3f}, flagged {detection['flagged']} (TPR "
                  f"{100 * detection['tpr']:.1f}%, FPR {100 * detection['fpr']:.1f}%) in {detect_seconds:.1f} s; "
                  + retrained)
        return DetectResult(
            attack=attack, setting=setting, detector=name, poisoned=int(poisoned.sum()),
            config={"dataset": cfg.dataset, "model": cfg.model, "train_subset": cfg.train_subset,
                    "val_size": cfg.val_size, "test_subset": cfg.test_subset, "base_per_class": cfg.base_per_class,
                    "training": to_dict(cfg.training(setting, seed)), "attack": to_dict(cfg.attack_options(attack)),
                    "detector": {k: v for k, v in options.items() if k != "seed"},
                    "snapshot_epochs": suspect.snapshot_epochs if name == "MD" else None},
            detection=detection, detect_seconds=detect_seconds,
            before={"clean_error": suspect.clean_error, "asr": suspect.asr, "train_seconds": suspect.train_seconds,
                    "training": suspect.training},
            after=after,
            scores=file.name, provenance=provenance(seed, self.device))


# ----------------------------------------------------------------------------- the run

_RERUNNABLE = frozenset({"attacks", "settings", "detectors", "repeats", "device"})
"""Options a run directory may be run again with: which cells, how many seeds, where."""


def run_detect(cfg: DetectConfig, progress: bool = True, executor: ExecutorConfig = LOCAL) -> GridResults:
    """Run (or resume) the grid ``cfg`` (module docstring) with the cells where ``executor`` puts them
    (:mod:`memdisc.experiments.executors`); returns every cell's result.

    Checked before any work or write: the device, the run directory (at the executor's thread count),
    the data files, the sizes and the attacks' options against the first seed's rows.
    Then ``OUT/config.json``, the grid (``OUT/results.json``) and the report.  A failed cell raises
    :class:`memdisc.experiments.runner.GridError` once every other cell is done and the report of the
    finished cells is written.
    """
    device = resolve_device(cfg.device)
    grid = detect_grid(cfg)
    with executor.start(device) as cells:
        check_run_dir(cfg, _RERUNNABLE, "detection grid")
        check_dataset_files(cfg.dataset, cfg.data_dir)
        run = DetectRun(cfg, device, progress)
        run.load_splits()
        run.prepare(cfg.seed)  # the attacks' options checked against the data before anything is written
        remove_stale_temp_files(cfg.out, *(run.seed_dir(s) / sub for s in grid.seeds
                                           for sub in ("", "poisons", "suspects")),
                                *(grid.directory(c) for c in grid.cells()))
        return run_and_report("detect", cfg, grid, run, device,
                              lambda results: write_detect_report(results, cfg.out, grid.directory), progress,
                              cells, executor.retry_limit)
