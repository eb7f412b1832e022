"""memdisc.artifacts: atomic writes, provenance, snapshot save/load/rebuild and their errors."""
from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch

import memdisc
from memdisc import artifacts
from memdisc.artifacts import (atomic_torch_save, atomic_write_bytes, atomic_write_text, git_commit,
                               load_snapshot, model_from_snapshot, provenance, save_snapshot, write_json)
from memdisc.models import build_model

PROVENANCE_KEYS = {"memdisc", "torch", "numpy", "python", "commit", "device", "cpu_isa", "extension", "seed"}


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_creates_parents_replaces_and_is_0644(tmp_path):
    path = tmp_path / "a" / "b" / "file.bin"
    assert atomic_write_bytes(path, b"first") == path
    assert path.read_bytes() == b"first" and _mode(path) == 0o644
    atomic_write_text(path, "zweite \u00e9")
    assert path.read_text(encoding="utf-8") == "zweite \u00e9" and _mode(path) == 0o644
    assert os.listdir(path.parent) == ["file.bin"]


@pytest.mark.parametrize("failure", [TypeError, KeyboardInterrupt])
def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, failure):
    path = tmp_path / "result.json"
    write_json(path, {"old": 1})
    if failure is TypeError:
        def write():
            atomic_write_bytes(path, "not bytes")  # the file object refuses str mid-write
    else:
        def fsync(fd):
            raise KeyboardInterrupt  # killed after the data was written, before the rename
        monkeypatch.setattr(artifacts.os, "fsync", fsync)

        def write():
            write_json(path, {"new": 2})
    with pytest.raises(failure):
        write()
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["result.json"]


def test_failed_write_of_a_new_file_leaves_nothing(tmp_path):
    with pytest.raises(Exception):
        atomic_torch_save({"f": lambda: 0}, tmp_path / "x.pt")  # a lambda cannot be pickled
    assert os.listdir(tmp_path) == []


def test_write_json_round_trip(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"nested": True}}
    text = write_json(tmp_path / "o.json", obj).read_text()
    assert json.loads(text) == obj and text.endswith("}\n")
    assert list(json.loads(text)) == ["b", "a"]  # key order kept


def test_provenance_keys_and_values():
    info = provenance(seed=7)
    assert set(info) == PROVENANCE_KEYS
    assert info["memdisc"] == memdisc.__version__ and info["torch"] == torch.__version__
    assert info["seed"] == 7 and isinstance(info["extension"], bool)
    isa = info["cpu_isa"]
    assert set(isa) == {"cpu", "memdisc", "aten", "onednn"}
    assert isa["aten"] == torch.backends.cpu.get_cpu_capability()
    assert isa["onednn"] == os.environ.get("ONEDNN_MAX_CPU_ISA", "unrestricted")
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", info["commit"])
    assert "cpus" in info["device"]
    json.dumps(info)  # must be recordable as JSON


def test_git_commit_is_unknown_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(artifacts.subprocess, "run", no_git)
    assert git_commit() == "unknown"


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    spec = {"name": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 28, "norm": "bn",
            "mean": [0.3], "std": [0.2]}
    model = build_model(**spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # gives the optimizer momentum state and the BatchNorm running statistics
    return model.eval(), spec, opt, x


def test_snapshot_round_trip(tmp_path, tiny_model):
    model, spec, opt, x = tiny_model
    path = save_snapshot(tmp_path / "snaps" / "epoch_003.pt", model=model, model_spec=spec, epoch=3,
                         test_error=0.25, config={"lr": 0.1}, seed=5, optimizer=opt, extra={"note": "x"})
    assert _mode(path) == 0o644 and os.listdir(path.parent) == ["epoch_003.pt"]
    snap = load_snapshot(path)
    assert snap["format"] == "memdisc-snapshot-1"
    assert (snap["epoch"], snap["test_error"], snap["config"], snap["seed"], snap["extra"]) == \
        (3, 0.25, {"lr": 0.1}, 5, {"note": "x"})
    assert snap["model_spec"] == spec
    assert set(snap["provenance"]) == PROVENANCE_KEYS and snap["provenance"]["seed"] == 5
    buffers = [s["momentum_buffer"] for s in snap["optimizer"]["state"].values()]
    assert len(buffers) == len(list(model.parameters())) and all(b.abs().sum() > 0 for b in buffers)
    rebuilt = model_from_snapshot(snap)
    assert torch.equal(rebuilt.eval()(x), model(x))
    assert torch.equal(rebuilt.normalize.mean, torch.tensor([0.3]).view(1, 1, 1, 1))


def test_snapshot_without_optimizer(tmp_path, tiny_model):
    model, spec, _, _ = tiny_model
    path = save_snapshot(tmp_path / "s.pt", model=model, model_spec=spec, epoch=1, test_error=0.5, config={},
                         seed=0)
    snap = load_snapshot(path)
    assert snap["optimizer"] is None and snap["extra"] == {}


def test_load_snapshot_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"snapshot: no such file .*nope\.pt.*memdisc burnin"):
        load_snapshot(tmp_path / "nope.pt")


def test_load_snapshot_not_a_torch_file(tmp_path):
    path = tmp_path / "text.pt"
    path.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(ValueError, match=r"snapshot: .*text\.pt is not a readable torch file"):
        load_snapshot(path)


@pytest.mark.parametrize("payload", [{"state_dict": {}}, [1, 2], {"format": "other-1"}])
def test_load_snapshot_foreign_torch_file(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"snapshot: .*foreign\.pt is not a memdisc snapshot"):
        load_snapshot(path)
