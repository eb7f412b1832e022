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
                               MODEL_FILE_FORMAT, load_model_file, model_from_file, provenance, save_model_file,
                               remove_stale_temp_files, write_json)
from memdisc.runtime.distributed import Comm
from memdisc.models import build_model

PROVENANCE_KEYS = {"memdisc", "torch", "numpy", "python", "commit", "device", "cpu_isa", "extension", "seed",
                   "processes"}


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class _Rank(Comm):
    """A rank of a two-process run that records the barriers and agreements it is asked for; ``other_failed``:
    what the other rank passes to ``agree``."""
    world_size = 2

    def __init__(self, rank: int, other_failed: bool = False):
        self.rank, self.other_failed, self.calls = rank, other_failed, []

    def barrier(self):
        self.calls.append("barrier")

    def agree(self, failed):
        self.calls.append("agree")
        return failed or self.other_failed


def test_under_torch_distributed_only_rank_0_writes_between_two_barriers(tmp_path, monkeypatch):
    for rank in (1, 0):
        comm = _Rank(rank)
        monkeypatch.setattr(artifacts, "process_comm", lambda: comm)
        path = atomic_write_text(tmp_path / f"from-{rank}" / "a.txt", "hello")
        assert path.exists() == (rank == 0) and comm.calls == ["barrier", "agree"]
    stale = tmp_path / ".b.txt.abcdefgh.tmp"
    stale.write_text("rank 0's write in progress")
    monkeypatch.setattr(artifacts, "process_comm", lambda: _Rank(1))
    assert remove_stale_temp_files(tmp_path) == [] and stale.exists()  # never another rank's temporary file


def test_rank_0_s_failed_write_fails_every_rank(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "a.txt"  # a file where a folder should be
    comm = _Rank(0)
    monkeypatch.setattr(artifacts, "process_comm", lambda: comm)
    with pytest.raises(OSError, match="cannot write it"):
        atomic_write_text(target, "x")
    assert comm.calls == ["barrier", "agree"]  # the others learn of it at the same point
    monkeypatch.setattr(artifacts, "process_comm", lambda: _Rank(1, other_failed=True))
    with pytest.raises(OSError, match="rank 0 could not write it") as raised:
        atomic_write_text(target, "x")
    assert raised.value.filename == str(target)


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


def test_a_write_that_fails_names_the_target_file(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "out" / "config.json"  # a file where a folder should be
    with pytest.raises(OSError) as info:
        write_json(target, {})
    assert info.value.filename == str(target)
    assert info.value.strerror.startswith("cannot write it (") and "writable" in info.value.strerror


def test_stale_temp_files_of_killed_writes_are_removed(tmp_path):
    """A kill inside atomic_write_bytes leaves its temp file; only that pattern is removed, one level deep."""
    write_json(tmp_path / "result.json", {"a": 1})
    # the names mkstemp gives: .NAME. + 8 characters of [a-z0-9_] + .tmp
    stale = [tmp_path / ".result.json.k2_x9aq0.tmp", tmp_path / ".state.pt.abcdefgh.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    kept = [tmp_path / name
            for name in (".hidden.tmp", "notes.tmp", ".x.abc.tmp", ".x.ABCDEFGH.tmp", "a.b.abcdefgh.tmp")]
    for path in kept:
        path.write_text("not memdisc's")
    (tmp_path / "sub").mkdir()
    deeper = tmp_path / "sub" / ".state.pt.abcdefgh.tmp"
    deeper.write_text("")
    assert artifacts.remove_stale_temp_files(tmp_path, tmp_path / "absent") == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(["result.json", "sub", *(p.name for p in kept)])
    assert deeper.exists() and artifacts.remove_stale_temp_files(tmp_path) == []


@pytest.mark.parametrize("text, problem", [("{not json", "not valid JSON"), ("[1, 2]", "not the JSON object"),
                                           ('{"config": 3}', "not the JSON object with config"),
                                           ("\udcff", "not valid JSON")])
def test_read_json_names_the_file_and_what_to_do(tmp_path, text, problem):
    path = tmp_path / "result.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError) as info:
        artifacts.read_json(path, "delete it", objects=("config",))
    assert str(info.value).startswith(f"{path}: {problem}") and str(info.value).endswith("; delete it")
    path.write_text('{"config": {"a": 1}}')
    assert artifacts.read_json(path, "delete it", objects=("config",)) == {"config": {"a": 1}}


def test_write_json_round_trip(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"nested": True}}
    text = write_json(tmp_path / "o.json", obj).read_text()
    assert json.loads(text) == obj and text.endswith("}\n")
    assert list(json.loads(text)) == ["b", "a"]  # key order kept


def test_provenance_keys_and_values():
    info = provenance(seed=7)
    assert set(info) == PROVENANCE_KEYS
    assert info["memdisc"] == memdisc.__version__ and info["torch"] == torch.__version__
    assert info["seed"] == 7 and isinstance(info["extension"], bool) and info["processes"] == 1
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
    path = save_model_file(tmp_path / "snaps" / "epoch_003.pt", model=model, model_spec=spec, epoch=3,
                           test_error=0.25, config={"lr": 0.1}, seed=5, optimizer=opt, extra={"note": "x"})
    assert _mode(path) == 0o644 and os.listdir(path.parent) == ["epoch_003.pt"]
    snap = load_model_file(path)
    assert snap["format"] == MODEL_FILE_FORMAT == "memdisc-model-1"
    assert (snap["epoch"], snap["test_error"], snap["config"], snap["seed"], snap["extra"]) == \
        (3, 0.25, {"lr": 0.1}, 5, {"note": "x"})
    assert snap["model_spec"] == spec
    assert set(snap["provenance"]) == PROVENANCE_KEYS and snap["provenance"]["seed"] == 5
    buffers = [s["momentum_buffer"] for s in snap["optimizer"]["state"].values()]
    assert len(buffers) == len(list(model.parameters())) and all(b.abs().sum() > 0 for b in buffers)
    rebuilt = model_from_file(snap)
    assert torch.equal(rebuilt.eval()(x), model(x))
    assert torch.equal(rebuilt.normalize.mean, torch.tensor([0.3]).view(1, 1, 1, 1))


def test_snapshot_without_optimizer(tmp_path, tiny_model):
    model, spec, _, _ = tiny_model
    path = save_model_file(tmp_path / "s.pt", model=model, model_spec=spec, epoch=1, test_error=0.5, config={},
                           seed=0)
    snap = load_model_file(path)
    assert snap["optimizer"] is None and snap["extra"] == {}


def test_load_model_file_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^\S*nope\.pt: no such model file .*memdisc burnin"):
        load_model_file(tmp_path / "nope.pt")


def test_load_model_file_not_a_torch_file(tmp_path):
    path = tmp_path / "text.pt"
    path.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(ValueError, match=r"^\S*text\.pt: not a readable torch file \(.*\); the file is damaged"):
        load_model_file(path)
    with pytest.raises(ValueError, match=r"text\.pt: not a readable torch file .*; delete it"):
        load_model_file(path, remedy="delete it")


@pytest.mark.parametrize("payload", [{"state_dict": {}}, [1, 2], {"format": "other-1"}])
def test_load_model_file_foreign_torch_file(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"^\S*foreign\.pt: not a memdisc model file; "):
        load_model_file(path)


def test_model_file_written_under_the_old_format_name_loads(tmp_path):
    """A file from before the rename (format ``memdisc-snapshot-1``, same layout) loads unchanged."""
    torch.manual_seed(0)
    spec = {"name": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 28}
    model = build_model(**spec)
    path = save_model_file(tmp_path / "old.pt", model=model, model_spec=spec, epoch=1, test_error=0.5, config={},
                           seed=0)
    payload = torch.load(path, weights_only=False)
    payload["format"] = "memdisc-snapshot-1"
    torch.save(payload, path)
    rebuilt = model_from_file(load_model_file(path))
    for (k, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k
