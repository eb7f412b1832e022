"""memdisc.training.online: one online run end to end on the tiny Fashion-MNIST-format data (tests/conftest.py).

A 2-epoch burn-in is shared by the module; each online run is 32-sample batches for at most 4 steps
(about a second each).  Resuming is checked bit for bit, so the module runs on one torch thread.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import memdisc.training.online as online_module
from memdisc.attacks import AttackConfig
from memdisc.config import to_dict
from memdisc.data import BatchStream
from memdisc.eval.result import RunResult
from memdisc.training.online import OnlineConfig, run_online
from memdisc.training.supervised import BurninConfig, run_burnin

BATCH, MAX_STEPS = 32, 4
RESULT_KEYS = {"config", "defense", "attack", "error_after_burnin", "error_before_trigger", "error_after_trigger",
               "error_delta", "steps_run", "stop_reason", "stop_error", "trigger_md", "curve", "detection", "scores",
               "timing", "provenance"}


@pytest.fixture(scope="module")
def burnin_dir(tiny_fashion_mnist, single_thread, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("online") / "burnin"
    run_burnin(BurninConfig(data_dir=str(tiny_fashion_mnist), epochs=2, device="cpu", out=str(out)), progress=False)
    return out


def online_cfg(burnin: Path, out: Path, **kwargs) -> OnlineConfig:
    values = dict(burnin=str(burnin), history_epochs=[1], batch_size=BATCH, max_steps=MAX_STEPS, eval_size=100,
                  val_size=32, heldout_size=64, checkpoint_every=1, device="cpu", out=str(out))
    values.update(kwargs)
    return OnlineConfig(**values)


def run_recording_final_weights(cfg: OnlineConfig) -> tuple[RunResult, dict]:
    """``run_online(cfg)`` plus the model's weights at its last evaluation (after the trigger step)."""
    seen = {}
    error_rate = online_module.error_rate

    def recording(model, x, y, *args, **kwargs):
        seen["weights"] = copy.deepcopy(model.state_dict())
        return error_rate(model, x, y, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(online_module, "error_rate", recording)
        result = run_online(cfg, progress=False)
    return result, seen["weights"]


# ST with a quarter of every batch left clean and the default stop rule (burn-in error + 0.05);
# the control; DSC-sample (calibrated threshold, a ring snapshot 2 steps behind) that never stops early.
RUNS = {
    "ST": dict(defense="ST", attack=AttackConfig(poison_scale=0.75)),
    "control": dict(defense="ST", control=True),
    "DSC-sample": dict(defense="DSC-sample", ring_lags=[2], stop_error=1.0),
}


@pytest.fixture(scope="module")
def runs(burnin_dir) -> dict[str, tuple[OnlineConfig, RunResult, dict]]:
    out = {}
    for name, kwargs in RUNS.items():
        cfg = online_cfg(burnin_dir, burnin_dir.parent / f"run-{name}", **kwargs)
        out[name] = (cfg, *run_recording_final_weights(cfg))
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_result_fields_are_present_and_consistent(runs, burnin_dir, name):
    cfg, result, _ = runs[name]
    out = Path(cfg.out)
    assert RESULT_KEYS <= result.to_json().keys()
    assert json.loads((out / "result.json").read_text())["error_delta"] == result.error_delta
    assert json.loads((out / "config.json").read_text())["config"] == to_dict(cfg)
    assert result.config == to_dict(cfg) and result.defense == cfg.defense
    assert result.attack is (not cfg.control)
    burnin = json.loads((burnin_dir / "history.json").read_text())
    assert result.error_after_burnin == burnin["final_test_error"]
    for key in ("error_before_trigger", "error_after_trigger"):
        assert 0.0 <= getattr(result, key) <= 1.0
    assert result.error_delta == result.error_after_trigger - result.error_before_trigger
    assert math.isfinite(result.trigger_md) and result.trigger_md >= 0

    # accumulation and why it stopped
    steps = result.steps_run
    curve = result.curve
    assert 1 <= steps <= cfg.max_steps
    assert curve["step"] == list(range(steps))
    assert all(len(curve[k]) == steps for k in ("test_error", "md_poisoned", "md_clean", "corrected_fraction",
                                               "threshold"))
    stop = cfg.stop_error if cfg.stop_error is not None else result.error_after_burnin + cfg.stop_rise
    assert result.stop_error == pytest.approx(stop)
    assert all(e <= stop for e in curve["test_error"][:-1])
    if curve["test_error"][-1] > stop:
        assert "exceeded the stop threshold" in result.stop_reason
    else:
        assert steps == cfg.max_steps and result.stop_reason == f"reached max_steps={cfg.max_steps}"

    # scores: one per clean sample and one per poisoned row, and the detection built from them
    poisoned_rows = round(cfg.attack.poison_scale * BATCH) if not cfg.control else 0
    assert len(result.scores["clean"]) == steps * BATCH
    assert len(result.scores["poisoned"]) == steps * poisoned_rows
    assert all(s >= -1e-6 for s in result.scores["clean"] + result.scores["poisoned"])
    detection = result.detection
    if cfg.control:
        assert detection == {"per_sample": None, "per_batch": None}
        assert curve["md_poisoned"] == [None] * steps
    else:
        assert detection["per_sample"]["n_pos"] == steps * poisoned_rows
        assert detection["per_sample"]["n_neg"] == steps * BATCH
        assert detection["per_batch"]["n_pos"] == detection["per_batch"]["n_neg"] == steps
        assert 0.0 <= detection["per_sample"]["auroc"] <= 1.0
        assert all(isinstance(m, float) for m in curve["md_poisoned"])

    # the defence's own trace
    if cfg.defense.startswith("DSC"):
        assert all(isinstance(t, float) for t in curve["threshold"])
        assert any(f > 0 for f in curve["corrected_fraction"])
    else:
        assert curve["threshold"] == [None] * steps and curve["corrected_fraction"] == [0.0] * steps
    timing = result.timing
    assert timing["online_seconds"] > 0 and timing["trigger_seconds"] > 0 and timing["samples_per_second"] > 0


def test_the_stop_rule_is_exercised(runs):
    """The ST run stops on the error threshold and the DSC run on max_steps (both branches above ran)."""
    assert "exceeded" in runs["ST"][1].stop_reason and runs["ST"][1].steps_run < MAX_STEPS
    assert runs["DSC-sample"][1].steps_run == MAX_STEPS


def test_an_interrupted_run_resumes_to_the_same_result(runs, burnin_dir, monkeypatch, capsys):
    reference_cfg, reference, reference_weights = runs["DSC-sample"]
    cfg = online_cfg(burnin_dir, burnin_dir.parent / "run-interrupted", **RUNS["DSC-sample"])
    batch_at = BatchStream.batch_at

    def interrupt_at_step_2(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return batch_at(self, step)

    monkeypatch.setattr(BatchStream, "batch_at", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_online(cfg, progress=False)
    out = Path(cfg.out)
    assert not (out / "result.json").exists()
    assert torch.load(out / "state.pt", weights_only=False)["progress"]["step"] == 2
    monkeypatch.setattr(BatchStream, "batch_at", batch_at)

    capsys.readouterr()
    result, weights = run_recording_final_weights(cfg)
    assert f"resuming {out} at step 2" in capsys.readouterr().out
    for key in ("error_before_trigger", "error_after_trigger", "error_delta", "steps_run", "stop_reason",
                "trigger_md", "curve", "scores", "detection"):
        assert getattr(result, key) == getattr(reference, key), key
    assert weights.keys() == reference_weights.keys()
    for name, value in weights.items():
        assert torch.equal(value, reference_weights[name]), name
    state = torch.load(out / "state.pt", weights_only=False)["model"]
    reference_state = torch.load(Path(reference_cfg.out) / "state.pt", weights_only=False)["model"]
    for name, value in state.items():
        assert torch.equal(value, reference_state[name]), name


def test_a_finished_run_is_returned_without_recomputation(runs, monkeypatch):
    cfg, _, _ = runs["control"]
    saved = json.loads((Path(cfg.out) / "result.json").read_text())

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(online_module, "OnlineRun", fail)
    assert run_online(cfg, progress=False).to_json() == saved


def test_another_config_in_the_same_out_dir_is_refused(runs):
    cfg, _, _ = runs["control"]
    config_json = (Path(cfg.out) / "config.json").read_text()
    other = copy.deepcopy(cfg)
    other.max_steps = MAX_STEPS + 1
    with pytest.raises(ValueError, match=r"result\.json: a finished run with another configuration"):
        run_online(other, progress=False)
    assert (Path(cfg.out) / "config.json").read_text() == config_json  # the run's record is left as it was


def _copy_run(cfg: OnlineConfig, burnin_dir: Path, root: Path) -> OnlineConfig:
    """The run and its burn-in copied (moved) under ``root`` (same layout), without result.json."""
    shutil.copytree(burnin_dir, root / "burnin")
    shutil.copytree(cfg.out, root / "run")
    (root / "run" / "result.json").unlink()
    return dataclasses.replace(cfg, burnin=str(root / "burnin"), out=str(root / "run"))


def test_a_moved_run_resumes_and_its_stale_temp_files_are_removed(runs, burnin_dir, tmp_path, monkeypatch):
    cfg, reference, _ = runs["control"]
    moved = _copy_run(cfg, burnin_dir, tmp_path / "moved")
    stale = Path(moved.out) / ".state.pt.q1w2e3r4.tmp"
    stale.write_bytes(b"half a file")
    monkeypatch.chdir(tmp_path)
    moved = dataclasses.replace(moved, burnin="moved/burnin", out="moved/run")  # and spelled relative
    result = run_online(moved, progress=False)
    for key in ("error_before_trigger", "error_after_trigger", "steps_run", "curve", "scores"):
        assert getattr(result, key) == getattr(reference, key), key
    assert not stale.exists()
    assert run_online(dataclasses.replace(moved, out=str(tmp_path / "moved" / "run")), progress=False) == result


@pytest.mark.parametrize("damage, problem", [
    (lambda path: path.write_bytes(path.read_bytes()[:2000]), r"not a readable torch file \(.*\)"),
    (lambda path: torch.save({"model": {}}, path), "not the online state memdisc writes")])
def test_a_damaged_state_is_an_error_naming_the_file(runs, burnin_dir, tmp_path, damage, problem):
    cfg = _copy_run(runs["control"][0], burnin_dir, tmp_path)
    state = Path(cfg.out) / "state.pt"
    damage(state)
    with pytest.raises(ValueError, match=rf"^{state}: {problem}; delete it to restart this online run from step 0"):
        run_online(cfg, progress=False)


def test_a_garbage_result_is_an_error_naming_the_file(runs, burnin_dir, tmp_path):
    cfg = _copy_run(runs["control"][0], burnin_dir, tmp_path)
    result = Path(cfg.out) / "result.json"
    result.write_text('{"config": ')
    with pytest.raises(ValueError, match=rf"^{result}: not valid JSON \(.*\); delete it to finish this online run"):
        run_online(cfg, progress=False)


def test_a_missing_burnin_dir_is_a_file_not_found_error_naming_it(tmp_path):
    missing = tmp_path / "no-burnin-here"
    cfg = online_cfg(missing, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        run_online(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="^batch_size: "):
        OnlineConfig(batch_size=0)
    with pytest.raises(ValueError, match="^history_epochs: "):
        OnlineConfig(history_epochs="1,x")


def test_the_result_round_trips_through_its_json(runs):
    """RunResult.to_json is result.json's object, key for key and in order; from_json reads it back and
    refuses an object with a missing or an unknown key, naming them."""
    cfg, result, _ = runs["ST"]
    saved = json.loads((Path(cfg.out) / "result.json").read_text())
    assert list(result.to_json()) == list(saved) and RunResult.from_json(saved) == result
    with pytest.raises(ValueError, match=r"\(missing: trigger_md; unknown: extra\)$"):
        RunResult.from_json({**{k: v for k, v in saved.items() if k != "trigger_md"}, "extra": 1})


def test_a_device_passed_down_is_not_resolved_again(runs, burnin_dir, tmp_path, monkeypatch):
    """An entry point above (compare) resolves the device once and passes it: run_online uses it as given."""
    cfg, reference, _ = runs["control"]
    moved = _copy_run(cfg, burnin_dir, tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("the device was resolved again")

    monkeypatch.setattr(online_module, "resolve_device", fail)
    result = run_online(moved, progress=False, device=torch.device("cpu"))
    assert result.error_after_trigger == reference.error_after_trigger
