"""``memdisc study``: how a network degrades under availability poisoning, over attacks x training
settings x poison fractions x seeds (issue 13; the seed is changhongyan123/poisoning, its optimal
attacks Yang et al., arXiv 1703.01340).

It is a grid (``memdisc.experiments``): the axes ``attack``, ``setting`` and ``fraction`` times the
seeds ``seed .. seed + repeats - 1`` (:class:`StudyGrid`).  Every seed has, per setting, one clean
baseline (attack ``none`` at fraction 0, so each curve starts at the clean accuracy), then every
attack x setting x fraction.  One cell is one victim trained on one poisoned training set and
measured (:class:`StudyResult`).

Per seed (the grid's prerequisite, :meth:`StudyRun.prepare`): the data are drawn, seeded, from the
dataset's files: ``train_subset`` training rows and ``val_size`` validation rows (disjoint, from the
training split) and ``test_subset`` test rows.  The **clean backbone** is one model trained end to
end (the ``end_to_end`` options) on the clean training rows, once per seed (``seed-S/backbone.pt``);
it is the transfer setting's frozen feature extractor and the attacker's model.

What each attacker reads (:class:`memdisc.attacks.AttackData` holds the number of classes and the
clean validation rows; ``poison`` gets the clean training rows and a model): ``label-flip`` and
``noise`` the training rows only (no model, :data:`BLIND_ATTACKS`); ``loss`` a copy of the clean
backbone, which it trains ``loss.fit_epochs`` more epochs (best epoch on the validation rows) and
ranks the training rows by; ``gradient`` and ``generative`` a copy of the clean backbone and the
validation rows, whose loss their poisons raise (white box: the victim's architecture trained on
the clean set; the seed's ``loss`` fitted a fresh network for 5 epochs instead).  Every attack
*replaces* ``round(fraction * train_subset)`` training rows, drawn without replacement with the
seed (``memdisc.attacks.offline``); the poisoned set of each (attack, fraction, seed) is crafted
once, by the first cell that needs it, and cached (``seed-S/poisons/ATTACK-fFRACTION.pt``, with the
crafting time), so the three settings train on the same poisons.

The settings (:data:`SETTINGS`), each a victim trained on the poisoned set:

* ``end-to-end``: a fresh model (initialised from the seed, as the backbone) trained on every
  parameter with early stopping on the validation loss (``memdisc.training.fit.train_end_to_end``);
* ``transfer``: the clean backbone frozen, its head (a copy of the backbone's) retrained on the
  poisoned set (``train_transfer``);
* ``online``: the fresh model trained on the poisoned set as a stream: one pass of small
  minibatches, plain SGD, no early stopping (``train_streaming``; the ``online`` options,
  :class:`StreamConfig`).

Measured per cell: accuracy and mean cross-entropy on the training set as trained on (poisoned)
and on the test rows, per-class test accuracy, the linear-probe accuracy of the penultimate
features (a logistic regression fitted on the poisoned training set's features and labels, scored
on the test rows), the crafting and training seconds; and, on the first seed's end-to-end cells,
the saliency maps of fixed test samples (the first test row of each of the first
:data:`SALIENCY_SAMPLES` classes).

Run directory::

    OUT/config.json                          the configuration and provenance
    OUT/seed-S/backbone.pt                   the clean backbone (a memdisc model file)
    OUT/seed-S/poisons/ATTACK-fF.pt          a poisoned training set: rows, x, y, crafting seconds
    OUT/seed-S/cells/ATTACK-SETTING-fF/      one cell: result.json (its StudyResult), saliency.pt
    OUT/results.json                         every cell (memdisc.experiments.GridResults)
    OUT/results.md, accuracy_vs_fraction.png, samples.png, saliency.png   (study_report.py)

Interrupt it and run the same command again: finished cells are read back, never rerun; the
backbone and the crafted poisons are read from their files.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from memdisc.artifacts import (atomic_torch_save, load_model_file, load_torch_file, model_from_file, provenance,
                               read_json, remove_stale_temp_files, save_model_file, write_json)
from memdisc.attacks import build_attack
from memdisc.attacks.generative import GenerativeConfig
from memdisc.attacks.gradient import GradientConfig
from memdisc.attacks.label_flip import LabelFlipConfig
from memdisc.attacks.loss_based import LossConfig
from memdisc.attacks.noise import NoiseConfig
from memdisc.config import (OptionError, build, check_choice, check_int, check_list, check_number, check_seed,
                            comparable, field, merge, option_name, read_toml, section, to_dict)
from memdisc.data import DATASETS, check_dataset_files, load_dataset
from memdisc.eval.classification import loss_and_accuracy, per_class_accuracy
from memdisc.eval.probe import linear_probe_accuracy, penultimate_features
from memdisc.eval.saliency import saliency_maps
from memdisc.experiments.grid import Cell, Grid
from memdisc.experiments.results import GridResults
from memdisc.experiments.executors import LOCAL, ExecutorConfig, made_once
from memdisc.experiments.runner import Executor, GridError, run_grid
from memdisc.experiments.study_report import SaliencyFigure, SampleRow, write_study_report
from memdisc.experiments.study_result import StudyResult
from memdisc.models import MODELS, build_model
from memdisc.runtime.device import resolve_device
from memdisc.training.fit import (FitConfig, TrainingLog, train_end_to_end, train_streaming,
                                      train_transfer)
from memdisc.training.victim import TransferVictim

__all__ = ["SETTINGS", "SEED_ATTACKS", "NO_ATTACK", "StreamConfig", "StudyConfig", "SHARED_FIELDS",
           "load_study_config", "StudyResult", "StudyGrid", "study_grid", "SeedData", "PoisonedSet", "StudyRun",
           "run_study"]

SETTINGS = ("end-to-end", "transfer", "online")
"""The training settings of the seed, in its order (``normal``, ``transfer``, ``online``)."""

SEED_ATTACKS = ("label-flip", "noise", "loss", "gradient", "generative")
"""The attacks of the seed (its ``min_max`` and ``influence`` were never defined), each a section of
:class:`StudyConfig` named as the attack with ``_`` for ``-``."""

NO_ATTACK = "none"
"""The attack of the clean baselines (fraction 0)."""

BLIND_ATTACKS = ("label-flip", "noise")
"""The attacks that read no model (the others get a copy of the clean backbone)."""

SALIENCY_SAMPLES = 10
"""Saliency maps are drawn for the first test row of each of the first this many classes."""

POISONS_FORMAT = "memdisc-poisons-1"


def section_of(name: str) -> str:
    """The :class:`StudyConfig` section of a setting's or an attack's options: ``label-flip`` -> ``label_flip``."""
    return name.replace("-", "_")


@dataclasses.dataclass
class StreamConfig(FitConfig):
    """The online setting's options: :class:`~memdisc.training.fit.FitConfig` with a stream's defaults.

    One pass (a stream does not come back to a sample) in minibatches of 10 with plain SGD.  The seed
    fits with batch size 1 (per-example SGD) for up to 100 epochs; for these small networks a step
    costs nearly as much at batch 1 as at 10 (Python and kernel-launch overhead), so batches of 10
    make a pass several times cheaper while staying a noisy small-batch stream (about 13x the
    updates of end-to-end's batches of 128).
    """

    epochs: int = field(1, "passes over the stream (a stream: 1; the seed: up to 100 at batch size 1)")
    batch_size: int = field(10, "minibatch size of the stream (the seed: 1, per-example SGD)")
    momentum: float = field(0.0, "SGD momentum (0: plain SGD)")
    weight_decay: float = field(0.0, "SGD weight decay")
    patience: int | None = field(None, "none: a stream has no early stopping (it never comes back to a sample)")

    def __post_init__(self):
        """FitConfig's checks, and no patience."""
        super().__post_init__()
        if self.patience is not None:
            raise OptionError("patience", f"a stream has no early stopping (it never comes back to a sample); "
                                          f"expected none, got {self.patience}")


class SeededGrid:
    """What the configurations of the grids over seeds share: fields ``seed`` and ``repeats``, and one
    training section per setting (named by :func:`section_of`)."""

    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.repeats))

    def training(self, setting: str, seed: int) -> FitConfig:
        """The training options of ``setting`` with ``seed``."""
        return dataclasses.replace(getattr(self, section_of(setting)), seed=seed)


def refuse_shared_fields(values: dict[str, Any], shared: frozenset[str], what: str) -> None:
    """Refuse, naming it, a ``section.option`` of ``shared`` given in ``values`` (a TOML file's or the
    flags' nested options): the grid ``what`` sets it itself for each cell."""
    for key in sorted(shared):
        where, name = key.split(".")
        if isinstance(values.get(where), dict) and name in values[where]:
            source = "seed and repeats" if name == "seed" else "fractions"
            raise ValueError(f"{key}: set by the {what} for each cell from its {source}; remove it")


@dataclasses.dataclass
class StudyConfig(SeededGrid):
    """The options of ``memdisc study``: what to run (dataset, model, attacks, settings, fractions, seeds),
    the sizes of each seed's draw, and one section per setting (its training options) and per attack
    (its options; ``fraction`` is the grid's).  The sections' ``seed`` and the attacks' ``fraction``
    are set per cell (:data:`SHARED_FIELDS`)."""

    dataset: str = field("fashion-mnist", "dataset name: fashion-mnist, mnist, cifar10, cifar100, svhn")
    data_dir: str | None = field(None, "directory holding the dataset files", path="data")
    model: str = field("seed-mlp", f"model name: {', '.join(m for m in MODELS if not m.startswith('tv-'))}, or a "
                                   "torchvision victim (tv-*, needs torchvision); the seed's default: its MLP")
    attacks: list[str] = field(list(SEED_ATTACKS), f"attacks to run, of {', '.join(SEED_ATTACKS)}")
    settings: list[str] = field(list(SETTINGS), f"training settings, of {', '.join(SETTINGS)}")
    fractions: list[float] = field([0.1, 0.3, 0.5], "poison fractions of the training set, each in (0, 1] (the "
                                                    "clean baseline, fraction 0, always runs)")
    seed: int = field(0, "random seed of the first repetition (data, initialisation, attacks, training)")
    repeats: int = field(3, "repetitions with seeds seed, seed+1, ...: each its own data draw, backbone and poisons")
    train_subset: int = field(8000, "training rows drawn from the training split (what the attacks poison)")
    val_size: int = field(2000, "validation rows drawn from the training split, apart from the training rows "
                                "(early stopping, the attacker's objective)")
    test_subset: int = field(5000, "test rows drawn from the test split")
    device: str = field("auto", "cpu, cuda or auto")
    out: str | None = field(None, "run directory (default: runs/study-DATASET-MODEL-sSEED)", path="run")
    end_to_end: FitConfig = section(FitConfig, "end-to-end training (also of the clean backbone)")
    transfer: FitConfig = section(FitConfig, "transfer training of the head on the frozen backbone")
    online: StreamConfig = section(StreamConfig, "the online setting: the poisoned set as a stream")
    label_flip: LabelFlipConfig = section(LabelFlipConfig, "label-flip attack options")
    noise: NoiseConfig = section(NoiseConfig, "random-noise attack options")
    loss: LossConfig = section(LossConfig, "loss-based attack options")
    gradient: GradientConfig = section(GradientConfig, "direct gradient attack options")
    generative: GenerativeConfig = section(GenerativeConfig, "generative attack options")

    def __post_init__(self):
        """Known dataset and model; attacks, settings and fractions distinct and known (fractions in
        (0, 1]); a seed in [0, 2**32); counts >= 1."""
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, sorted(MODELS))
        for name, known in (("attacks", SEED_ATTACKS), ("settings", SETTINGS)):
            values = getattr(self, name)
            check_list(name, values, str)
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise OptionError(name, f"expected a non-empty list of names from {', '.join(known)}, got {values!r}")
            if len(set(values)) != len(values):
                raise OptionError(name, f"expected each name once, got {values!r}")
        if not isinstance(self.fractions, list) or not self.fractions:
            raise OptionError("fractions", f"expected a non-empty list of numbers, e.g. [0.1, 0.3], got "
                                           f"{self.fractions!r}")
        for value in self.fractions:
            check_number("fractions", value, 0.0, 1.0)
            if value == 0:
                raise OptionError("fractions", "expected fractions > 0 (the clean baseline, fraction 0, always "
                                               f"runs), got {self.fractions!r}")
        if len(set(self.fractions)) != len(self.fractions):
            raise OptionError("fractions", f"expected each fraction once, got {self.fractions!r}")
        for attack in self.attacks:  # an attack's own limits (e.g. loss: f <= 0.5), before any cell runs
            for value in self.fractions:
                try:
                    self.attack_options(attack, value)
                except OptionError as exc:
                    raise OptionError("fractions", f"{value} does not work for {attack}: {exc.option}: "
                                                   f"{exc.expected}") from None
        check_seed("seed", self.seed)
        for name in ("repeats", "train_subset", "val_size", "test_subset"):
            check_int(name, getattr(self, name))
        if self.out is None:
            self.out = f"runs/study-{self.dataset}-{self.model}-s{self.seed}"

    def attack_options(self, attack: str, fraction: float):
        """The options of ``attack`` at ``fraction``."""
        return dataclasses.replace(getattr(self, section_of(attack)), fraction=fraction)


# Options of the sections that the study sets itself (per cell): not flags, refused in a TOML file.
SHARED_FIELDS = frozenset({f"{section_of(s)}.seed" for s in SETTINGS}
                          | {f"{section_of(a)}.fraction" for a in SEED_ATTACKS})


def load_study_config(toml_path: Path | None = None, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Defaults < TOML < flags; an option the study sets itself (:data:`SHARED_FIELDS`) is refused by name."""
    values = merge(read_toml(toml_path), overrides or {})
    refuse_shared_fields(values, SHARED_FIELDS, "study")
    # memdisc.config reads lists of ints and strings; a list of numbers is checked here and given to the
    # dataclass, whose own check names the option as memdisc.config.build does.
    fractions = values.pop("fractions", None)
    cfg = build(StudyConfig, values)
    if fractions is None:
        return cfg
    try:
        return dataclasses.replace(cfg, fractions=[float(v) if type(v) is int else v for v in fractions]
                                   if isinstance(fractions, list) else fractions)
    except OptionError as exc:
        raise ValueError(f"{option_name(exc.option)}: {exc.expected}") from None


# ----------------------------------------------------------------------------- the grid

class StudyGrid(Grid):
    """The study's cells: per seed, the clean baseline of every setting (attack ``none``, fraction 0),
    then attack x setting x fraction (> 0), each axis in its order.  The product of the axes without
    the pairs that do not exist: no attack at a fraction > 0, an attack at fraction 0."""

    def cells(self) -> list[Cell]:
        names = ("attack", "setting", "fraction")
        attacks, settings, fractions = (self.axes[n] for n in names)
        return [Cell(seed, dict(zip(names, (a, s, f)))) for seed in self.seeds
                for a in attacks for s in settings for f in fractions if (a == NO_ATTACK) == (f == 0)]


def study_grid(cfg: StudyConfig) -> StudyGrid:
    """The study as a grid under ``cfg.out``, one directory per cell ``seed-S/cells/ATTACK-SETTING-fF``;
    the grid's results go to ``OUT/results.json``."""
    axes = {"attack": [NO_ATTACK, *cfg.attacks], "setting": list(cfg.settings),
            "fraction": [0.0, *(float(f) for f in cfg.fractions)]}
    return StudyGrid("study", Path(cfg.out), axes, cfg.seeds(), StudyResult,
                     layout="seed-{seed}/cells/{attack}-{setting}-f{fraction}")


# ----------------------------------------------------------------------------- per seed

@dataclasses.dataclass
class SeedData:
    """One seed's rows on the study's device: float pixels in [0, 1] ``[N, C, H, W]``, int64 labels ``[N]``."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def model_spec(self) -> dict[str, int]:
        c, h, _ = self.x_train.shape[1:]
        return {"in_channels": c, "num_classes": self.num_classes, "image_size": h}

    def saliency_rows(self) -> torch.Tensor:
        """``[k]`` int64: the first test row of each of the first :data:`SALIENCY_SAMPLES` classes present."""
        rows = [int((self.y_test == c).nonzero()[0]) for c in range(self.num_classes) if (self.y_test == c).any()]
        return torch.tensor(rows[:SALIENCY_SAMPLES], dtype=torch.long)


@dataclasses.dataclass(frozen=True)
class PoisonedSet:
    """What an attack replaced in a seed's training set: ``rows`` ``[n]`` int64, their new ``x`` ``[n, ...]``
    and labels ``y`` ``[n]`` (on the CPU, as cached), and the seconds the crafting took."""
    rows: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    craft_seconds: float

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training set ``x [N, ...]``, ``y [N]`` with the rows replaced (new tensors)."""
        rows = self.rows.to(x.device)
        return x.index_put((rows,), self.x.to(x.device)), y.index_put((rows,), self.y.to(y.device))


def _fresh_model(cfg: StudyConfig, data: SeedData, seed: int, device: torch.device) -> nn.Module:
    """``cfg.model`` initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return build_model(cfg.model, **data.model_spec).to(device)


class StudyRun:
    """One run of a study: the options, the device, and each prepared seed's data and backbone.

    ``prepare(seed)`` is the grid's prerequisite (the seed's data); calling the object runs one cell
    (the grid's cell function).  The backbone and the poisoned sets are read from the seed's files,
    made by the first cell that needs them.
    """

    blind_attacks = BLIND_ATTACKS
    """The attacks that read no model (the others get a copy of the seed's clean backbone)."""

    def __init__(self, cfg: StudyConfig, device: torch.device, progress: bool = True):
        self.cfg, self.device, self.progress = cfg, device, progress
        self.data: dict[int, SeedData] = {}
        self.train_order: dict[int, torch.Tensor] = {}
        """Per prepared seed, the permutation of the training split it drew: its first train_subset rows are
        the training rows, the next val_size the validation rows."""
        self._backbones: dict[int, nn.Module] = {}
        self._splits: dict[str, Any] = {}

    def _say(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    def seed_dir(self, seed: int) -> Path:
        return Path(self.cfg.out) / f"seed-{seed}"

    def poison_path(self, seed: int, attack: str, fraction: float) -> Path:
        """The file of the seed's poisoned set of ``attack`` at ``fraction``."""
        return self.seed_dir(seed) / "poisons" / f"{attack}-f{fraction!r}.pt"

    def load_splits(self) -> None:
        """Read the dataset's two splits and check the sizes fit them (a ValueError naming the option)."""
        cfg = self.cfg
        self._splits = {split: load_dataset(cfg.dataset, split, cfg.data_dir) for split in ("train", "test")}
        n_train, n_test = len(self._splits["train"]), len(self._splits["test"])
        if cfg.train_subset + cfg.val_size > n_train:
            raise ValueError(f"{option_name('train_subset')}: train_subset + val_size = "
                             f"{cfg.train_subset + cfg.val_size} rows, but the {cfg.dataset} training split has "
                             f"{n_train}")
        if cfg.test_subset > n_test:
            raise ValueError(f"{option_name('test_subset')}: {cfg.test_subset} rows, but the {cfg.dataset} test "
                             f"split has {n_test}")

    def prepare(self, seed: int) -> None:
        """The seed's rows: a seeded permutation of each split, training rows then validation rows."""
        if seed in self.data:
            return
        if not self._splits:
            self.load_splits()
        cfg, gen = self.cfg, torch.Generator().manual_seed(seed)
        train, test = self._splits["train"], self._splits["test"]
        order = torch.randperm(len(train), generator=gen)
        self.train_order[seed] = order
        x, y = train.batch(order[:cfg.train_subset + cfg.val_size])
        x_test, y_test = test.batch(torch.randperm(len(test), generator=gen)[:cfg.test_subset])
        n, d = cfg.train_subset, self.device
        self.data[seed] = SeedData(x[:n].to(d), y[:n].to(d), x[n:].to(d), y[n:].to(d), x_test.to(d), y_test.to(d),
                                   train.num_classes)

    def backbone(self, seed: int) -> nn.Module:
        """The seed's clean backbone: read from ``seed-S/backbone.pt``, else trained end to end and saved
        (by one of the cells that run at once: :func:`~memdisc.experiments.executors.made_once`)."""
        if seed in self._backbones:
            return self._backbones[seed]
        path, data = self.seed_dir(seed) / "backbone.pt", self.data[seed]
        with made_once(path):  # cells running at once: one trains it, the others wait and read it
            if path.exists():
                model = model_from_file(load_model_file(path, "delete it to train the backbone again"), self.device)
            else:
                self._say(f"    seed {seed}: training the clean backbone ({self.cfg.model}, {len(data.y_train)} rows)")
                model = _fresh_model(self.cfg, data, seed, self.device)
                log = train_end_to_end(model, data.x_train, data.y_train, data.x_val, data.y_val,
                                       self.cfg.training("end-to-end", seed), progress=self.progress)
                _, accuracy = loss_and_accuracy(model, data.x_test, data.y_test)
                save_model_file(path, model=model, model_spec={"name": self.cfg.model, **data.model_spec},
                                epoch=log.best_epoch, test_error=1.0 - accuracy, config=to_dict(self.cfg), seed=seed,
                                extra={"training": dataclasses.asdict(log)})
        self._backbones[seed] = model.eval()
        return model

    def poisoned_set(self, seed: int, attack: str, fraction: float) -> PoisonedSet:
        """The rows ``attack`` replaces at ``fraction`` in the seed's training set: read from the seed's
        poison file, else crafted (timed) and saved (by one of the cells that run at once)."""
        if attack == NO_ATTACK:
            empty = torch.zeros(0, dtype=torch.long)
            return PoisonedSet(empty, self.data[seed].x_train[:0].cpu(), empty, 0.0)
        path = self.poison_path(seed, attack, fraction)
        options = to_dict(self.cfg.attack_options(attack, fraction))
        with made_once(path):  # cells running at once: one crafts them, the others wait and read them
            if path.exists():
                saved = load_torch_file(path, "delete it to craft these poisons again")
                if not isinstance(saved, dict) or saved.get("format") != POISONS_FORMAT \
                        or saved.get("attack") != attack or saved.get("options") != options:
                    raise ValueError(f"{path}: not the {attack} poisons of this study (fraction {fraction}); delete "
                                     "it to craft them again")
                return PoisonedSet(saved["rows"], saved["x"], saved["y"], saved["craft_seconds"])
            data = self.data[seed]
            model = None if attack in self.blind_attacks else copy.deepcopy(self.backbone(seed))
            start = time.perf_counter()
            attacker = build_attack(attack, seed, self.cfg.attack_options(attack, fraction),
                                    num_classes=data.num_classes, x_val=data.x_val, y_val=data.y_val)
            if model is not None:
                attacker.prepare(model)
            batch = attacker.poison(model, data.x_train, data.y_train, 0)
            seconds = time.perf_counter() - start
            rows = batch.poisoned.nonzero().flatten()
            poisons = PoisonedSet(rows.cpu(), batch.x[rows].cpu(), batch.y[rows].cpu(), seconds)
            atomic_torch_save({"format": POISONS_FORMAT, "attack": attack, "options": options, "seed": seed,
                               "rows": poisons.rows, "x": poisons.x, "y": poisons.y, "craft_seconds": seconds,
                               "provenance": provenance(seed, self.device)}, path)
            self._say(f"    crafted {len(rows)} {attack} poisons in {seconds:.1f} s ({path})")
            return poisons

    def _victim(self, setting: str, seed: int) -> nn.Module:
        if setting == "transfer":
            return TransferVictim(copy.deepcopy(self.backbone(seed)))
        return _fresh_model(self.cfg, self.data[seed], seed, self.device)

    def __call__(self, cell: Cell, directory: Path) -> StudyResult:
        """One cell: the setting's victim trained on the cell's poisoned set, measured."""
        attack, setting, fraction, seed = cell.axes["attack"], cell.axes["setting"], cell.axes["fraction"], cell.seed
        data, cfg = self.data[seed], self.cfg
        poisons = self.poisoned_set(seed, attack, fraction)
        x, y = poisons.apply(data.x_train, data.y_train)
        victim, options = self._victim(setting, seed), cfg.training(setting, seed)
        train = {"end-to-end": train_end_to_end, "transfer": train_transfer, "online": train_streaming}[setting]
        start = time.perf_counter()
        log: TrainingLog = train(victim, x, y, data.x_val, data.y_val, options)
        train_seconds = time.perf_counter() - start
        train_loss, train_accuracy = loss_and_accuracy(victim, x, y)
        test_loss, test_accuracy = loss_and_accuracy(victim, data.x_test, data.y_test)
        per_class = per_class_accuracy(victim, data.x_test, data.y_test, data.num_classes)
        # the probe reads the representation: fitted on the clean training rows, as the seed's model_evaluation.py
        probe = linear_probe_accuracy(penultimate_features(victim, data.x_train), data.y_train.cpu(),
                                      penultimate_features(victim, data.x_test), data.y_test.cpu(), seed=seed)
        saliency = None
        if setting == "end-to-end" and seed == cfg.seed:
            rows = data.saliency_rows()
            maps = saliency_maps(victim, data.x_test[rows.to(self.device)], data.y_test[rows.to(self.device)])
            saliency = atomic_torch_save({"rows": rows, "maps": maps.detach().cpu()}, directory / "saliency.pt").name
        self._say(f"    test accuracy {100 * test_accuracy:.2f}% (train {100 * train_accuracy:.2f}% on the set as "
                  f"trained on), probe {100 * probe:.2f}%; craft {poisons.craft_seconds:.1f} s, "
                  f"train {train_seconds:.1f} s")
        attack_options = None if attack == NO_ATTACK else to_dict(cfg.attack_options(attack, fraction))
        return StudyResult(
            attack=attack, setting=setting, fraction=fraction, poisoned=len(poisons.rows),
            config={"dataset": cfg.dataset, "model": cfg.model, "train_subset": cfg.train_subset,
                    "val_size": cfg.val_size, "test_subset": cfg.test_subset, "training": to_dict(options),
                    "attack": attack_options},
            train_loss=train_loss, train_accuracy=train_accuracy, test_loss=test_loss, test_accuracy=test_accuracy,
            per_class_accuracy=[None if math.isnan(a) else a for a in per_class], probe_accuracy=probe,
            craft_seconds=poisons.craft_seconds, train_seconds=train_seconds, training=dataclasses.asdict(log),
            saliency=saliency, provenance=provenance(seed, self.device))


# ----------------------------------------------------------------------------- the run

# Options a study directory may be run again with: which cells, how many seeds, where.
_RERUNNABLE = frozenset({"attacks", "settings", "fractions", "repeats", "device"})


def check_run_dir(cfg: Any, rerunnable: frozenset[str], what: str) -> None:
    """Refuse a run directory ``cfg.out`` whose config.json holds a ``what`` (a study, a detection grid)
    with other options (but those of ``rerunnable``), or that ran with another thread count: its cells,
    models and poisons would not be this run's."""
    path = Path(cfg.out) / "config.json"
    if not path.exists():
        return
    saved = read_json(path, f"delete it (or the directory) to start a {what} there", objects=("config",))
    if saved.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        raise ValueError(f"{path}: its cells ran with {saved['threads']} threads, this process has "
                         f"{torch.get_num_threads()}; CPU results depend on the thread count in the last bits "
                         f"(and early stopping can pick another epoch): resume with OMP_NUM_THREADS="
                         f"{saved['threads']}, or use another --out")
    saved, current = comparable(type(cfg), saved["config"]), comparable(type(cfg), to_dict(cfg))
    diff = sorted(k for k, v in current.items() if k not in rerunnable and saved.get(k) != v)
    if diff:
        raise ValueError(f"{path}: a {what} with another configuration (differs in {', '.join(diff)}); use "
                         "another --out or delete the directory")


SAMPLES = 6
"""Training rows per attack in the sample grid."""


def _pictures(run: StudyRun, grid: StudyGrid) -> tuple[list[SampleRow], SaliencyFigure | None]:
    """What the two pictures show, from the first seed's files: per attack, the first :data:`SAMPLES` rows
    it replaced at the largest fraction, clean and poisoned; the saliency maps of its end-to-end cells
    (the clean baseline and each attack at the largest fraction).  A poison file or cell that is not
    there (a failed cell) leaves its row out."""
    cfg, seed = run.cfg, run.cfg.seed
    data, fraction = run.data[seed], float(max(cfg.fractions))
    samples = []
    for attack in cfg.attacks:
        if run.poison_path(seed, attack, fraction).exists():
            poisons = run.poisoned_set(seed, attack, fraction)
            rows = poisons.rows[:SAMPLES].to(run.device)
            samples.append(SampleRow(attack, fraction, clean=data.x_train[rows].cpu(), poisoned=poisons.x[:SAMPLES],
                                     clean_labels=data.y_train[rows].cpu(), poisoned_labels=poisons.y[:SAMPLES]))
    if "end-to-end" not in cfg.settings:
        return samples, None
    rows = data.saliency_rows().to(run.device)
    maps = {}
    for attack, f in ((NO_ATTACK, 0.0), *((a, fraction) for a in cfg.attacks)):
        path = grid.directory(Cell(seed, {"attack": attack, "setting": "end-to-end", "fraction": f})) / "saliency.pt"
        if path.exists():
            maps["clean" if attack == NO_ATTACK else f"{attack}\nf={f:g}"] = load_torch_file(
                path, "delete its cell directory to run the cell again")["maps"]
    return samples, SaliencyFigure(seed, data.x_test[rows].cpu(), data.y_test[rows].cpu(), maps)


def run_study(cfg: StudyConfig, progress: bool = True, executor: ExecutorConfig = LOCAL) -> GridResults:
    """Run (or resume) the study ``cfg`` (module docstring) with the cells where ``executor`` puts them
    (:mod:`memdisc.experiments.executors`); returns every cell's result.

    Checked before any work or write: the device, the run directory (:func:`check_run_dir`, at the
    executor's thread count), the data files and the sizes.  Then ``OUT/config.json``, the grid
    (``OUT/results.json``) and the report (:func:`memdisc.experiments.study_report.write_study_report`).
    A failed cell raises :class:`memdisc.experiments.runner.GridError` once every other cell is done
    and the report of the finished cells is written.
    """
    device = resolve_device(cfg.device)
    grid = study_grid(cfg)
    with executor.start(device) as cells:
        check_run_dir(cfg, _RERUNNABLE, "study")
        check_dataset_files(cfg.dataset, cfg.data_dir)
        run = StudyRun(cfg, device, progress)
        run.load_splits()
        remove_stale_temp_files(cfg.out, *(run.seed_dir(s) for s in grid.seeds),
                                *(run.seed_dir(s) / "poisons" for s in grid.seeds),
                                *(grid.directory(c) for c in grid.cells()))
        return run_and_report("study", cfg, grid, run, device,
                              lambda results: write_study_report(results, cfg.out, *_pictures(run, grid)), progress,
                              cells, executor.retry_limit)


def run_and_report(command: str, cfg: Any, grid: Grid, run: StudyRun, device: torch.device,
                   report: Callable[[GridResults], dict[str, Path]], progress: bool, executor: Executor,
                   retries: int) -> GridResults:
    """What a grid command does once its checks passed: ``OUT/config.json`` (the configuration, the thread
    count, provenance), every cell not finished (``run.prepare`` per seed, ``run`` per cell, through
    ``executor``, a failed one run up to ``retries`` more times), then ``report(results)`` (its files;
    ``OUT/results.md`` among them), also when cells failed, and then the
    :class:`~memdisc.experiments.runner.GridError` of the failed cells."""
    write_json(Path(cfg.out) / "config.json", {"command": command, "config": to_dict(cfg),
                                                "threads": torch.get_num_threads(),
                                                "provenance": provenance(cfg.seed, device)})
    failure = None
    try:
        run_grid(grid, run, prepare=run.prepare, executor=executor, retries=retries, progress=progress)
    except GridError as exc:
        failure = exc
    results = GridResults.read(Path(cfg.out) / grid.results_file)
    paths = report(results)
    if progress:
        print((Path(cfg.out) / "results.md").read_text())
        print("written:", ", ".join(str(p) for p in [Path(cfg.out) / grid.results_file, *paths.values()]))
    if failure is not None:
        raise failure
    return results
