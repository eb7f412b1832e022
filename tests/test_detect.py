"""memdisc detect: the detection grid's cells and layout, a tiny grid end to end (files, the result schema
read back, measures that agree with the saved scores, remove-and-retrain on the unflagged rows), resume (a
finished cell never runs again, a suspect model is trained once per attack and setting), the base set, and
options named as typed.

The tiny grid: the tiny Fashion-MNIST files of conftest.py, the "cnn" on 200 training rows, three epochs,
BadNets and the noisy-label control, MD and the loss detector, one seed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import memdisc.experiments.detect as detect
from memdisc.cli import main
from memdisc.config import OptionError
from memdisc.eval.detection import auroc
from memdisc.experiments import GridResults
from memdisc.experiments.detect import DetectConfig, DetectResult, detect_grid, load_detect_config, run_detect
from memdisc.experiments.detect_report import REPORT_FILES
from memdisc.experiments.runner import GridError

pytestmark = pytest.mark.usefixtures("single_thread")

THREE_EPOCHS = {"epochs": 3, "batch_size": 32, "patience": None}


def tiny_config(data_dir: Path, out: Path, **values) -> DetectConfig:
    options = {"data_dir": str(data_dir), "out": str(out), "device": "cpu", "model": "cnn",
               "attacks": ["badnets", "noisy-label"], "detectors": ["MD", "loss"], "repeats": 1,
               "train_subset": 200, "val_size": 64, "test_subset": 128, "base_per_class": 4,
               "end_to_end": THREE_EPOCHS, "transfer": THREE_EPOCHS, "badnets": {"fraction": 0.1},
               "md": {"snapshot_epochs": [1]}}
    options.update(values)
    return load_detect_config(None, options)


class Counting:
    """Wraps a method and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __get__(self, obj, owner=None):
        def call(*args, **kwargs):
            self.calls += 1
            return self.fn(obj, *args, **kwargs)
        return call


@pytest.fixture(scope="module")
def tiny_grid(tiny_fashion_mnist, tmp_path_factory, single_thread):
    """The tiny grid run once, with the trainings counted."""
    cfg = tiny_config(tiny_fashion_mnist, tmp_path_factory.mktemp("detect") / "run")
    with pytest.MonkeyPatch.context() as mp:
        trained = Counting(detect.DetectRun._train)
        mp.setattr(detect.DetectRun, "_train", trained)
        results = run_detect(cfg, progress=False)
    return cfg, results, trained.calls


def test_the_grid_is_attack_by_setting_by_detector_per_seed(tmp_path):
    cfg = DetectConfig(attacks=["badnets", "noisy-label"], settings=["end-to-end", "transfer"],
                       detectors=["MD", "loss"], repeats=2, out=str(tmp_path))
    grid = detect_grid(cfg)
    cells = grid.cells()
    assert len(cells) == 2 * 2 * 2 * 2
    assert [(c.axes["attack"], c.axes["setting"], c.axes["detector"]) for c in cells if c.seed == 0][:3] == [
        ("badnets", "end-to-end", "MD"), ("badnets", "end-to-end", "loss"), ("badnets", "transfer", "MD")]
    assert grid.directory(cells[1]) == tmp_path / "seed-0" / "cells" / "badnets-end-to-end-loss"


@pytest.mark.slow
def test_a_tiny_grid_writes_every_output_and_its_measures_agree_with_the_saved_scores(tiny_grid):
    cfg, results, _ = tiny_grid
    out = Path(cfg.out)
    for name in (*REPORT_FILES.values(), "results.json", "config.json"):
        assert (out / name).stat().st_size > 0, name
    assert not results.failures and len(results.cells) == 4
    assert GridResults.read(out / "results.json").to_json() == results.to_json()
    grid = detect_grid(cfg)
    for result in results.cells:
        p = result.payload
        assert isinstance(p, DetectResult)
        saved = torch.load(grid.directory(result.cell) / p.scores)
        scores, poisoned, flags = saved["scores"], saved["poisoned"], saved["flags"]
        assert scores.shape == poisoned.shape == flags.shape == (cfg.train_subset,)
        assert int(poisoned.sum()) == p.poisoned > 0
        if p.attack == "badnets":
            assert p.poisoned == round(cfg.badnets.fraction * cfg.train_subset)
        assert p.detection["auroc"] == pytest.approx(auroc(scores, poisoned), abs=1e-12)
        assert p.detection["flagged"] == int(flags.sum()) == p.after["removed"]
        assert p.detection["tpr"] == pytest.approx(float((flags & poisoned).sum()) / p.poisoned)
        assert (p.before["asr"] is None) == (p.attack == "noisy-label")
        assert 0 <= p.before["clean_error"] <= 1 and 0 <= p.after["clean_error"] <= 1
        assert p.config["snapshot_epochs"] == ([1] if p.detector == "MD" else None)
    table = (out / "results.md").read_text()
    for attack in cfg.attacks:
        assert f"## {attack}, end-to-end" in table
    assert table.count("| MD |") == table.count("| loss |") == 2


@pytest.mark.slow
def test_one_suspect_per_attack_and_setting_and_one_retraining_per_cell(tiny_grid):
    cfg, results, trained = tiny_grid
    assert trained == 2 + len(results.cells)
    assert sorted(p.name for p in (Path(cfg.out) / "seed-0" / "suspects").iterdir()) == [
        "badnets-end-to-end.pt", "noisy-label-end-to-end.pt"]


@pytest.mark.slow
def test_a_finished_grid_runs_no_cell_again(tiny_grid, monkeypatch):
    cfg, results, _ = tiny_grid

    def no_cell(*args, **kwargs):
        raise AssertionError("a finished cell ran again")
    monkeypatch.setattr(detect.DetectRun, "__call__", no_cell)
    again = run_detect(cfg, progress=False)
    assert again.to_json() == results.to_json()


@pytest.mark.slow
def test_the_retrained_model_saw_only_the_unflagged_rows(tiny_grid, tiny_fashion_mnist, tmp_path, monkeypatch):
    """Flag every poisoned row (a perfect detector): the retraining gets exactly the clean rows."""
    cfg = tiny_config(tiny_fashion_mnist, tmp_path / "run", attacks=["badnets"], detectors=["loss"])
    seen = []
    original = detect.DetectRun._train

    def spy(self, setting, seed, x, y, keep_epochs=()):
        seen.append((x, y))
        return original(self, setting, seed, x, y, keep_epochs)

    def oracle(self, scores, y):
        return oracle.poisoned
    monkeypatch.setattr(detect.DetectRun, "_train", spy)
    cls = detect.DETECTORS["loss"]
    monkeypatch.setattr(cls, "flag", oracle)
    run = detect.DetectRun(cfg, torch.device("cpu"), progress=False)
    run.load_splits()
    run.prepare(0)
    poisons = run.poisoned_set(0, "badnets", 0.1)
    oracle.poisoned = torch.zeros(cfg.train_subset, dtype=torch.bool)
    oracle.poisoned[poisons.rows] = True
    grid = detect_grid(cfg)
    cell = grid.cells()[0]
    grid.directory(cell).mkdir(parents=True)
    result = run(cell, grid.directory(cell))
    x_all, y_all = poisons.apply(run.data[0].x_train, run.data[0].y_train)
    assert result.detection["tpr"] == 1.0 and result.detection["fpr"] == 0.0
    assert torch.equal(seen[-1][0], x_all[~oracle.poisoned]) and torch.equal(seen[-1][1], y_all[~oracle.poisoned])


def test_the_base_set_is_balanced_clean_and_apart_from_the_training_and_validation_rows(tiny_fashion_mnist,
                                                                                       tmp_path):
    cfg = tiny_config(tiny_fashion_mnist, tmp_path / "run", base_per_class=3)
    run = detect.DetectRun(cfg, torch.device("cpu"), progress=False)
    run.load_splits()
    run.prepare(0)
    x_base, y_base = run.base[0]
    assert torch.equal(torch.bincount(y_base, minlength=10), torch.full((10,), 3))
    data = run.data[0]
    others = torch.cat([data.x_train, data.x_val]).flatten(1)
    assert not (torch.cdist(x_base.flatten(1), others) == 0).any()


def test_options_are_named_as_typed(tiny_fashion_mnist, tmp_path):
    with pytest.raises(OptionError, match="detectors"):
        DetectConfig(detectors=["Nope"])
    with pytest.raises(OptionError, match="attacks"):
        DetectConfig(attacks=["badnets", "badnets"])
    with pytest.raises(OptionError, match="snapshot_epochs"):
        detect.MDOptions(snapshot_epochs=[])
    with pytest.raises(ValueError, match="asset.lr"):
        load_detect_config(None, {"asset": {"lr": -1.0}})
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(detect.AssetOptions)}
    assert "Adam's learning rate" in helps["lr"] and "seed" not in helps  # the docstring's; the seed is the grid's
    with pytest.raises(ValueError, match=r"end_to_end\.seed"):
        load_detect_config(None, {"end_to_end": {"seed": 3}})
    cfg = tiny_config(tiny_fashion_mnist, tmp_path / "run", base_per_class=100)
    with pytest.raises(ValueError, match="--base-per-class"):
        run_detect(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_md_snapshots_are_the_epochs_before_the_best_and_none_is_an_error_by_name(tiny_fashion_mnist, tmp_path):
    with pytest.raises(ValueError, match="--md-snapshot-epochs"):  # the last epoch cannot precede the best one
        tiny_config(tiny_fashion_mnist, tmp_path / "run", md={"snapshot_epochs": [3]})
    cfg = tiny_config(tiny_fashion_mnist, tmp_path / "run", attacks=["noisy-label"], detectors=["MD"],
                      end_to_end={**THREE_EPOCHS, "patience": None}, md={"snapshot_epochs": [1, 2]})
    run = detect.DetectRun(cfg, torch.device("cpu"), progress=False)
    run.load_splits()
    run.prepare(0)
    suspect = run.suspect(0, "noisy-label", "end-to-end")
    best = suspect.training["best_epoch"]
    assert suspect.snapshot_epochs == [e for e in (1, 2) if e < best] and len(suspect.snapshots) == len(
        suspect.snapshot_epochs)
    again = run.suspect(0, "noisy-label", "end-to-end")  # read back from its file
    assert again.snapshot_epochs == suspect.snapshot_epochs
    with pytest.raises(ValueError, match="--md-snapshot-epochs"):
        run.detector("MD", 0, dataclasses.replace(suspect, snapshots=[], snapshot_epochs=[]))


def test_a_suspect_file_of_other_options_is_refused_by_name(tiny_fashion_mnist, tmp_path):
    cfg = tiny_config(tiny_fashion_mnist, tmp_path / "run", attacks=["noisy-label"])
    run = detect.DetectRun(cfg, torch.device("cpu"), progress=False)
    run.load_splits()
    run.prepare(0)
    run.suspect(0, "noisy-label", "end-to-end")
    other = detect.DetectRun(dataclasses.replace(cfg, noisy_label=dataclasses.replace(cfg.noisy_label, fraction=0.2)),
                             torch.device("cpu"), progress=False)
    other.load_splits()
    other.prepare(0)
    with pytest.raises(ValueError, match="noisy-label-end-to-end.pt: not the noisy-label suspect"):
        other.suspect(0, "noisy-label", "end-to-end")


def test_an_attack_option_the_data_cannot_take_is_refused_before_anything_is_written(tiny_fashion_mnist, tmp_path):
    for values, flag in ((dict(badnets={"target": 12}), "--badnets-target"),
                         (dict(attacks=["clean-label"], clean_label={"fraction": 0.5}), "--clean-label-fraction")):
        cfg = tiny_config(tiny_fashion_mnist, tmp_path / "run", **values)
        with pytest.raises(ValueError, match=flag):
            run_detect(cfg, progress=False)
        assert not (tmp_path / "run").exists()


def test_cli_unknown_detector_is_a_one_line_error(capsys):
    assert main(["detect", "--detectors", "Nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memdisc detect: error: ") and "--detectors" in err and "\n" not in err



@pytest.mark.slow
def test_clean_label_poisons_are_crafted_against_the_clean_backbone(tiny_fashion_mnist, tmp_path):
    """The attack that reads a model gets the seed's clean backbone (trained once, saved), and its poisons keep
    their (target-class) labels."""
    cfg = tiny_config(tiny_fashion_mnist, tmp_path / "run", attacks=["clean-label"], detectors=["loss"])
    results = run_detect(cfg, progress=False)
    assert not results.failures and (tmp_path / "run" / "seed-0" / "backbone.pt").exists()
    run = detect.DetectRun(cfg, torch.device("cpu"), progress=False)
    run.load_splits()
    run.prepare(0)
    poisons = run.poisoned_set(0, "clean-label", cfg.clean_label.fraction)
    assert (poisons.y == cfg.clean_label.target).all()
    assert torch.equal(run.data[0].y_train[poisons.rows], poisons.y)
    assert results.cells[0].payload.before["asr"] is not None


def test_the_asset_notebook_preset_loads_with_the_notebooks_options():
    cfg = load_detect_config(Path(__file__).parents[1] / "scripts" / "detect-asset-cifar10.toml")
    assert (cfg.dataset, cfg.model, cfg.device, cfg.base_per_class) == ("cifar10", "resnet18", "cuda", 100)
    assert (cfg.badnets.fraction, cfg.badnets.target, cfg.badnets.mode) == (0.05, 2, "all-to-one")
    assert (cfg.asset.lr, cfg.asset.vnet_lr, cfg.asset.epochs, cfg.asset.batch_size) == (1e-4, 1e-4, 1, 512)
