"""The memdisc command line: help with defaults, one-line errors and exit codes, info, a full burn-in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memdisc.training.supervised as burnin_module
from memdisc.cli import main
from memdisc.ops.extension import KERNEL_OPS

pytestmark = pytest.mark.usefixtures("single_thread")


def test_burnin_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["burnin", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo line wrapping
    for flag, default in (("--dataset", "fashion-mnist"), ("--data-dir", "None"), ("--model", "cnn"),
                          ("--epochs", "6"), ("--batch-size", "128"), ("--lr", "0.05"), ("--augment", "False"),
                          ("--snapshot-every", "1"), ("--seed", "0"), ("--device", "auto")):
        assert f"{flag} " in text, flag
        assert f"(default: {default})" in text, default
    assert "--config CONFIG" in text


def test_missing_data_is_a_one_line_error_without_traceback(tmp_path):
    """Run as a user would (a fresh interpreter): exit status 2 and one stderr line naming the folder."""
    empty = tmp_path / "no data here"
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "memdisc.cli", "burnin", "--data-dir", str(empty), "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("memdisc burnin: error: Fashion-MNIST (train split) not found")
    assert str(empty) in lines[0] and "--data-dir" in lines[0]
    assert list(tmp_path.iterdir()) == [empty]  # no run directory was started


def test_config_errors_exit_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    assert main(["burnin", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memdisc burnin: error: config: unknown option 'epochz'") and err.count("\n") == 1
    assert main(["burnin", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err
    assert main(["burnin", "--epochs", "0"]) == 2
    assert capsys.readouterr().err == "memdisc burnin: error: epochs (--epochs): expected an integer >= 1, got 0\n"


@pytest.mark.parametrize("argv, message", [
    (["--online-lr", "-0.1"], "online.lr (--online-lr): expected a finite number > 0.0, got -0.1"),
    (["--online-dsc-quantile", "1.5"], "online.dsc.quantile (--online-dsc-quantile): expected a finite number > 0.0 "
                                       "and < 1.0, got 1.5"),
    (["--online-stop-rise", "nan"], "online.stop_rise (--online-stop-rise): expected a finite number, got nan"),
    (["--burnin-lr", "nan"], "burnin.lr (--burnin-lr): expected a finite number > 0.0, got nan"),
    (["--online-attack-eps", "2"], "online.attack.eps (--online-attack-eps): expected a finite number >= 0.0 and "
                                   "<= 1.0, got 2.0"),
    (["--seed", "-1"], "seed (--seed): expected an integer in [0, 4294967295], got -1"),
    (["--online-history-epochs", "3,x"], "online.history_epochs (--online-history-epochs): expected a list of "
                                         "integers, e.g. [1, 3], got [3, 'x']"),
    (["--online-ring-lags", "0"], "online.ring_lags (--online-ring-lags): expected a list of integers >= 1, "
                                  "e.g. [1, 3], got [0]"),
    (["--defenses", "ST,ST"], "defenses (--defenses): expected each defence once, got ['ST', 'ST']")])
def test_a_bad_compare_option_is_named_as_typed_and_nothing_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), *argv]) == 2
    assert capsys.readouterr().err == f"memdisc compare: error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize("toml, message", [
    ('defenses = "ST,GC"\n', "defenses (--defenses): expected a list, e.g. [\"a\", \"b\"], got 'ST,GC'"),
    ('[online]\nhistory_epochs = "1,3"\n', "online.history_epochs (--online-history-epochs): expected a list, "
                                            "e.g. [1, 3], got '1,3'"),
    ("[online]\nring_lags = 2\n", "online.ring_lags (--online-ring-lags): expected a list, e.g. [1, 3], got 2"),
    ("[online]\nhistory_epochs = [0, 1]\n", "online.history_epochs (--online-history-epochs): expected a list of "
                                             "integers >= 1, e.g. [1, 3], got [0, 1]")])
def test_a_list_option_in_toml_is_a_list_and_its_errors_name_key_and_flag(tmp_path, capsys, toml, message):
    path = tmp_path / "compare.toml"
    path.write_text(toml)
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"memdisc compare: error: {message}\n"
    assert not out.exists()


def test_failed_runs_are_one_line_naming_their_cells_and_exit_1(tiny_fashion_mnist, tmp_path, capsys, monkeypatch):
    import memdisc.experiments.compare as compare_module

    def burnin(cfg, progress, device):
        return {"final_test_error": 0.1, "history": [{}], "seconds": 1.0}

    def online(cfg, progress, device):
        raise ValueError(f"{cfg.out}/state.pt: damaged")
    monkeypatch.setattr(compare_module, "run_burnin", burnin)
    monkeypatch.setattr(compare_module, "run_online", online)
    out = tmp_path / "cmp"
    argv = ["compare", "--out", str(out), "--device", "cpu", "--data-dir", str(tiny_fashion_mnist), "--defenses", "GC"]
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"memdisc compare: error: 2 of 2 cells failed: seed=0/run=control: ValueError: "
                       f"{out}/runs/control/state.pt: damaged; seed=0/run=GC: ValueError: {out}/runs/GC/state.pt: "
                       "damaged")
    assert err[:-1] == [f"[cell 1/2] seed=0/run=control failed: ValueError: {out}/runs/control/state.pt: damaged",
                        f"[cell 2/2] seed=0/run=GC failed: ValueError: {out}/runs/GC/state.pt: damaged"]


def test_a_wrong_data_dir_writes_nothing(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), "--device", "cpu", "--data-dir", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memdisc compare: error: Fashion-MNIST (train split) not found") and err.count("\n") == 1
    assert not out.exists()


def test_damaged_files_are_one_line_errors_naming_the_file(tiny_fashion_mnist, tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "config.json").write_text("{garbage")
    assert main(["compare", "--out", str(out), "--device", "cpu", "--data-dir", str(tiny_fashion_mnist)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memdisc compare: error: {out / 'config.json'}: not valid JSON (") and "delete it" in err
    assert err.count("\n") == 1
    run = tmp_path / "burnin"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["burnin", "--out", str(run), "--device", "cpu", "--data-dir", str(tiny_fashion_mnist)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memdisc burnin: error: {run / 'checkpoint.pt'}: not a readable torch file (")
    assert err.endswith("; delete it to restart the burn-in from epoch 1\n") and err.count("\n") == 1


def test_an_unwritable_run_directory_is_a_one_line_error_naming_the_file(tiny_fashion_mnist, tmp_path, capsys):
    (tmp_path / "a file").write_text("")
    out = tmp_path / "a file" / "run"
    argv = ["burnin", "--device", "cpu", "--data-dir", str(tiny_fashion_mnist), "--epochs", "1"]
    assert main([*argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"memdisc burnin: error: {out / 'config.json'}: cannot write it (Not a "
                                       "directory); check that its directory is writable and has free space\n")
    if os.geteuid() != 0:  # root writes into a read-only directory anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main([*argv, "--out", str(locked)]) == 2
        assert capsys.readouterr().err.startswith(f"memdisc burnin: error: {locked / 'config.json'}: cannot write it "
                                                  "(Permission denied)")


def test_bad_flag_and_missing_command_are_usage_errors(capsys):
    for argv in (["burnin", "--epochs", "many"], [], ["train"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "usage: memdisc" in capsys.readouterr().err


def test_interrupt_exits_130_with_a_resume_hint(monkeypatch, capsys, tmp_path):
    def interrupted(cfg, progress=True):
        raise KeyboardInterrupt
    monkeypatch.setattr(burnin_module, "run_burnin", interrupted)
    assert main(["burnin", "--out", str(tmp_path / "run")]) == 130
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err


def test_info_prints_json(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info["extension"], bool) and "extension_error" in info
    assert {"memdisc", "torch", "commit", "device"} <= set(info)
    assert info["extension_error"] is None or not info["extension"]
    if info["extension"]:
        build = info["extension_build"]
        assert info["cpu_isa"]["memdisc"] in ("avx512", "avx2", "default")
        assert build["built_against"]["torch"] == torch.__version__
        assert build["compiled_with"]["torch"] == torch.__version__.split("+")[0]
        assert int(build["compiled_with"]["cxx"]) >= 202002  # torch 2.13 and 2.14 build with C++20
        cuda_built = build["compiled_with"]["cuda"] == "1"
        assert cuda_built == (build["built_against"]["cuda"] is not None)
        assert (build["built_against"]["cuda_skipped"] is None) == cuda_built
        expected = ["CPU", "CUDA"] if cuda_built else ["CPU"]
        assert build["kernels"] == {op: expected for op in KERNEL_OPS}
    else:
        assert info["extension_build"] == {} and info["cpu_isa"]["memdisc"] == "reference"
    assert info["cpu_isa"]["aten"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(info["cuda_available"], bool)


def test_full_burnin_writes_the_run_directory(tiny_fashion_mnist, tmp_path, capsys):
    toml = tmp_path / "burnin.toml"
    toml.write_text('epochs = 5\nbatch_size = 64\ntrain_subset = 256\ntest_subset = 128\nlr = 0.05\n')
    out = tmp_path / "run"
    argv = ["burnin", "--config", str(toml), "--data-dir", str(tiny_fashion_mnist), "--epochs", "2",
            "--snapshot-every", "1", "--device", "cpu", "--seed", "4", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "burn-in done: test error" in stdout and "after 2 epochs" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "burnin"
    assert {k: config["config"][k] for k in ("epochs", "batch_size", "train_subset", "test_subset", "seed")} == \
        {"epochs": 2, "batch_size": 64, "train_subset": 256, "test_subset": 128, "seed": 4}  # flag beat TOML
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2]
    assert all(round(h["test_error"] * 128, 6).is_integer() for h in history["history"])  # 128 test images
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["epoch_001.pt", "epoch_002.pt"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "history.json", "snapshots"]
