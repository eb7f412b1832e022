"""memdisc.experiments.executors and the runner's retries: a grid under local worker processes gives the
sequential run's results (each worker got the task once, at the cells' thread count); a failed cell runs
again up to --retries times, then is reported; a worker killed mid-cell is its cell's failure (retried,
or reported with the signal) and the grid does not hang; a finished cell never runs again; the options
are checked naming the flag, and stay out of a run's configuration.  Under Ray (skipped when ray does
not import): a worker killed mid-cell likewise, and a real tiny study gives the sequential run's numbers.

Cell functions are module-level (they go to other processes by reference, and there record what they
did in files, since their memory is not this process's).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_info

import memdisc
from memdisc.cli import main
from memdisc.config import build
from memdisc.experiments import Cell, GridError, GridResults, run_grid, sequential
from memdisc.artifacts import write_json
from memdisc.experiments.executors import DEFAULT_RETRIES, ExecutorConfig, ProcessExecutor, made_once

from test_experiments import Score, grid_of, score, score_kind  # noqa: F401 (score_kind: an autouse fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail the block (TimeoutError) if it runs longer than ``seconds``: a grid that hangs fails its test."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_seed(root: Path, **kwargs):
    """The grid of tests/test_experiments.py with one seed: four cells."""
    return grid_of(root, seeds=[3], **kwargs)


def log_call(directory: Path, what: str) -> None:
    """Append ``what`` to the call log in the grid's root (a cell's directory is ``ROOT/cells/seed=S/attack=A/
    fraction=F``)."""
    root = directory.parents[3]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "calls.log", "a") as log:
        log.write(what + "\n")


def calls(root: Path) -> list[str]:
    path = root / "calls.log"
    return path.read_text().split() if path.exists() else []


def score_where(cell: Cell, directory: Path) -> Score:
    """``score``'s value, with the process, its torch threads and its BLAS threads as the provenance."""
    log_call(directory, cell.id)
    blas = sorted({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})
    return Score(score(cell, directory).value, {"pid": os.getpid(), "threads": torch.get_num_threads(), "blas": blas})


class CountedUnpickling:
    """A cell function that leaves one file in ``folder`` each time it is unpickled (once per worker)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __setstate__(self, state):
        self.__dict__.update(state)
        (self.folder / f"unpickled-{os.getpid()}").touch()

    def __call__(self, cell: Cell, directory: Path) -> Score:
        return score_where(cell, directory)


def fails_once(cell: Cell, directory: Path) -> Score:
    """The noise cells raise the first time (a marker file remembers it), then succeed."""
    log_call(directory, cell.id)
    marker = directory / "failed-once"
    if cell.axes["attack"] == "noise" and not marker.exists():
        directory.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"transient trouble in {cell.id}")
    return score(cell, directory)


def always_fails_at_half(cell: Cell, directory: Path) -> Score:
    log_call(directory, cell.id)
    if cell.axes["fraction"] == 0.5 and cell.axes["attack"] == "flip":
        raise RuntimeError("this cell always breaks")
    return score(cell, directory)


def killed_once(cell: Cell, directory: Path) -> Score:
    """The cell flip/0.1 kills its own process (SIGKILL) the first time, mid-cell."""
    log_call(directory, cell.id)
    marker = directory / "killed-once"
    if cell.id.endswith("attack=flip/fraction=0.1") and not marker.exists():
        directory.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return score(cell, directory)


def killed_after_finishing(cell: Cell, directory: Path) -> Score:
    """The cell noise/0.5 writes its result file itself (as an online run does), then its process dies."""
    log_call(directory, cell.id)
    result = score(cell, directory)
    if cell.id.endswith("attack=noise/fraction=0.5"):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / Score.file).write_text(json.dumps(result.to_json()))
        os.kill(os.getpid(), signal.SIGKILL)
    return result


def hangs(cell: Cell, directory: Path) -> Score:
    """Leaves its process id in the call log, then never returns."""
    log_call(directory, str(os.getpid()))
    time.sleep(600)
    raise AssertionError("unreachable")


def needs_a_shared_file(cell: Cell, directory: Path) -> Score:
    """Every cell needs ROOT/shared.txt, which takes a while to make (as a study's backbone does)."""
    shared = directory.parents[3] / "shared.txt"
    with made_once(shared):
        if not shared.exists():
            log_call(directory, "made")
            time.sleep(0.5)
            write_json(shared, {"made by": cell.id})
    log_call(directory, cell.id)
    return score(cell, directory)


def values(results) -> list[tuple[str, float]]:
    return [(r.cell.id, r.payload.value) for r in results]


def results_file(root: Path) -> dict:
    return json.loads((root / "results.json").read_text())


def without_provenance(obj: dict) -> dict:
    """A grid results file with every cell's provenance removed."""
    for cell in obj["cells"]:
        cell["payload"].pop("provenance")
    return obj


# ----------------------------------------------------------------------------- local processes

def test_two_worker_processes_give_the_sequential_results_and_each_worker_gets_the_task_once(tmp_path,
                                                                                              monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    expected_threads = max(1, cores // 2)
    sequential_run = run_grid(grid_of(tmp_path / "seq"), score_where, progress=False)
    options = build(ExecutorConfig, {"executor": "processes", "workers": 2})
    assert options.threads == expected_threads
    (tmp_path / "pickles").mkdir()
    seen_threads = []
    with deadline(120), options.start(CPU) as executor:
        seen_threads.append(torch.get_num_threads())
        parallel = run_grid(grid_of(tmp_path / "par"), CountedUnpickling(tmp_path / "pickles"), executor=executor,
                            retries=options.retry_limit, progress=False)
    assert values(parallel) == values(sequential_run)
    assert without_provenance(results_file(tmp_path / "par")) == without_provenance(results_file(tmp_path / "seq"))
    pids = {r.payload.provenance["pid"] for r in parallel}
    assert len(pids) >= 2 and os.getpid() not in pids
    # two seeds, two workers each: the task unpickled four times, not once per cell (eight)
    assert len(list((tmp_path / "pickles").iterdir())) == 4
    assert {r.payload.provenance["threads"] for r in parallel} == {expected_threads}
    assert all(r.payload.provenance["blas"] == [expected_threads] for r in parallel)
    assert seen_threads == [expected_threads] and torch.get_num_threads() == 1  # restored after the grid


def test_omp_num_threads_sets_the_threads_of_the_worker_processes(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert build(ExecutorConfig, {"executor": "processes", "workers": 1}).threads == torch.get_num_threads() == 1


def test_a_cell_that_fails_once_runs_again_and_one_that_always_fails_is_reported_after_every_attempt(tmp_path,
                                                                                                     capsys):
    options = build(ExecutorConfig, {"executor": "processes", "workers": 2, "retries": 1})
    with deadline(120), options.start(CPU) as executor:
        results = run_grid(one_seed(tmp_path / "flaky"), fails_once, executor=executor, retries=1, progress=False)
        assert values(results) == values(run_grid(one_seed(tmp_path / "seq"), score, progress=False))
        err = capsys.readouterr().err
        assert err.count("failed (attempt 1 of 2), will run again: RuntimeError: transient trouble") == 2
        assert sorted(calls(tmp_path / "flaky")) == sorted(c.id for c in one_seed(tmp_path).cells()
                                                           for _ in range(1 + (c.axes["attack"] == "noise")))
        with pytest.raises(GridError, match=r"1 of 4 cells failed: seed=3/attack=flip/fraction=0.5: RuntimeError"):
            run_grid(one_seed(tmp_path / "bad"), always_fails_at_half, executor=executor, retries=2, progress=False)
    broken = "seed=3/attack=flip/fraction=0.5"
    assert calls(tmp_path / "bad").count(broken) == 3  # 1 + 2 retries
    saved = GridResults.from_json(results_file(tmp_path / "bad"))
    assert [f.cell.id for f in saved.failures] == [broken] and len(saved.cells) == 3
    assert "failed (attempt 2 of 3)" in capsys.readouterr().err


def test_retries_are_in_the_runner_so_the_local_executor_has_them_too(tmp_path):
    results = run_grid(one_seed(tmp_path), fails_once, retries=1, progress=False)
    assert len(results) == 4
    with pytest.raises(GridError, match="^2 of 4 cells failed"):
        run_grid(one_seed(tmp_path / "again"), fails_once, executor=sequential, retries=0, progress=False)
    with pytest.raises(ValueError, match=r"^retries: expected an integer >= 0, got -1"):
        run_grid(one_seed(tmp_path), score, retries=-1)


def test_a_worker_killed_mid_cell_is_retried_and_without_retries_reported_with_its_signal(tmp_path, capsys):
    killed = "seed=3/attack=flip/fraction=0.1"
    with deadline(120):
        with ExecutorConfig("processes", workers=2).start(CPU) as executor:
            results = run_grid(one_seed(tmp_path / "retried"), killed_once, executor=executor, retries=1,
                               progress=False)
            assert len(results) == 4 and calls(tmp_path / "retried").count(killed) == 2
            assert "the worker process running the cell died (killed by SIGKILL)" in capsys.readouterr().err
            with pytest.raises(GridError, match=f"1 of 4 cells failed: {killed}: WorkerDied: .*SIGKILL"):
                run_grid(one_seed(tmp_path / "reported"), killed_once, executor=executor, retries=0, progress=False)
    assert [f.cell.id for f in GridResults.from_json(results_file(tmp_path / "reported")).failures] == [killed]
    assert len(results_file(tmp_path / "reported")["cells"]) == 3


def test_a_cell_whose_worker_died_after_its_result_was_written_is_read_back_not_run_again(tmp_path, capsys):
    with deadline(120), ExecutorConfig("processes", workers=2).start(CPU) as executor:
        results = run_grid(one_seed(tmp_path), killed_after_finishing, executor=executor, retries=2, progress=True)
    assert values(results) == values(run_grid(one_seed(tmp_path / "seq"), score, progress=False))
    assert calls(tmp_path).count("seed=3/attack=noise/fraction=0.5") == 1
    assert "seed=3/attack=noise/fraction=0.5: finished earlier, read back" in capsys.readouterr().out


def test_finished_cells_are_not_run_again_under_worker_processes(tmp_path, capsys):
    grid = one_seed(tmp_path)
    run_grid(grid, score_where, progress=False)
    grid.result_path(grid.cells()[2]).unlink()
    (tmp_path / "calls.log").unlink()
    with deadline(120), ExecutorConfig("processes", workers=2).start(CPU) as executor:
        run_grid(grid, score_where, executor=executor, progress=True)
    assert calls(tmp_path) == [grid.cells()[2].id]
    assert capsys.readouterr().out.count("finished earlier, read back") == 3


def interrupt_when_both_run(root: Path) -> None:
    """Ctrl-C (SIGINT to this process) once two cells have logged their process ids."""
    end = time.monotonic() + 60
    while len(calls(root)) < 2 and time.monotonic() < end:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupt_stops_the_grid_and_its_worker_processes(tmp_path):
    threading.Thread(target=interrupt_when_both_run, args=(tmp_path,), daemon=True).start()
    with pytest.raises(KeyboardInterrupt), deadline(120), \
            ExecutorConfig("processes", workers=2).start(CPU) as executor:
        run_grid(one_seed(tmp_path), hangs, executor=executor, progress=False)
    pids = [int(pid) for pid in calls(tmp_path)]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_file_that_cells_running_at_once_need_is_made_once_and_its_lock_goes(tmp_path):
    with deadline(120), ExecutorConfig("processes", workers=2).start(CPU) as executor:
        run_grid(one_seed(tmp_path), needs_a_shared_file, executor=executor, progress=False)
    assert calls(tmp_path).count("made") == 1 and len(calls(tmp_path)) == 5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")) == []


def test_the_process_executor_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"^workers: expected an integer >= 1, got 0"):
        ProcessExecutor(0, 1)
    with pytest.raises(ValueError, match=r"^threads: expected an integer >= 1, got 1.5"):
        ProcessExecutor(1, 1.5)


# ----------------------------------------------------------------------------- the options

def installed(monkeypatch, present: bool) -> None:
    """importlib finds ray (``present``) or not, whether it is installed here or not."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if present else None) if name == "ray" else real(name, *a))


@pytest.fixture
def ray_installed(monkeypatch):
    installed(monkeypatch, True)


@pytest.mark.parametrize("values, message", [
    ({"executor": "threads"}, r"executor \(--executor\): expected one of local, processes, ray, got 'threads'"),
    ({"executor": "processes", "workers": 0}, r"workers \(--workers\): expected an integer >= 1, got 0"),
    ({"workers": 2}, r"workers \(--workers\): only used with --executor processes, got --executor local"),
    ({"retries": -1}, r"retries \(--retries\): expected an integer >= 0, got -1"),
    ({"executor": "ray", "ray_address": "localhost"}, r"ray_address \(--ray-address\): expected auto or HOST:PORT"),
    ({"executor": "ray", "ray_address": "10.0.0.1:70000"}, r"ray_address \(--ray-address\): expected auto"),
    ({"executor": "processes", "ray_address": "auto"}, r"ray_address \(--ray-address\): only used with --executor "
                                                       r"ray"),
    ({"executor": "ray", "cell_cpus": 0}, r"cell_cpus \(--cell-cpus\): expected a finite number > 0, got 0"),
    ({"executor": "ray", "cell_gpus": -1}, r"cell_gpus \(--cell-gpus\): expected a finite number >= 0, got -1"),
    ({"cell_gpus": 1}, r"cell_gpus \(--cell-gpus\): only used with --executor ray"),
])
def test_bad_options_are_named_as_typed(values, message, ray_installed):
    with pytest.raises(ValueError, match="^" + message):
        build(ExecutorConfig, values)


def test_good_addresses_and_the_default_retries(ray_installed):
    for address in ("auto", "10.0.0.1:6379", "head-node.cluster:6379", "[::1]:6379"):
        assert ExecutorConfig("ray", ray_address=address).ray_address == address
    assert [ExecutorConfig(e).retry_limit for e in ("local", "processes")] == [0, 2] == [DEFAULT_RETRIES["local"],
                                                                                        DEFAULT_RETRIES["processes"]]
    assert ExecutorConfig("processes", retries=0).retry_limit == 0


def test_the_ray_executor_without_ray_installed_says_how_to_install_it(monkeypatch, capsys):
    installed(monkeypatch, False)
    assert main(["study", "--executor", "ray", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memdisc study: error: executor (--executor): ray is not installed; pip install "
                          "memdisc[ray]")


@pytest.mark.parametrize("command", ["compare", "study", "detect"])
def test_every_grid_command_takes_the_executor_flags_and_names_a_bad_one(command, capsys):
    assert main([command, "--executor", "processes", "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == (f"memdisc {command}: error: workers (--workers): expected an integer "
                                               ">= 1, got 0")


def test_every_grid_command_s_configuration_pickles_for_the_workers():
    from memdisc.experiments.compare import load_compare_config
    from memdisc.experiments.detect import load_detect_config
    from memdisc.experiments.study import load_study_config
    for cfg in (load_compare_config(), load_study_config(), load_detect_config()):
        assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_the_executor_is_not_part_of_the_configuration():
    from memdisc.experiments.compare import CompareConfig
    from memdisc.experiments.detect import DetectConfig
    from memdisc.experiments.study import StudyConfig
    flags = {f.name for f in ExecutorConfig.__dataclass_fields__.values()}
    for cls in (CompareConfig, StudyConfig, DetectConfig):
        assert not flags & set(cls.__dataclass_fields__)


# ----------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance of 2 CPUs for the module's Ray tests (the executor uses it as it is); its
    workers import this module and memdisc from this tree."""
    ray = pytest.importorskip("ray")
    path = os.pathsep.join([str(Path(__file__).parent), str(Path(memdisc.__file__).parents[1]),
                            os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def test_under_ray_a_worker_killed_mid_cell_is_retried_and_a_failure_reported(ray_cluster, tmp_path, capsys):
    killed = "seed=3/attack=flip/fraction=0.1"
    with deadline(180), ExecutorConfig("ray").start(CPU) as executor:
        results = run_grid(one_seed(tmp_path / "retried"), killed_once, executor=executor, retries=1, progress=False)
        assert values(results) == values(run_grid(one_seed(tmp_path / "seq"), score, progress=False))
        assert calls(tmp_path / "retried").count(killed) == 2
        assert f"{killed} failed (attempt 1 of 2), will run again: " in capsys.readouterr().err
        with pytest.raises(GridError, match=r"1 of 4 cells failed: seed=3/attack=flip/fraction=0.5: RuntimeError"):
            run_grid(one_seed(tmp_path / "bad"), always_fails_at_half, executor=executor, retries=1, progress=False)
    assert calls(tmp_path / "bad").count("seed=3/attack=flip/fraction=0.5") == 2
    assert ray_cluster.is_initialized()  # not ours to shut down


def _numbers(obj):
    """A study cell's result without what differs between two runs of it: timings and provenance."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items() if k != "provenance" and not k.endswith("seconds")}
    return [_numbers(v) for v in obj] if isinstance(obj, list) else obj


@pytest.mark.slow
def test_a_tiny_study_under_ray_gives_the_sequential_numbers_and_resumes_locally(ray_cluster, tiny_fashion_mnist,
                                                                                  tmp_path, capsys):
    from test_study import tiny_config
    from memdisc.experiments import study
    options = {"attacks": ["label-flip"], "repeats": 1}
    sequential_run = study.run_study(tiny_config(tiny_fashion_mnist, tmp_path / "seq", **options), progress=False)
    cfg = tiny_config(tiny_fashion_mnist, tmp_path / "ray", **options)
    with deadline(300):
        on_ray = study.run_study(cfg, progress=False, executor=ExecutorConfig("ray", cell_cpus=1))
    assert [c.cell.id for c in on_ray.cells] == [c.cell.id for c in sequential_run.cells] and len(on_ray.cells) == 6
    assert not on_ray.failures
    for a, b in zip(on_ray.cells, sequential_run.cells):
        assert _numbers(a.payload.to_json()) == _numbers(b.payload.to_json()), a.cell.id
    assert json.loads((tmp_path / "ray" / "config.json").read_text())["config"] == \
        json.loads((tmp_path / "seq" / "config.json").read_text())["config"] | {"out": str(tmp_path / "ray")}
    capsys.readouterr()
    study.run_study(cfg, progress=True)  # the same directory under the local executor: nothing runs again
    assert capsys.readouterr().out.count("finished earlier, read back") == 6


@pytest.mark.slow
def test_a_tiny_comparison_under_worker_processes_gives_the_sequential_numbers(tiny_fashion_mnist, tmp_path):
    from memdisc.experiments.compare import load_compare_config, run_compare
    options = {"data_dir": str(tiny_fashion_mnist), "defenses": ["ST", "DSC-batch"], "device": "cpu",
               "burnin": {"epochs": 2}, "online": {"history_epochs": [1], "batch_size": 32, "max_steps": 3,
                                                   "eval_size": 100, "val_size": 32, "heldout_size": 64}}
    sequential_run = run_compare(load_compare_config(overrides={**options, "out": str(tmp_path / "seq")}),
                                 progress=False)
    with deadline(300):
        parallel = run_compare(load_compare_config(overrides={**options, "out": str(tmp_path / "par")}),
                               progress=False, executor=ExecutorConfig("processes", workers=2))
    assert list(parallel.runs) == ["control", "ST", "DSC-batch"]
    for name, run in parallel.runs.items():
        ours, theirs = (_numbers({k: v for k, v in r.to_json().items() if k not in ("timing", "config")})
                        for r in (run, sequential_run.runs[name]))
        assert ours == theirs, name
