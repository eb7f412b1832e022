"""The resumable grid runner: every cell of a :class:`~memdisc.experiments.grid.Grid` through one
cell function, through an executor, with retries.

``run_grid(grid, run_cell)`` calls ``run_cell(cell, directory) -> payload`` for every cell whose
result file (``grid.result_path(cell)``) does not exist yet, seed by seed in the grid's order:

* resume: a finished cell is read back from its file, never run again; a cell killed part way runs
  again and picks up whatever resumable state its cell function keeps in its directory;
* the payload is written to the result file atomically unless the cell function wrote it itself
  (``run_online`` does: its ``result.json`` is that file);
* ``prepare(seed)``, if given, runs once per seed before that seed's cells, finished or not (so it
  must itself resume: compare's burn-in returns the finished one); ``finish(seed, results)`` after
  them, when none of them failed (compare's per-seed report).  An exception there stops the grid;
* a cell that fails (raises, or its worker is lost) does not stop the grid: once the seed's other
  cells have run it runs again, up to ``retries`` times (one line on stderr each time: the error
  and the attempt), unless its result file exists by then (its worker was lost after it finished:
  it is read back).  Then it becomes a :class:`~memdisc.experiments.results.CellFailure` with its
  id, printed on stderr at once (with ``progress`` off too), kept in the results file, and raised
  at the end in a :class:`GridError` (a damaged result file is such a failure too, naming the
  file, and is not retried); an interrupt (KeyboardInterrupt) stops the grid at once.  Under
  torchrun (the processes of one run, ``memdisc.runtime.distributed``) a failed cell stops the job
  instead: one rank's failure would leave the others in collectives it no longer joins; the same
  command resumes it;
* progress: one line per cell run, ``[cell i/n] ID``, and ``finished earlier, read back`` for a
  finished one;
* every result, in cell order, goes to ``root / grid.results_file`` (unless that is None) and is returned.

The executor seam: ``executor(task, cells)`` gets the pending cells of one seed at a time (after that
seed's prerequisite), runs ``task(cell)`` for every one and yields each outcome (a ``CellResult``
or a ``CellFailure``, which name their cell) in any order.  ``task`` never raises for a cell's own
error and pickles when ``run_cell`` does, so an executor may run it in other processes or on other
machines that share the run directory.  :func:`sequential`, the default, runs the cells here one by
one; :mod:`memdisc.experiments.executors` has the others (local worker processes, Ray; issue 15) and
:class:`~memdisc.experiments.executors.ExecutorConfig`, the options that pick one.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from memdisc.artifacts import write_json
from memdisc.experiments.grid import Cell, Grid
from memdisc.experiments.results import CellFailure, CellResult, GridResults, read_payload
from memdisc.runtime.distributed import process_comm

Outcome = CellResult | CellFailure


class Executor(Protocol):
    def __call__(self, task: Callable[[Cell], Outcome], cells: Sequence[Cell]) -> Iterable[Outcome]:
        """Run ``task`` on every cell and yield the outcomes (in any order)."""


def sequential(task: Callable[[Cell], Outcome], cells: Sequence[Cell]) -> Iterator[Outcome]:
    """The local executor: each cell in this process, in order."""
    for cell in cells:
        yield task(cell)


class GridError(RuntimeError):
    """Cells of a grid failed (``failures``); every other cell finished and its result was kept."""

    def __init__(self, failures: list[CellFailure], total: int):
        super().__init__(f"{len(failures)} of {total} cells failed: "
                         + "; ".join(f"{f.cell.id}: {f.error}" for f in failures))
        self.failures = failures


@dataclasses.dataclass(frozen=True)
class CellTask:
    """What an executor runs for one cell: the cell function, then its result file.  The cell's
    own exceptions become its :class:`CellFailure` (KeyboardInterrupt and other BaseExceptions
    pass)."""
    grid: Grid
    run_cell: Callable[[Cell, Path], Any]
    positions: dict[str, int]   # cell id -> its 1-based place in the grid, for the progress line
    progress: bool

    def __call__(self, cell: Cell) -> Outcome:
        if self.progress:
            print(f"[cell {self.positions[cell.id]}/{len(self.positions)}] {cell.id}", flush=True)
        try:
            payload = self.run_cell(cell, self.grid.directory(cell))
            if not isinstance(payload, self.grid.payload):
                raise TypeError(f"run_cell returned a {type(payload).__name__}, expected a "
                                f"{self.grid.payload.__name__}")
            path = self.grid.result_path(cell)
            if not path.exists():
                write_json(path, payload.to_json())
        except Exception as exc:  # the cell's failure, reported with its id; the grid goes on
            if process_comm().world_size > 1:  # under torchrun: the ranks could part ways; the job stops
                raise
            return CellFailure.of(cell, exc)
        return CellResult(self.grid.name, cell, payload)


def _report(failure: CellFailure, where: str) -> None:
    """A failed cell on stderr: one line, then its traceback if it has one."""
    print(f"{where} {failure.cell.id} failed: {failure.error}", file=sys.stderr, flush=True)
    if failure.traceback:
        print(failure.traceback, file=sys.stderr, end="", flush=True)


def run_grid(grid: Grid, run_cell: Callable[[Cell, Path], Any], *, prepare: Callable[[int], None] | None = None,
             finish: Callable[[int, list[CellResult]], None] | None = None, executor: Executor = sequential,
             retries: int = 0, progress: bool = True) -> list[CellResult]:
    """Run every cell of ``grid`` not finished yet, a failed one up to ``retries`` more times (see the
    module docstring); returns every cell's result in cell order, or raises :class:`GridError` naming
    the cells that failed."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries: expected an integer >= 0, got {retries!r}")
    cells = grid.cells()
    positions = {cell.id: i for i, cell in enumerate(cells, 1)}
    task = CellTask(grid, run_cell, positions, progress)
    results: dict[str, CellResult] = {}
    failures: list[CellFailure] = []

    def where(cell: Cell) -> str:
        return f"[cell {positions[cell.id]}/{len(cells)}]"

    def unfinished(candidates: list[Cell]) -> list[Cell]:
        """The cells without a result file; the others read back (or failed, when damaged)."""
        pending = []
        for cell in candidates:
            if not grid.result_path(cell).exists():
                pending.append(cell)
                continue
            try:
                results[cell.id] = CellResult(grid.name, cell, read_payload(grid.payload, grid.result_path(cell)))
            except ValueError as exc:
                failures.append(CellFailure.of(cell, exc))
                _report(failures[-1], where(cell))
                continue
            if progress:
                print(f"{where(cell)} {cell.id}: finished earlier, read back", flush=True)
        return pending

    for seed in grid.seeds:
        mine = [cell for cell in cells if cell.seed == seed]
        if prepare is not None:
            prepare(seed)
        pending, attempt = unfinished(mine), 1
        while pending:
            again = []
            for outcome in executor(task, pending):
                if isinstance(outcome, CellResult):
                    results[outcome.cell.id] = outcome
                elif attempt <= retries:
                    again.append(outcome.cell)
                    print(f"{where(outcome.cell)} {outcome.cell.id} failed (attempt {attempt} of {retries + 1}), "
                          f"will run again: {outcome.error}", file=sys.stderr, flush=True)
                else:
                    failures.append(outcome)
                    _report(outcome, where(outcome.cell))
            pending, attempt = unfinished(again), attempt + 1
        if finish is not None and all(cell.id in results for cell in mine):
            finish(seed, [results[cell.id] for cell in mine])
    ordered = [results[cell.id] for cell in cells if cell.id in results]
    if grid.results_file is not None:
        write_json(grid.root / grid.results_file, GridResults(grid.name, ordered, failures).to_json())
    if failures:
        raise GridError(failures, len(cells))
    return ordered
