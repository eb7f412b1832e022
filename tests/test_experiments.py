"""memdisc.experiments: a grid's cells (order, ids, directories), the resumable runner (resume, failures
reported by id, prerequisites, the executor seam) and the one result schema (the envelope, the grid's
results file, foreign files refused).  Tiny cell functions only: tests/test_compare.py runs real cells."""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any, ClassVar

import pytest

from memdisc.artifacts import write_json
from memdisc.eval.result import RunResult
from memdisc.experiments import (PAYLOADS, Cell, CellFailure, CellResult, Grid, GridError, GridResults, run_grid,
                                 sequential)
from memdisc.experiments.runner import CellTask


@dataclasses.dataclass
class Score:
    """A payload as small as a payload can be."""
    kind: ClassVar[str] = "test-score"
    file: ClassVar[str] = "score.json"
    value: float
    provenance: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "provenance": self.provenance}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Score:
        if sorted(obj) != ["provenance", "value"]:
            raise ValueError(f"not a score (keys {sorted(obj)})")
        return cls(**obj)


@pytest.fixture(autouse=True)
def score_kind(monkeypatch):
    monkeypatch.setitem(PAYLOADS, Score.kind, Score)


def score(cell: Cell, directory: Path) -> Score:
    """The cell function of most tests: a number made of the cell's seed and axes."""
    return Score(cell.seed * 100 + 10 * ["noise", "flip"].index(cell.axes["attack"]) + cell.axes["fraction"],
                 {"seed": cell.seed})


def grid_of(root: Path, **kwargs) -> Grid:
    values = dict(name="study", root=root, axes={"attack": ["noise", "flip"], "fraction": [0.1, 0.5]}, seeds=[1, 0],
                  payload=Score)
    values.update(kwargs)
    return Grid(**values)


class Counting:
    """A cell function that counts its calls by cell id (picklable: a module-level class)."""

    def __init__(self, fail: tuple[str, ...] = (), error: type[Exception] = RuntimeError):
        self.calls: list[str] = []
        self.fail, self.error = fail, error

    def __call__(self, cell: Cell, directory: Path) -> Score:
        self.calls.append(cell.id)
        if cell.id in self.fail:
            raise self.error(f"cell {cell.id} broke")
        return score(cell, directory)


# ----------------------------------------------------------------------------- cells

def test_cells_come_seed_first_then_the_axes_in_order_with_stable_ids(tmp_path):
    grid = grid_of(tmp_path)
    ids = [c.id for c in grid.cells()]
    assert ids == [f"seed={s}/attack={a}/fraction={f}" for s in (1, 0) for a in ("noise", "flip") for f in (0.1, 0.5)]
    assert grid.cells()[5] == Cell(0, {"attack": "noise", "fraction": 0.5})
    assert grid.directory(grid.cells()[0]) == tmp_path / "cells" / "seed=1" / "attack=noise" / "fraction=0.1"
    assert grid.result_path(grid.cells()[0]).name == "score.json"
    laid = grid_of(tmp_path, layout="{attack}-s{seed}/f{fraction}")
    assert laid.directory(laid.cells()[3]) == tmp_path / "flip-s1" / "f0.5"
    booleans = grid_of(tmp_path, axes={"augment": [True, False], "steps": [10]}, seeds=[0])
    assert [c.id for c in booleans.cells()] == ["seed=0/augment=true/steps=10", "seed=0/augment=false/steps=10"]


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "my study"}, r"^name: expected a name"),
    ({"axes": [("attack", ["noise"])]}, r"^axes: expected a dict"),
    ({"axes": {"seed": [1]}}, r"^axes: expected axis names that are identifiers other than seed and id, got 'seed'"),
    ({"axes": {"a-b": [1]}}, r"^axes: expected axis names"),
    ({"axes": {"attack": []}}, r"^axes\['attack'\]: expected a non-empty list of values, got \[\]"),
    ({"axes": {"attack": "noise"}}, r"^axes\['attack'\]: expected a non-empty list of values, got 'noise'"),
    ({"axes": {"attack": ["noise", "noise"]}}, r"^axes\['attack'\]: expected distinct values"),
    ({"axes": {"attack": ["../up"]}}, r"^axes\['attack'\]: expected values that are finite numbers, booleans or "
                                      r"names .*, got '\.\./up'"),
    ({"axes": {"attack": ["a b"]}}, r"^axes\['attack'\]: expected values"),
    ({"axes": {"fraction": [float("nan")]}}, r"^axes\['fraction'\]: expected values"),
    ({"axes": {"attack": [None]}}, r"^axes\['attack'\]: expected values"),
    ({"seeds": []}, r"^seeds: expected a non-empty list of distinct integers in \[0, 2\*\*32\)"),
    ({"seeds": [0, 0]}, r"^seeds: expected a non-empty list of distinct"),
    ({"seeds": [-1]}, r"^seeds: expected"), ({"seeds": [True]}, r"^seeds: expected"),
    ({"payload": dict}, r"^payload: expected a result class with kind, file, to_json and from_json"),
    ({"layout": "{attack}/{dataset}"}, r"^layout: '\{attack\}/\{dataset\}' does not format \(KeyError\('dataset'\)\); "
                                       r"its fields are id, seed and the axes attack, fraction"),
    ({"layout": "runs/{attack}"}, r"^layout: cells seed=1/attack=noise/fraction=0.1 and "
                                  r"seed=1/attack=noise/fraction=0.5 share the directory")])
def test_a_bad_grid_is_refused_naming_the_argument(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        grid_of(tmp_path, **kwargs)


# ----------------------------------------------------------------------------- the runner

def test_every_cell_runs_once_and_its_result_is_kept(tmp_path, capsys):
    grid, fn = grid_of(tmp_path), Counting()
    results = run_grid(grid, fn)
    assert fn.calls == [c.id for c in grid.cells()]
    assert [r.cell for r in results] == grid.cells() and all(r.grid == "study" for r in results)
    assert [r.payload.value for r in results[:4]] == [100.1, 100.5, 110.1, 110.5]
    for r in results:
        assert json.loads(grid.result_path(r.cell).read_text()) == r.payload.to_json()
    saved = GridResults.read(tmp_path / "results.json")
    assert saved == GridResults("study", results, []) and saved.cells[0].provenance == {"seed": 1}
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[cell 1/8] seed=1/attack=noise/fraction=0.1" and out[-1].startswith("[cell 8/8] seed=0/")


def test_a_second_run_runs_no_cell_and_a_deleted_result_reruns_only_its_cell(tmp_path, capsys):
    grid, fn = grid_of(tmp_path), Counting()
    first = run_grid(grid, fn)
    again = Counting()
    assert run_grid(grid, again, progress=False) == first and again.calls == []
    capsys.readouterr()
    grid.result_path(grid.cells()[6]).unlink()
    third = run_grid(grid, again)
    assert again.calls == ["seed=0/attack=flip/fraction=0.1"] and third == first
    out = capsys.readouterr().out.splitlines()
    assert "[cell 1/8] seed=1/attack=noise/fraction=0.1: finished earlier, read back" in out
    assert "[cell 7/8] seed=0/attack=flip/fraction=0.1" in out


def test_a_failing_cell_is_reported_with_its_id_and_the_others_finish(tmp_path, capsys):
    broken = "seed=1/attack=flip/fraction=0.1"
    grid, fn = grid_of(tmp_path), Counting(fail=(broken,))
    finished = []
    with pytest.raises(GridError) as info:
        run_grid(grid, fn, finish=lambda seed, results: finished.append(seed))
    assert fn.calls == [c.id for c in grid.cells()]  # the grid went on after the failure
    assert str(info.value) == f"1 of 8 cells failed: {broken}: RuntimeError: cell {broken} broke"
    [failure] = info.value.failures
    assert failure.cell.id == broken and "Traceback" in failure.traceback and "broke" in failure.traceback
    assert finished == [0]  # seed 1 has a failed cell: no per-seed finish
    saved = GridResults.read(tmp_path / "results.json")
    assert [f.cell.id for f in saved.failures] == [broken] and len(saved.cells) == 7
    err = capsys.readouterr().err
    assert f"[cell 3/8] {broken} failed: RuntimeError: cell {broken} broke\nTraceback" in err
    assert not grid.result_path(failure.cell).exists()
    retry = Counting()
    results = run_grid(grid, retry, finish=lambda seed, results: finished.append(seed), progress=False)
    assert retry.calls == [broken] and len(results) == 8 and finished == [0, 1, 0]
    assert GridResults.read(tmp_path / "results.json").failures == []


def test_a_named_error_fails_its_cell_without_a_traceback(tmp_path, capsys):
    grid = grid_of(tmp_path, seeds=[0])
    with pytest.raises(GridError) as info:
        run_grid(grid, Counting(fail=("seed=0/attack=noise/fraction=0.5",), error=ValueError), progress=False)
    assert info.value.failures[0].traceback == ""
    assert capsys.readouterr().err == ("[cell 2/4] seed=0/attack=noise/fraction=0.5 failed: ValueError: cell "
                                       "seed=0/attack=noise/fraction=0.5 broke\n")


def test_a_damaged_result_file_is_a_failure_naming_the_file(tmp_path):
    grid = grid_of(tmp_path, seeds=[0])
    run_grid(grid, Counting(), progress=False)
    damaged = grid.result_path(grid.cells()[1])
    damaged.write_text('{"value": 1}')
    again = Counting()
    with pytest.raises(GridError, match=rf"1 of 4 cells failed: seed=0/attack=noise/fraction=0.5: ValueError: "
                                        rf"{damaged}: not a score \(keys \['value'\]\); delete it to run this cell "
                                        "again"):
        run_grid(grid, again, progress=False)
    assert again.calls == []
    damaged.unlink()
    assert len(run_grid(grid, again, progress=False)) == 4 and again.calls == ["seed=0/attack=noise/fraction=0.5"]


def test_a_wrong_payload_is_the_cell_s_failure(tmp_path):
    grid = grid_of(tmp_path, seeds=[0], axes={"attack": ["noise"], "fraction": [0.1]})
    with pytest.raises(GridError, match=r"seed=0/attack=noise/fraction=0.1: TypeError: run_cell returned a dict, "
                                        "expected a Score"):
        run_grid(grid, lambda cell, directory: {"value": 1.0}, progress=False)


def test_a_killed_cell_runs_again_from_its_own_state(tmp_path):
    """An interrupt is not a failure: it stops the grid at once; run again, the cell resumes from what it kept."""
    grid = grid_of(tmp_path, seeds=[0], axes={"attack": ["noise"], "fraction": [0.1, 0.5]})

    def resumable(cell: Cell, directory: Path) -> Score:
        state = directory / "state.json"
        if not state.exists():
            write_json(state, {"half": cell.axes["fraction"]})
            raise KeyboardInterrupt
        return Score(json.loads(state.read_text())["half"] * 2, {})

    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, resumable, progress=False)
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(KeyboardInterrupt):  # the first cell finishes from its state, the second is interrupted
        run_grid(grid, resumable, progress=False)
    assert [r.payload.value for r in run_grid(grid, resumable, progress=False)] == [0.2, 1.0]


def test_prepare_runs_once_per_seed_before_its_cells_and_finish_after_them(tmp_path):
    grid, events = grid_of(tmp_path, axes={"attack": ["noise"], "fraction": [0.1, 0.5]}), []

    def cell_fn(cell: Cell, directory: Path) -> Score:
        events.append(cell.id)
        return score(cell, directory)
    run_grid(grid, cell_fn, prepare=lambda seed: events.append(f"prepare {seed}"),
             finish=lambda seed, results: events.append(f"finish {seed}: {[r.payload.value for r in results]}"),
             progress=False)
    assert events == ["prepare 1", "seed=1/attack=noise/fraction=0.1", "seed=1/attack=noise/fraction=0.5",
                      "finish 1: [100.1, 100.5]", "prepare 0", "seed=0/attack=noise/fraction=0.1",
                      "seed=0/attack=noise/fraction=0.5", "finish 0: [0.1, 0.5]"]
    events.clear()
    run_grid(grid, cell_fn, prepare=lambda seed: events.append(f"prepare {seed}"), progress=False)
    assert events == ["prepare 1", "prepare 0"]  # finished cells still get their prerequisite (it resumes)


def test_the_executor_decides_how_and_in_what_order_cells_run(tmp_path):
    """Outcomes may come back in any order; the tasks cross a process boundary (pickle) when the cell
    function does, as the process and Ray executors of issue 15 need."""
    grid, fn = grid_of(tmp_path), Counting()
    submitted = []

    def reversed_in_copies(task, cells):
        submitted.append([c.id for c in cells])
        return [pickle.loads(pickle.dumps(task))(cell) for cell in reversed(cells)]
    results = run_grid(grid, fn, executor=reversed_in_copies, progress=False)
    assert [r.cell for r in results] == grid.cells()  # in cell order whatever the executor's order
    assert [len(batch) for batch in submitted] == [4, 4]  # one batch per seed, after its prerequisite
    assert fn.calls == []  # every cell ran in a copy of the task
    assert list(sequential(lambda cell: cell.id, grid.cells()[:2])) == [c.id for c in grid.cells()[:2]]
    task = CellTask(grid, score, {c.id: i for i, c in enumerate(grid.cells(), 1)}, progress=False)
    assert pickle.loads(pickle.dumps(task))(grid.cells()[0]) == results[0]


# ----------------------------------------------------------------------------- the result schema

def run_result() -> RunResult:
    return RunResult(config={"defense": "ST", "history_epochs": [1]}, defense="ST", attack=True,
                     error_after_burnin=0.1, error_before_trigger=0.12, error_after_trigger=0.3, error_delta=0.18,
                     steps_run=4, stop_reason="reached max_steps=4", stop_error=0.15, trigger_md=0.02,
                     curve={"step": [0, 1]}, detection={"per_sample": None, "per_batch": None},
                     scores={"poisoned": [0.5], "clean": [0.1]}, timing={"online_seconds": 1.0},
                     provenance={"commit": "abc", "seed": 0}, picture={"file": None, "step": None, "corrected": None})


def test_the_envelope_round_trips_for_every_kind():
    online = CellResult("compare", Cell(0, {"run": "ST"}), run_result())
    obj = json.loads(json.dumps(online.to_json()))
    assert obj == {"schema": "memdisc.cell-result/1", "grid": "compare", "id": "seed=0/run=ST", "seed": 0,
                   "axes": {"run": "ST"}, "kind": "online-run", "payload": run_result().to_json()}
    assert CellResult.from_json(obj) == online and online.provenance == {"commit": "abc", "seed": 0}
    small = CellResult("study", Cell(2, {"attack": "flip", "fraction": 0.3}), Score(0.25, {}))
    assert CellResult.from_json(json.loads(json.dumps(small.to_json()))) == small
    failure = CellFailure(Cell(1, {"run": "GC"}), "RuntimeError: x", "Traceback ...")
    grid = GridResults("compare", [online], [failure])
    assert GridResults.from_json(json.loads(json.dumps(grid.to_json()))) == grid


@pytest.mark.parametrize("change, message", [
    (lambda o: {}, r"^not a memdisc cell result \(expected \"schema\": 'memdisc.cell-result/1', got None\)$"),
    (lambda o: [o], r"^not a memdisc cell result \(expected \"schema\": 'memdisc.cell-result/1', got 'list'\)$"),
    (lambda o: {**o, "schema": "memdisc.cell-result/2"}, r"got 'memdisc.cell-result/2'\)$"),
    (lambda o: {**o, "extra": 1}, r"^not a memdisc cell result \(unknown: extra\)$"),
    (lambda o: {k: v for k, v in o.items() if k != "axes"}, r"^not a memdisc cell result \(missing: axes\)$"),
    (lambda o: {**o, "kind": "detection"}, r"^not a memdisc cell result memdisc can read \(kind 'detection'; "
                                           r"known: online-run"),
    (lambda o: {**o, "id": "seed=0/run=GC"}, r"its id 'seed=0/run=GC' is not that of its seed and axes, "
                                             r"'seed=0/run=ST'"),
    (lambda o: {**o, "seed": "0"}, r"expected an integer seed and a dict of axes"),
    (lambda o: {**o, "payload": {"steps_run": 3}}, r"^not the online result memdisc writes \(missing: config")])
def test_a_foreign_object_is_refused_saying_what_it_is_not(change, message):
    obj = CellResult("compare", Cell(0, {"run": "ST"}), run_result()).to_json()
    with pytest.raises(ValueError, match=message):
        CellResult.from_json(change(obj))


def test_a_foreign_results_file_is_refused_naming_the_file(tmp_path):
    result_json = tmp_path / "result.json"
    write_json(result_json, run_result().to_json())
    with pytest.raises(ValueError, match=rf"^{result_json}: not the results of a memdisc grid \(expected \"schema\": "
                                         r"'memdisc.grid-results/1', got None\)$"):
        GridResults.read(result_json)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("[1, 2")
    with pytest.raises(ValueError, match=rf"^{garbage}: not valid JSON"):
        GridResults.read(garbage)
    cells = tmp_path / "cells.json"
    write_json(cells, {"schema": "memdisc.grid-results/1", "grid": "g", "cells": [{"schema": "x"}], "failures": []})
    with pytest.raises(ValueError, match=rf"^{cells}: not a memdisc cell result"):
        GridResults.read(cells)
