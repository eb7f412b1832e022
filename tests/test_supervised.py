"""memdisc.training.supervised (the burn-in) on a tiny learnable dataset: history, snapshots, rebuild, learning, exact resume, refusals."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import memdisc
import memdisc.training.supervised as burnin_module
from memdisc.artifacts import load_model_file, model_from_file
from memdisc.config import to_dict
from memdisc.data import load_dataset
from memdisc.eval.classification import error_rate
from memdisc.models import build_model
from memdisc.runtime.device import resolve_device
from memdisc.training.supervised import BurninConfig, run_burnin, snapshot_path

pytestmark = pytest.mark.usefixtures("single_thread")  # bit-equal weights need one fixed thread count

RECORD_KEYS = {"epoch", "test_error", "train_loss", "seconds"}


def _config(data_dir: Path, out: Path, **overrides) -> BurninConfig:
    values = dict(dataset="fashion-mnist", data_dir=str(data_dir), epochs=3, batch_size=64, lr=0.05,
                  snapshot_every=2, seed=1, device="cpu", out=str(out))
    return BurninConfig(**(values | overrides))


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_model_file(path)["state_dict"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _no_temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def finished(tiny_fashion_mnist, tmp_path_factory, single_thread):
    """One uninterrupted 3-epoch run (snapshots every 2 epochs), shared by the read-only tests."""
    cfg = _config(tiny_fashion_mnist, tmp_path_factory.mktemp("burnin") / "run")
    return cfg, run_burnin(cfg, progress=False)


def test_history_and_run_directory(finished):
    cfg, result = finished
    out = Path(cfg.out)
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(set(h) == RECORD_KEYS and 0 <= h["test_error"] <= 1 and h["train_loss"] > 0 for h in history)
    assert result["final_test_error"] == history[-1]["test_error"]
    assert result["config"] == to_dict(cfg) and result["provenance"]["memdisc"] == memdisc.__version__
    assert json.loads((out / "history.json").read_text()) == result
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["command"] == "burnin" and config_json["config"] == to_dict(cfg)
    assert config_json["provenance"]["seed"] == cfg.seed
    # Snapshots at the chosen epochs (every 2) and the last one; the checkpoint holds the last epoch.
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["epoch_002.pt", "epoch_003.pt"]
    assert load_model_file(out / "checkpoint.pt")["epoch"] == 3
    assert _no_temp_files(out) == []


def test_snapshot_contents(finished):
    cfg, result = finished
    snap = load_model_file(snapshot_path(cfg.out, 2))
    assert snap["epoch"] == 2 and snap["seed"] == cfg.seed and snap["config"] == to_dict(cfg)
    assert snap["test_error"] == result["history"][1]["test_error"]
    assert snap["extra"]["history"] == result["history"][:2]
    spec = snap["model_spec"]
    assert {k: spec[k] for k in ("name", "in_channels", "num_classes", "image_size", "norm")} == \
        {"name": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 28, "norm": "auto"}
    train = load_dataset("fashion-mnist", "train", cfg.data_dir).images.float() / 255
    assert spec["mean"] == pytest.approx([train.mean().item()], rel=1e-5)
    assert spec["std"] == pytest.approx([train.std().item()], rel=1e-5)
    assert snap["provenance"]["memdisc"] == memdisc.__version__ and snap["provenance"]["seed"] == cfg.seed
    assert snap["provenance"]["torch"] == torch.__version__
    momentum = [s["momentum_buffer"] for s in snap["optimizer"]["state"].values()]
    assert len(momentum) == len(snap["optimizer"]["param_groups"][0]["params"]) > 0
    assert snap["optimizer"]["param_groups"][0]["lr"] == cfg.lr
    assert set(snap["state_dict"]) >= {"normalize.mean", "normalize.std"}


def test_rebuilt_snapshot_is_the_evaluated_model(finished):
    """model_from_file reproduces the recorded test error exactly and the checkpoint's logits."""
    cfg, result = finished
    x, y = load_dataset("fashion-mnist", "test", cfg.data_dir).tensors()
    last = model_from_file(load_model_file(snapshot_path(cfg.out, 3))).eval()
    assert error_rate(last, x, y) == result["history"][2]["test_error"]
    ckpt = model_from_file(load_model_file(Path(cfg.out) / "checkpoint.pt")).eval()
    with torch.no_grad():
        assert torch.equal(last(x), ckpt(x))
    middle = model_from_file(load_model_file(snapshot_path(cfg.out, 2))).eval()
    assert error_rate(middle, x, y) == result["history"][1]["test_error"]


def test_training_reduces_test_error(finished):
    cfg, result = finished
    spec = load_model_file(snapshot_path(cfg.out, 3))["model_spec"]
    torch.manual_seed(cfg.seed)  # the run's own initialisation
    untrained = build_model(**spec)
    x, y = load_dataset("fashion-mnist", "test", cfg.data_dir).tensors()
    before = error_rate(untrained, x, y)
    assert before > 0.6  # chance is 0.9
    assert result["final_test_error"] < 0.2 and result["final_test_error"] < before / 3
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0]


class _Epochs:
    """Stands in for iterate_minibatches: counts the epochs run and, if ``interrupt=(epoch, batch)``,
    raises KeyboardInterrupt when that epoch (counted from this call's start) reaches that batch."""

    def __init__(self, interrupt: tuple[int, int] | None = None):
        self.interrupt, self.calls = interrupt, 0
        self.real = burnin_module.iterate_minibatches

    def __call__(self, *args, **kwargs):
        self.calls += 1
        for i, batch in enumerate(self.real(*args, **kwargs)):
            if (self.calls, i) == self.interrupt:
                raise KeyboardInterrupt
            yield batch


def test_resume_after_interruption_equals_uninterrupted_run(finished, tmp_path, monkeypatch):
    cfg, result = finished
    resumed = dataclasses.replace(cfg, out=str(tmp_path / "run"))
    interrupted = _Epochs(interrupt=(2, 3))  # three optimizer steps into epoch 2
    monkeypatch.setattr(burnin_module, "iterate_minibatches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_burnin(resumed, progress=False)
    out = Path(resumed.out)
    assert interrupted.calls == 2 and load_model_file(out / "checkpoint.pt")["epoch"] == 1
    assert not (out / "history.json").exists() and _no_temp_files(out) == []

    restarted = _Epochs()
    monkeypatch.setattr(burnin_module, "iterate_minibatches", restarted)
    again = run_burnin(resumed, progress=False)
    assert restarted.calls == 2  # epochs 2 and 3 only: it resumed, not started over
    _assert_same_weights(_state(out / "checkpoint.pt"), _state(Path(cfg.out) / "checkpoint.pt"))
    for epoch in (2, 3):
        _assert_same_weights(_state(snapshot_path(out, epoch)), _state(snapshot_path(cfg.out, epoch)))
    ref_opt = load_model_file(Path(cfg.out) / "checkpoint.pt")["optimizer"]["state"]
    for key, state in load_model_file(out / "checkpoint.pt")["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], ref_opt[key]["momentum_buffer"])
    strip = [{k: h[k] for k in ("epoch", "test_error", "train_loss")} for h in result["history"]]
    assert [{k: h[k] for k in ("epoch", "test_error", "train_loss")} for h in again["history"]] == strip


def test_extending_a_run_with_augmentation_equals_one_long_run(tiny_fashion_mnist, tmp_path, monkeypatch):
    """epochs=1 then the same command with epochs=2 equals epochs=2 at once (augmentation draws included)."""
    long = _config(tiny_fashion_mnist, tmp_path / "long", epochs=2, augment=True, snapshot_every=1,
                   train_subset=256, test_subset=128)
    run_burnin(long, progress=False)
    short = dataclasses.replace(long, out=str(tmp_path / "short"), epochs=1)
    run_burnin(short, progress=False)
    epochs = _Epochs()
    monkeypatch.setattr(burnin_module, "iterate_minibatches", epochs)
    extended = run_burnin(dataclasses.replace(short, epochs=2), progress=False)
    assert epochs.calls == 1 and [h["epoch"] for h in extended["history"]] == [1, 2]
    _assert_same_weights(_state(tmp_path / "short" / "checkpoint.pt"), _state(tmp_path / "long" / "checkpoint.pt"))


def test_rerunning_a_finished_run_changes_nothing(finished, tmp_path, capsys):
    cfg, result = finished
    copy = tmp_path / "copy"
    shutil.copytree(cfg.out, copy)
    before = (copy / "checkpoint.pt").read_bytes()
    again = run_burnin(dataclasses.replace(cfg, out=str(copy)), progress=False)
    assert again["history"] == result["history"]  # same seconds too: nothing was retrained
    assert (copy / "checkpoint.pt").read_bytes() == before
    assert "resuming" in capsys.readouterr().out


@pytest.mark.parametrize("change, key", [({"lr": 0.01}, "lr"), ({"seed": 2}, "seed"),
                                         ({"augment": True}, "augment"), ({"model": "resnet18"}, "model")])
def test_checkpoint_of_another_config_refuses_to_resume(finished, tmp_path, change, key):
    cfg, _ = finished
    out = tmp_path / "other"
    out.mkdir()
    shutil.copy(Path(cfg.out) / "checkpoint.pt", out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=rf"^{out / 'checkpoint.pt'}: a checkpoint of another configuration "
                                         rf".*'{key}'.*; use a different --out"):
        run_burnin(dataclasses.replace(cfg, out=str(out), **change), progress=False)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_moved_run_with_its_data_dir_spelled_otherwise_resumes(finished, tiny_fashion_mnist, tmp_path,
                                                                 monkeypatch, capsys):
    """Paths are compared resolved (data) and relative to the run (out), not as strings; a kill's
    temporary files are removed on resume, other files are left alone."""
    cfg, result = finished
    moved = tmp_path / "moved" / "run"
    shutil.copytree(cfg.out, moved)
    stale = [moved / ".checkpoint.pt.abcd1234.tmp", moved / "snapshots" / ".epoch_002.pt.x_y_z_00.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    (moved / "notes.tmp").write_text("mine")
    monkeypatch.chdir(tiny_fashion_mnist.parent)
    again = run_burnin(dataclasses.replace(cfg, out=str(moved), data_dir=f"./{tiny_fashion_mnist.name}/"),
                       progress=False)
    assert "resuming" in capsys.readouterr().out and again["history"] == result["history"]
    assert not any(path.exists() for path in stale) and (moved / "notes.tmp").exists()


def test_a_damaged_checkpoint_is_an_error_naming_it(finished, tmp_path):
    cfg, _ = finished
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((Path(cfg.out) / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"^{out / 'checkpoint.pt'}: not a readable torch file \(.*\); delete it "
                                         "to restart the burn-in from epoch 1"):
        run_burnin(dataclasses.replace(cfg, out=str(out)), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_fewer_epochs_than_the_checkpoint_is_refused(finished, tmp_path):
    cfg, _ = finished
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(Path(cfg.out) / "checkpoint.pt", out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"^epochs: .*already holds 3 epochs, more than the 2 asked for"):
        run_burnin(dataclasses.replace(cfg, out=str(out), epochs=2), progress=False)


def test_missing_dataset_is_reported_before_anything_is_written(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        run_burnin(_config(empty, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"^device: expected cpu, cuda or auto, got 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: cuda was asked for"):
            resolve_device("cuda")
