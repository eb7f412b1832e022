"""memdisc.experiments.compare: presets < TOML < flags, the shared top-level values, the end-to-end comparison
on the tiny Fashion-MNIST-format data (tests/conftest.py), the summary over seeds and the command line's error
exit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from formats import make_cifar10

import memdisc.experiments.compare as compare_module
from memdisc.config import to_dict
from memdisc.defenses import DSCConfig
from memdisc.eval.result import RunResult
from memdisc.experiments.compare import (DEFAULT_DEFENSES, PRESETS, BurninSummary, Comparison, compare_grid,
                                         load_compare_config, run_compare)
from memdisc.experiments.runner import GridError
from memdisc.experiments.summary import spread, summarize_seeds, summary_markdown
from memdisc.training.online import OnlineConfig
from memdisc.training.supervised import BurninConfig

SEED_CIFAR10 = PRESETS["seed-cifar10"]


def assert_seed_cifar10_burnin(cfg) -> None:
    for key, value in SEED_CIFAR10["burnin"].items():
        assert getattr(cfg.burnin, key) == value, key


def test_auto_picks_the_seed_preset_for_cifar10_resnet18(tmp_path):
    cfg = load_compare_config(overrides={"dataset": "cifar10", "model": "resnet18", "out": str(tmp_path)})
    assert_seed_cifar10_burnin(cfg)
    assert (cfg.burnin.epochs, cfg.burnin.batch_size, cfg.burnin.augment, cfg.burnin.snapshot_every) == (40, 256, True,
                                                                                                        10)
    online = cfg.online
    assert (online.history_epochs, online.stop_error, online.max_steps, online.lr, online.momentum) == (
        [20], 0.18, 100, 0.1, 0.9)
    assert online.dsc.threshold == "seed"


@pytest.mark.parametrize("overrides", [{}, {"dataset": "cifar10", "model": "cnn"},
                                       {"dataset": "cifar10", "model": "resnet18", "preset": "cpu-demo"}])
def test_other_setups_get_the_plain_defaults(overrides):
    cfg = load_compare_config(overrides=overrides)
    defaults = BurninConfig()
    assert (cfg.burnin.epochs, cfg.burnin.batch_size, cfg.burnin.augment) == (defaults.epochs, defaults.batch_size,
                                                                              defaults.augment)
    assert cfg.online.stop_error is None and cfg.online.dsc == DSCConfig()
    assert cfg.online.history_epochs == OnlineConfig().history_epochs


def test_a_named_preset_applies_to_any_dataset():
    cfg = load_compare_config(overrides={"preset": "seed-cifar10"})
    assert cfg.dataset == "fashion-mnist"
    assert_seed_cifar10_burnin(cfg)
    assert cfg.online.dsc.threshold == "seed"


def test_toml_overrides_the_preset_and_flags_override_both(tmp_path):
    toml = tmp_path / "compare.toml"
    toml.write_text('dataset = "cifar10"\nmodel = "resnet18"\nseed = 4\n\n[burnin]\nepochs = 5\nsnapshot_every = 1\n\n'
                    '[online]\nmax_steps = 7\nbatch_size = 50\nhistory_epochs = [2]\n\n[online.dsc]\n'
                    'threshold = "fixed"\n')
    cfg = load_compare_config(toml)
    assert (cfg.burnin.epochs, cfg.burnin.batch_size) == (5, 256)  # TOML over preset; the preset's rest stays
    assert (cfg.online.max_steps, cfg.online.batch_size, cfg.online.stop_error) == (7, 50, 0.18)
    assert cfg.online.dsc.threshold == "fixed" and cfg.online.history_epochs == [2]
    cfg = load_compare_config(toml, {"seed": 9, "burnin": {"epochs": 2}, "online": {"max_steps": 3,
                                                                                    "dsc": {"quantile": 0.9}}})
    assert (cfg.seed, cfg.burnin.epochs, cfg.online.max_steps, cfg.online.batch_size) == (9, 2, 3, 50)
    assert (cfg.online.dsc.threshold, cfg.online.dsc.quantile) == ("fixed", 0.9)
    assert cfg.burnin.batch_size == 256 and cfg.burnin.augment


def test_shared_values_propagate_to_both_phases(tmp_path):
    cfg = load_compare_config(overrides={"dataset": "mnist", "model": "cnn", "seed": 3, "data_dir": "/data/x",
                                         "device": "cpu", "out": str(tmp_path / "cmp"),
                                         "burnin": {"seed": 99}, "online": {"seed": 99}})
    b, o = cfg.burnin, cfg.online
    assert (b.dataset, b.model, b.data_dir, b.seed, b.device) == ("mnist", "cnn", "/data/x", 3, "cpu")
    assert b.out == str(tmp_path / "cmp" / "burnin") == o.burnin
    assert (o.seed, o.device) == (3, "cpu")
    default_out = load_compare_config(overrides={"dataset": "mnist", "seed": 3})
    assert default_out.out == "runs/compare-mnist-cnn-s3"
    assert default_out.burnin.out == str(Path("runs/compare-mnist-cnn-s3") / "burnin")


def test_the_default_defences_are_the_six_named_ones():
    """Written out, not every registered defence: a defence added to the registry joins on request."""
    assert load_compare_config().defenses == DEFAULT_DEFENSES == ["ST", "GC", "AT-seed", "AT-madry", "DSC-batch",
                                                                  "DSC-sample"]
    assert load_compare_config().defenses is not DEFAULT_DEFENSES  # each config its own list


def test_defences_are_a_list(tmp_path):
    toml = tmp_path / "compare.toml"
    toml.write_text('defenses = ["DSC-batch", "ST"]\n')
    assert load_compare_config(toml).defenses == ["DSC-batch", "ST"]
    toml.write_text('defenses = "ST,GC"\n')
    with pytest.raises(ValueError, match=r"^defenses \(--defenses\): expected a list, e\.g\. \["):
        load_compare_config(toml)
    with pytest.raises(ValueError, match=r"^defenses \(--defenses\): expected each defence once"):
        load_compare_config(overrides={"defenses": ["ST", "GC", "ST"]})


def test_unknown_names_are_value_errors():
    with pytest.raises(ValueError, match=r"^defenses \(--defenses\): unknown \['Nope'\]") as info:
        load_compare_config(overrides={"defenses": ["ST", "Nope"]})
    assert "DSC-sample" in str(info.value)
    with pytest.raises(ValueError, match=r"^preset \(--preset\): expected auto or one of"):
        load_compare_config(overrides={"preset": "fast"})
    with pytest.raises(ValueError, match="burnin.epoch"):
        load_compare_config(overrides={"burnin": {"epoch": 3}})


def test_run_compare_end_to_end(tiny_fashion_mnist, single_thread, tmp_path):
    out = tmp_path / "cmp"
    cfg = load_compare_config(overrides={
        "data_dir": str(tiny_fashion_mnist), "defenses": ["ST", "DSC-sample"], "device": "cpu", "out": str(out),
        "burnin": {"epochs": 2},
        "online": {"history_epochs": [1], "batch_size": 32, "max_steps": 3, "eval_size": 100, "val_size": 32,
                   "heldout_size": 64}})
    results = run_compare(cfg, progress=False)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results.to_json()))
    assert saved["attack_effect"] == results.attack_effect and saved["config"]["defenses"] == ["ST", "DSC-sample"]
    assert list(results.runs) == ["control", "ST", "DSC-sample"]
    assert results.runs["control"].attack is False
    assert results.runs["DSC-sample"].defense == "DSC-sample" and results.runs["ST"].attack is True
    for name, run in results.runs.items():
        assert RunResult.from_json(json.loads((out / "runs" / name / "result.json").read_text())) == run
        assert run.config["burnin"] == str(out / "burnin") and run.config["max_steps"] == 3
        assert run.config["history_epochs"] == [1]
    control_delta = results.runs["control"].error_delta
    for name in ("ST", "DSC-sample"):
        assert results.attack_effect[name] == results.runs[name].error_delta - control_delta
    assert results.burnin.epochs == 2
    assert (out / "burnin" / "snapshots" / "epoch_001.pt").is_file()
    assert json.loads((out / "config.json").read_text())["command"] == "compare"
    markdown = (out / "results.md").read_text()
    assert "DSC-sample" in markdown and "ST" in markdown
    for png in ("error_curves.png", "md_histograms.png", "roc.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
        assert png in markdown


def test_a_directory_of_another_comparison_is_refused_before_anything_is_written(tiny_fashion_mnist, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    base = {"data_dir": str(tiny_fashion_mnist), "defenses": ["ST"], "device": "cpu", "out": str(out)}
    saved = {"command": "compare", "config": to_dict(load_compare_config(overrides=base)), "provenance": {}}
    (out / "config.json").write_text(json.dumps(saved))
    other = load_compare_config(overrides={**base, "online": {"lr": 0.01}})
    with pytest.raises(ValueError, match=rf"^{out / 'config.json'}: a comparison with another configuration "
                                         r"\(differs in online\)"):
        run_compare(other, progress=False)
    assert json.loads((out / "config.json").read_text()) == saved
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


class _Started(Exception):
    """Raised in place of the burn-in: the comparison passed every check before its work."""


def _stop_at_the_burnin(monkeypatch):
    def started(*args, **kwargs):
        raise _Started
    monkeypatch.setattr(compare_module, "run_burnin", started)


def test_the_same_directory_spelled_otherwise_or_moved_is_the_same_comparison(tiny_fashion_mnist, tmp_path,
                                                                              monkeypatch):
    first = tmp_path / "cmp"
    base = {"data_dir": str(tiny_fashion_mnist), "defenses": ["ST"], "device": "cpu"}
    saved = to_dict(load_compare_config(overrides={**base, "out": str(first)}))
    first.mkdir()
    (first / "config.json").write_text(json.dumps({"command": "compare", "config": saved, "provenance": {}}))
    _stop_at_the_burnin(monkeypatch)
    monkeypatch.chdir(tmp_path)
    relative = {**base, "data_dir": f"{tiny_fashion_mnist}/.", "out": "cmp/"}
    with pytest.raises(_Started):
        run_compare(load_compare_config(overrides=relative), progress=False)
    assert json.loads((first / "config.json").read_text())["config"]["out"] == "cmp/"
    moved = tmp_path / "elsewhere" / "cmp"
    first.rename(tmp_path / "elsewhere")
    with pytest.raises(_Started):
        run_compare(load_compare_config(overrides={**base, "out": str(moved)}), progress=False)


def test_every_seed_directory_is_checked_before_any_work(tiny_fashion_mnist, tmp_path):
    out = tmp_path / "rep"
    base = {"data_dir": str(tiny_fashion_mnist), "defenses": ["ST"], "device": "cpu", "out": str(out), "repeats": 2}
    (out / "seed-1").mkdir(parents=True)
    other = to_dict(load_compare_config(overrides={**base, "repeats": 1, "seed": 1, "out": str(out / "seed-1"),
                                                   "online": {"lr": 0.5}}))
    (out / "seed-1" / "config.json").write_text(json.dumps({"config": other}))
    with pytest.raises(ValueError, match=r"seed-1/config\.json: a comparison with another configuration"):
        run_compare(load_compare_config(overrides=base), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["seed-1"]  # seed 0 was not started


def test_missing_data_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST \\(train split\\) not found"):
        run_compare(load_compare_config(overrides={"data_dir": str(tmp_path), "device": "cpu",
                                                   "out": str(tmp_path / "cmp")}), progress=False)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("online, message", [
    ({"history_epochs": [3]}, r"^online.history_epochs \(--online-history-epochs\): the burn-in saves no snapshot "
                              r"at epoch 3: it saves epochs 2, 4 \(burnin.epochs 4, burnin.snapshot_every 2\)"),
    ({"start_epoch": 5, "history_epochs": [2]}, r"^online.start_epoch \(--online-start-epoch\): the burn-in "
                                                r"saves no snapshot at epoch 5"),
    ({"lr": -0.1}, r"^online.lr \(--online-lr\): expected a finite number > 0.0, got -0.1"),
    ({"dsc": {"quantile": 1.5}}, r"^online.dsc.quantile \(--online-dsc-quantile\): expected"),
    ({"attack": {"eps": 8}}, r"^online.attack.eps \(--online-attack-eps\): expected a finite number >= 0.0 and "
                             r"<= 1.0, got 8")])
def test_online_options_are_checked_when_the_config_is_loaded(online, message):
    with pytest.raises(ValueError, match=message):
        load_compare_config(overrides={"burnin": {"epochs": 4, "snapshot_every": 2}, "online": online})


@pytest.mark.slow
def test_seed_cifar10_setup_runs_end_to_end_on_small_files(single_thread, tmp_path):
    """The paper's set-up (CIFAR-10 files, ResNet-18, the seed preset with crop + flip and the seed
    threshold schedule) through burn-in, snapshots, attack and DSC, on 140 tiny random images."""
    make_cifar10(tmp_path / "cifar-10-batches-py", per_batch=20, n_test=40)
    out = tmp_path / "cmp"
    cfg = load_compare_config(overrides={
        "dataset": "cifar10", "model": "resnet18", "data_dir": str(tmp_path), "defenses": ["DSC-batch"],
        "device": "cpu", "out": str(out), "burnin": {"epochs": 1, "batch_size": 50, "snapshot_every": 1},
        "online": {"history_epochs": [1], "batch_size": 10, "max_steps": 1, "eval_size": 20, "val_size": 10,
                   "heldout_size": 10, "stop_error": 1.0}})
    assert cfg.preset == "auto" and cfg.burnin.augment and cfg.online.dsc.threshold == "seed"
    results = run_compare(cfg, progress=False)
    assert results.burnin.epochs == 1 and list(results.runs) == ["control", "DSC-batch"]
    dsc = results.runs["DSC-batch"]
    assert dsc.steps_run == 1 and dsc.attack is True
    assert 0.0 <= dsc.error_after_trigger <= 1.0
    spec = torch.load(out / "burnin" / "snapshots" / "epoch_001.pt", weights_only=False)["model_spec"]
    assert (spec["name"], spec["in_channels"], spec["image_size"]) == ("resnet18", 3, 32)


def test_cuda_graph_without_a_cuda_device_is_refused_before_the_burnin(tiny_fashion_mnist, tmp_path):
    cfg = load_compare_config(overrides={"data_dir": str(tiny_fashion_mnist), "device": "cpu",
                                         "out": str(tmp_path / "cmp"), "online": {"cuda_graph": True}})
    with pytest.raises(ValueError, match=r"^online.cuda_graph \(--online-cuda-graph\): CUDA graphs need a CUDA "
                                         "device; --device cpu gives cpu"):
        run_compare(cfg, progress=False)
    assert not (tmp_path / "cmp").exists()


def test_cli_unknown_defense_exits_2_with_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memdisc.cli", "compare", "--defenses", "Nope"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memdisc compare: error: defenses (--defenses): unknown ['Nope']"), \
        proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was written


@pytest.mark.slow
def test_repeats_run_each_seed_and_summarise_over_seeds(tiny_fashion_mnist, single_thread, tmp_path):
    out = tmp_path / "rep"
    cfg = load_compare_config(overrides={
        "data_dir": str(tiny_fashion_mnist), "defenses": ["ST"], "device": "cpu", "out": str(out), "seed": 3,
        "repeats": 2, "burnin": {"epochs": 1},
        "online": {"history_epochs": [1], "batch_size": 32, "max_steps": 2, "eval_size": 100, "val_size": 32,
                   "heldout_size": 64}})
    summary = run_compare(cfg, progress=False)
    assert summary["seeds"] == [3, 4]
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (3, 4)]
    assert [r["config"]["seed"] for r in per_seed] == [3, 4]
    assert per_seed[0]["runs"]["ST"]["config"]["seed"] == 3 and per_seed[1]["runs"]["ST"]["config"]["seed"] == 4
    effect = summary["runs"]["ST"]["attack_effect"]
    expected = [r["attack_effect"]["ST"] for r in per_seed]
    assert effect["values"] == expected
    assert effect["mean"] == pytest.approx(sum(expected) / 2)
    assert effect["std"] == pytest.approx(abs(expected[0] - expected[1]) / 2 ** 0.5)
    assert summary["runs"]["control"]["attack_effect"]["mean"] is None
    assert json.loads((out / "summary.json").read_text())["runs"]["ST"]["attack_effect"]["values"] == expected
    table = (out / "summary.md").read_text()
    assert "| ST |" in table and "| control |" in table and f"{100 * expected[0]:+.1f}" in table


def test_spread_is_mean_std_and_the_student_t_interval():
    # n = 5: t_{0.975, 4} = 2.7764451051977987 (scipy); mean 3, std sqrt(2.5)
    m = spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m["mean"] == 3.0 and m["std"] == pytest.approx(2.5 ** 0.5)
    half = 2.7764451051977987 * 2.5 ** 0.5 / 5 ** 0.5
    assert m["ci95"] == pytest.approx([3.0 - half, 3.0 + half])
    assert spread([0.4]) == {"values": [0.4], "mean": 0.4, "std": None, "ci95": None}
    assert spread([])["mean"] is None


def fake_result(name: str, error_delta: float) -> RunResult:
    """A RunResult of run ``name`` with the given error delta and no curve, scores or detection."""
    return RunResult(config={}, defense="ST" if name == "control" else name, attack=name != "control",
                     error_after_burnin=0.1, error_before_trigger=0.1, error_after_trigger=0.1 + error_delta,
                     error_delta=error_delta, steps_run=3, stop_reason="", stop_error=0.15, trigger_md=0.0,
                     curve={}, detection={"per_sample": None, "per_batch": None}, scores={}, timing={},
                     provenance={}, picture={})


def test_summary_compares_each_defence_with_st_on_the_same_seeds():
    def result(effects):
        runs = {name: fake_result(name, 0.1 + effects.get(name, 0.0)) for name in ("control", *effects)}
        return Comparison({}, {}, BurninSummary(0.1, 2, 1.0), runs)
    per_seed = {s: result({"ST": 0.08 + 0.01 * s, "DSC-batch": 0.01 + 0.002 * s, "GC": 0.08 + 0.011 * s})
                for s in range(5)}
    summary = summarize_seeds(per_seed)
    dsc, gc = summary["runs"]["DSC-batch"]["vs_st"], summary["runs"]["GC"]["vs_st"]
    assert dsc["values"] == pytest.approx([-0.07 - 0.008 * s for s in range(5)])
    assert summary["runs"]["ST"]["attack_effect"]["values"] == pytest.approx([0.08 + 0.01 * s for s in range(5)])
    assert summary["runs"]["control"]["attack_effect"]["values"] == []
    assert dsc["ci95"][1] < 0 and gc["ci95"][0] > 0 and "vs_st" not in summary["runs"]["ST"]
    table = summary_markdown(summary)
    assert "| DSC-batch |" in table and "lower than ST" in table and "higher than ST" in table


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats"):
        load_compare_config(overrides={"repeats": 0})


def test_repeats_past_the_last_seed_are_refused_naming_repeats():
    with pytest.raises(ValueError, match=r"^repeats \(--repeats\): seeds 4294967295..4294967296 go past"):
        load_compare_config(overrides={"seed": 2 ** 32 - 1, "repeats": 2})
    assert load_compare_config(overrides={"seed": 2 ** 32 - 2, "repeats": 2}).repeats == 2


def test_the_comparison_is_a_grid_of_runs_by_seeds(tmp_path):
    """Its cells, their ids and directories: OUT/runs/NAME for one seed, OUT/seed-S/runs/NAME for several."""
    cfg = load_compare_config(overrides={"defenses": ["ST", "DSC-batch"], "out": str(tmp_path), "seed": 4})
    grid = compare_grid(cfg)
    assert [c.id for c in grid.cells()] == ["seed=4/run=control", "seed=4/run=ST", "seed=4/run=DSC-batch"]
    assert [grid.directory(c) for c in grid.cells()] == [tmp_path / "runs" / n for n in ("control", "ST", "DSC-batch")]
    assert grid.result_path(grid.cells()[1]) == tmp_path / "runs" / "ST" / "result.json"
    assert grid.results_file is None  # compare writes its own results.json
    repeated = compare_grid(load_compare_config(overrides={"defenses": ["ST"], "out": str(tmp_path), "seed": 4,
                                                           "repeats": 2}))
    assert [(c.id, repeated.directory(c)) for c in repeated.cells()] == [
        (f"seed={s}/run={n}", tmp_path / f"seed-{s}" / "runs" / n) for s in (4, 5) for n in ("control", "ST")]


def test_a_failed_run_is_reported_by_its_cell_and_runs_again_alone(tiny_fashion_mnist, tmp_path, monkeypatch):
    """A run that fails stops neither the others nor the grid's end; the seed gets no results.json (a run is
    missing) and the error names the cell.  Run again, only that run runs, then the report is written."""
    out = tmp_path / "cmp"
    cfg = load_compare_config(overrides={"data_dir": str(tiny_fashion_mnist), "defenses": ["ST", "GC"],
                                         "device": "cpu", "out": str(out)})
    monkeypatch.setattr(compare_module, "run_burnin",
                        lambda cfg, progress, device: {"final_test_error": 0.1, "history": [{}], "seconds": 1.0})
    ran = []

    def run_online(cfg, progress, device):
        name = "control" if cfg.control else cfg.defense
        ran.append(name)
        if name == "ST" and len(ran) < 4:
            raise ValueError("state.pt: damaged")
        return fake_result(name, {"control": 0.01, "ST": 0.1, "GC": 0.02}[name])
    monkeypatch.setattr(compare_module, "run_online", run_online)
    with pytest.raises(GridError) as info:
        run_compare(cfg, progress=False)
    assert ran == ["control", "ST", "GC"]
    assert [f.cell.id for f in info.value.failures] == ["seed=0/run=ST"]
    assert str(info.value) == "1 of 3 cells failed: seed=0/run=ST: ValueError: state.pt: damaged"
    assert not (out / "results.json").exists() and not (out / "runs" / "ST" / "result.json").exists()
    assert (out / "runs" / "GC" / "result.json").exists()  # kept: a finished run is never run again
    results = run_compare(cfg, progress=False)
    assert ran == ["control", "ST", "GC", "ST"]
    assert results.attack_effect == {"ST": 0.1 - 0.01, "GC": 0.02 - 0.01}
    assert json.loads((out / "results.json").read_text())["attack_effect"] == results.attack_effect
