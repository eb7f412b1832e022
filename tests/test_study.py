"""memdisc study: the poisoning study's grid (baselines at fraction 0, attacks at the fractions), a tiny study
end to end (files, the result schema read back, a table row for every cell), resume (a finished cell never
runs again), one crafting per (attack, fraction, seed) shared by the settings, options named as typed, and
the online setting (train_streaming): the end-to-end loop without early stopping, deterministic.

The tiny study: the tiny Fashion-MNIST files of conftest.py, the "cnn" on 64 training rows, one epoch per
setting, label-flip and a one-round gradient attack, two seeds: about ten seconds.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import memdisc.experiments.study as study
from memdisc.cli import main
from memdisc.experiments import GridResults
from memdisc.experiments.results import CellResult
from memdisc.experiments.study import (NO_ATTACK, SEED_ATTACKS, SETTINGS, StreamConfig, StudyConfig, StudyResult,
                                       load_study_config, run_study, study_grid)
from memdisc.experiments.study_report import REPORT_FILES
from memdisc.models import build_model
from memdisc.training.fit import FitConfig, train_end_to_end, train_streaming

pytestmark = pytest.mark.usefixtures("single_thread")

ONE_EPOCH = {"epochs": 1, "batch_size": 32, "patience": None}


def tiny_config(data_dir: Path, out: Path, **values) -> StudyConfig:
    options = {"data_dir": str(data_dir), "out": str(out), "device": "cpu", "model": "cnn",
               "attacks": ["label-flip", "gradient"], "fractions": [0.25], "repeats": 2, "train_subset": 64,
               "val_size": 32, "test_subset": 64, "end_to_end": ONE_EPOCH, "transfer": ONE_EPOCH,
               "gradient": {"rounds": 1, "val_size": 8, "chunk": 8}}
    options.update(values)
    return load_study_config(None, options)


class Counting:
    """Wraps a function and counts its calls (by their first positional argument)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args[0])
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny_study(tiny_fashion_mnist, tmp_path_factory, single_thread):
    """The tiny study run once, with the attacks built (crafting) and the cells run counted."""
    cfg = tiny_config(tiny_fashion_mnist, tmp_path_factory.mktemp("study") / "run")
    with pytest.MonkeyPatch.context() as mp:
        crafted = Counting(study.build_attack)
        mp.setattr(study, "build_attack", crafted)
        results = run_study(cfg, progress=False)
    return cfg, results, crafted.calls


# ----------------------------------------------------------------------------- the grid

def test_the_grid_is_a_clean_baseline_per_setting_then_every_attack_setting_and_fraction(tmp_path):
    cfg = StudyConfig(attacks=["noise", "gradient"], fractions=[0.1, 0.5], repeats=2, out=str(tmp_path))
    cells = study_grid(cfg).cells()
    assert len(cells) == 2 * (3 + 2 * 3 * 2)
    first_seed = [(c.axes["attack"], c.axes["setting"], c.axes["fraction"]) for c in cells if c.seed == 0]
    assert first_seed[:3] == [(NO_ATTACK, s, 0.0) for s in SETTINGS]
    assert first_seed[3:] == [(a, s, f) for a in ("noise", "gradient") for s in SETTINGS for f in (0.1, 0.5)]
    assert [c.seed for c in cells] == [0] * 15 + [1] * 15
    assert study_grid(cfg).directory(cells[4]) == tmp_path / "seed-0" / "cells" / "noise-end-to-end-f0.5"


def test_the_defaults_are_the_seed_attacks_settings_and_fractions_over_three_seeds():
    cfg = StudyConfig()
    assert (cfg.attacks, cfg.settings, cfg.fractions, cfg.repeats) == (list(SEED_ATTACKS), list(SETTINGS),
                                                                       [0.1, 0.3, 0.5], 3)
    assert cfg.online.patience is None and cfg.online.epochs == 1 and cfg.online.momentum == 0.0
    assert cfg.model == "seed-mlp" and cfg.out == "runs/study-fashion-mnist-seed-mlp-s0"


# ----------------------------------------------------------------------------- a tiny study

@pytest.mark.slow
def test_a_tiny_study_writes_every_output_and_its_results_read_back(tiny_study):
    cfg, results, _ = tiny_study
    out = Path(cfg.out)
    for name in ("config.json", "results.json", *REPORT_FILES.values()):
        assert (out / name).stat().st_size > 0, name
    for seed in (0, 1):
        assert (out / f"seed-{seed}" / "backbone.pt").is_file()
        assert sorted(p.name for p in (out / f"seed-{seed}" / "poisons").iterdir()) == ["gradient-f0.25.pt",
                                                                                       "label-flip-f0.25.pt"]
    assert not results.failures and len(results.cells) == 2 * (3 + 2 * 3)
    assert GridResults.read(out / "results.json").to_json() == results.to_json()
    for cell in results.cells:
        payload = cell.payload
        assert isinstance(payload, StudyResult)
        assert CellResult.from_json(json.loads(json.dumps(cell.to_json()))).payload == payload
        assert (payload.attack, payload.setting, payload.fraction) == tuple(cell.cell.axes.values())
        assert payload.poisoned == (0 if payload.attack == NO_ATTACK else 16)  # round(0.25 * 64)
        assert (payload.craft_seconds == 0) == (payload.attack == NO_ATTACK)
        assert len(payload.per_class_accuracy) == 10 and 0 <= payload.test_accuracy <= 1
        assert 0 <= payload.probe_accuracy <= 1 and payload.train_seconds > 0
        assert payload.provenance["seed"] == cell.cell.seed and payload.config["training"]["seed"] == cell.cell.seed
        assert (payload.saliency is not None) == (payload.setting == "end-to-end" and cell.cell.seed == 0)


@pytest.mark.slow
def test_a_poison_file_holds_the_replaced_rows_and_the_attack_options(tiny_study):
    cfg, _, _ = tiny_study
    data_poisons = torch.load(Path(cfg.out) / "seed-0" / "poisons" / "label-flip-f0.25.pt", weights_only=False)
    assert data_poisons["rows"].shape == (16,) and data_poisons["attack"] == "label-flip"
    assert data_poisons["options"] == {**dataclasses.asdict(cfg.label_flip), "fraction": 0.25}


@pytest.mark.slow
def test_the_table_has_every_cell_over_its_seeds(tiny_study):
    cfg, results, _ = tiny_study
    text = (Path(cfg.out) / "results.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith(" | 2 |")]
    keys = {tuple(c.strip() for c in line.split("|")[1:4]) for line in rows}
    expected = {(NO_ATTACK, s, "0") for s in SETTINGS} | {(a, s, "0.25") for a in cfg.attacks for s in SETTINGS}
    assert keys == expected and len(rows) == len(expected)
    for setting in SETTINGS:
        assert f"## Test accuracy, {setting}" in text


@pytest.mark.slow
def test_each_poisoned_set_is_crafted_once_and_shared_by_the_settings(tiny_study):
    _, results, crafted = tiny_study
    assert sorted(crafted) == sorted(["label-flip", "gradient"] * 2)  # attack x fraction x seed, not x setting
    by_set: dict[tuple, set] = {}
    for cell in results.cells:
        p = cell.payload
        by_set.setdefault((cell.cell.seed, p.attack), set()).add(p.craft_seconds)
    assert all(len(times) == 1 for times in by_set.values())  # the three settings report the same crafting


@pytest.mark.slow
def test_a_finished_study_runs_no_cell_again_and_a_missing_cell_alone_runs(tiny_study, tmp_path, monkeypatch):
    cfg, results, _ = tiny_study

    def no_cell(self, cell, directory):
        raise AssertionError(f"cell {cell.id} ran again")

    monkeypatch.setattr(study.StudyRun, "__call__", no_cell)
    assert run_study(cfg, progress=False).to_json() == results.to_json()

    ran = []
    monkeypatch.undo()
    original = study.StudyRun.__call__
    monkeypatch.setattr(study.StudyRun, "__call__", lambda self, cell, d: ran.append(cell.id) or original(self, cell, d))
    crafted = Counting(study.build_attack)
    monkeypatch.setattr(study, "build_attack", crafted)
    index, gone = next((i, c) for i, c in enumerate(results.cells)
                       if c.cell.id == "seed=0/attack=gradient/setting=transfer/fraction=0.25")
    (Path(cfg.out) / "seed-0" / "cells" / "gradient-transfer-f0.25" / "result.json").unlink()
    again = run_study(cfg, progress=False)
    assert ran == [gone.cell.id]
    assert crafted.calls == []  # its poisons came from the seed's file
    redone = again.cells[index].payload
    assert (redone.test_accuracy, redone.test_loss) == (gone.payload.test_accuracy, gone.payload.test_loss)


@pytest.mark.slow
def test_another_study_in_the_same_directory_is_refused_before_anything_is_written(tiny_study):
    cfg, _, _ = tiny_study
    before = (Path(cfg.out) / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"config.json: a study with another configuration \(differs in "
                                         r"train_subset\)"):
        run_study(dataclasses.replace(cfg, train_subset=32), progress=False)
    assert (Path(cfg.out) / "config.json").read_bytes() == before


def test_sizes_beyond_the_data_are_named_before_anything_is_written(tiny_fashion_mnist, tmp_path):
    for values, option in (({"train_subset": 500}, "train_subset (--train-subset)"),
                           ({"test_subset": 257}, "test_subset (--test-subset)")):
        with pytest.raises(ValueError, match="^" + re.escape(option)):
            run_study(tiny_config(tiny_fashion_mnist, tmp_path / "run", **values), progress=False)
        assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("values, message", [
    ({"fractions": [0.1, 1.5]}, "fractions (--fractions): expected a finite number >= 0.0 and <= 1.0, got 1.5"),
    ({"fractions": [0.1, "x"]}, "fractions (--fractions): expected a finite number"),
    ({"fractions": [0, 0.5]}, "fractions (--fractions): expected fractions > 0"),
    ({"fractions": [0.1, 0.1]}, "fractions (--fractions): expected each fraction once"),
    ({"fractions": "0.1"}, "fractions (--fractions): expected a non-empty list of numbers"),
    ({"attacks": ["label-flip", "badnets"]}, "attacks (--attacks): expected a non-empty list of names from "
                                             "label-flip, noise, loss, gradient, generative"),
    ({"settings": ["online", "online"]}, "settings (--settings): expected each name once"),
    ({"settings": []}, "settings (--settings): expected a non-empty list"),
    ({"repeats": 0}, "repeats (--repeats): expected an integer >= 1"),
    ({"model": "mlp"}, "model (--model): expected one of"),
    ({"online": {"patience": 3}}, "online.patience (--online-patience): a stream has no early stopping"),
    ({"online": {"batch_size": 0}}, "online.batch_size (--online-batch-size): expected an integer >= 1"),
    ({"gradient": {"rounds": 0}}, "gradient.rounds (--gradient-rounds): expected an integer >= 1"),
    ({"label_flip": {"target": 3}}, "label_flip.source (--label-flip-source): expected a class index"),
    ({"gradient": {"fraction": 0.2}}, "gradient.fraction: set by the study for each cell from its fractions"),
    ({"transfer": {"seed": 2}}, "transfer.seed: set by the study for each cell from its seed and repeats"),
    ({"gradiant": {"rounds": 2}}, "config: unknown option 'gradiant'"),
])
def test_bad_options_are_named_as_typed(values, message):
    with pytest.raises(ValueError) as exc:
        load_study_config(None, values)
    assert str(exc.value).startswith(message), str(exc.value)


def test_fractions_from_toml_and_flags_are_floats(tmp_path):
    toml = tmp_path / "study.toml"
    toml.write_text("fractions = [0.2, 1]\nattacks = [\"noise\"]\n[gradient]\nrounds = 3\n")
    cfg = load_study_config(toml, {"settings": ["transfer"]})
    assert cfg.fractions == [0.2, 1.0] and all(type(f) is float for f in cfg.fractions)
    assert (cfg.attacks, cfg.settings, cfg.gradient.rounds) == (["noise"], ["transfer"], 3)


def test_the_cli_takes_study_flags_and_names_a_bad_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["study", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--fractions FLOAT,...", "--attacks STR,...", "--online-batch-size", "--gradient-rounds",
                 "--end-to-end-epochs", "--transfer-lr", "--label-flip-source", "--repeats"):
        assert flag in text, flag
    for hidden in ("--gradient-fraction", "--end-to-end-seed", "--online-seed", "--noise-fraction"):
        assert hidden not in text, hidden
    assert main(["study", "--fractions", "0.1,abc", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memdisc study: error: fractions (--fractions): expected a finite number") and \
        err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the online setting

MASKS = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.25


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return 0.5 * torch.rand(n, 1, 8, 8, generator=g) + 0.5 * MASKS[y], y


def streamed(cfg: FitConfig, init: int = 0):
    torch.manual_seed(init)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    log = train_streaming(model, *make_data(200, 1), *make_data(50, 2), cfg)
    return model, log


def test_a_stream_is_deterministic_under_its_seed_and_leaves_the_global_rng_alone():
    cfg = StreamConfig(epochs=2, seed=5)
    (a, log_a), state = streamed(cfg), torch.random.get_rng_state()
    (b, log_b) = streamed(cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert log_a == log_b and len(log_a.val_loss) == 2 and log_a.best_epoch == 2 and not log_a.stopped_early
    torch.manual_seed(0)
    build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    assert torch.equal(torch.random.get_rng_state(), state)  # the stream drew nothing from the global RNG
    c, _ = streamed(dataclasses.replace(cfg, seed=6))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


def test_a_stream_takes_the_steps_of_end_to_end_training_without_early_stopping():
    """One pass, the same options: the stream and end-to-end training (patience none) end with the same
    weights and log, bit for bit (one loop: the stream only never goes back to a best epoch)."""
    cfg = StreamConfig(epochs=1, batch_size=10, lr=0.05, seed=3)
    stream, log = streamed(cfg)
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    offline_log = train_end_to_end(model, *make_data(200, 1), *make_data(50, 2),
                                   FitConfig(**dataclasses.asdict(cfg)))
    assert all(torch.equal(p, q) for p, q in zip(stream.state_dict().values(), model.state_dict().values()))
    assert log == offline_log


def test_a_stream_refuses_early_stopping_and_names_bad_arguments():
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    data = (*make_data(20, 1), *make_data(10, 2))
    with pytest.raises(ValueError, match="^cfg: a stream has no early stopping"):
        train_streaming(model, *data, FitConfig(patience=2))
    with pytest.raises(ValueError, match="^cfg: expected a FitConfig"):
        train_streaming(model, *data, None)
    with pytest.raises(ValueError, match="^y_train: expected class indices in"):
        train_streaming(model, data[0], data[1] + 10, *data[2:], StreamConfig())


def test_a_fraction_an_attack_cannot_take_is_refused_before_any_cell():
    with pytest.raises(ValueError, match=r"^fractions \(--fractions\): 0.7 does not work for loss: fraction"):
        load_study_config(overrides={"fractions": [0.1, 0.7]})
    assert load_study_config(overrides={"fractions": [0.1, 0.7], "attacks": ["noise"]}).fractions == [0.1, 0.7]


def test_a_study_run_with_another_thread_count_is_not_resumed(tmp_path):
    """CPU results depend on the thread count in the last bits, so a resume must use the same one."""
    from memdisc.artifacts import write_json
    from memdisc.config import to_dict

    cfg = load_study_config(overrides={"out": str(tmp_path)})
    write_json(tmp_path / "config.json", {"command": "study", "config": to_dict(cfg),
                                          "threads": torch.get_num_threads() + 1, "provenance": {}})
    with pytest.raises(ValueError, match=f"its cells ran with {torch.get_num_threads() + 1} threads"):
        study.check_run_dir(cfg, study._RERUNNABLE, "study")
    write_json(tmp_path / "config.json", {"command": "study", "config": to_dict(cfg),
                                          "threads": torch.get_num_threads(), "provenance": {}})
    study.check_run_dir(cfg, study._RERUNNABLE, "study")
