"""Where the cells of a grid run: this process (``local``), local worker processes (``processes``) or
a Ray cluster (``ray``), chosen by :class:`ExecutorConfig` (the flags ``--executor``, ``--workers``,
``--retries``, ``--ray-address``, ``--cell-cpus``, ``--cell-gpus`` of ``memdisc compare``, ``study``
and ``detect``).

Every executor is an :class:`~memdisc.experiments.runner.Executor`: ``executor(task, cells)`` runs
``task(cell)`` for every cell and yields each outcome (a ``CellResult`` or a ``CellFailure``) as it
comes.  The task writes the cell's result file itself, in the run directory; so with Ray on several
machines that directory must be on storage every node mounts at the same path.  A worker that dies
(a signal, the out-of-memory killer, a lost Ray node) becomes a ``CellFailure`` of the cell it was
running; :func:`~memdisc.experiments.runner.run_grid` retries failed cells (``--retries``), once
every other cell of the seed has run, and never runs a cell whose result file exists.

Thread count: a cell runs with :attr:`ExecutorConfig.threads` torch threads (in a worker process or Ray
task its BLAS and OpenMP pools too, as ``OMP_NUM_THREADS`` would set them): this process's count
(``local``; also ``processes`` when ``OMP_NUM_THREADS`` is set, which torch's count follows), else
``max(1, cores // workers)`` (``processes``), the cell's CPUs rounded down, at least 1 (``ray``).
While a grid runs, this process's torch uses that count too, so what it computes itself (compare's
burn-in) and the count a study records for its resume check are the cells'.  CPU results depend on
the thread count in the last bits; everything else about the executor leaves a grid's results as
they are.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import importlib.util
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from threadpoolctl import threadpool_limits

from memdisc.config import OptionError, check_choice, check_int, check_number, field
from memdisc.experiments.grid import Cell
from memdisc.experiments.results import CellFailure
from memdisc.experiments.runner import Executor, Outcome, sequential
from memdisc.runtime.distributed import process_comm

EXECUTORS = ("local", "processes", "ray")

DEFAULT_RETRIES = {"local": 0, "processes": 2, "ray": 2}
"""Retries of a failed cell when ``--retries`` is not given.  Locally a cell's failure is its own
exception, which running it again repeats; in worker processes and on a cluster a cell also fails when
its worker is lost (killed for memory, a node preempted), which a second try usually survives, and a
cell picks up the resumable state its directory keeps."""

# HOST:PORT with a host name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(\d{1,5})")

_STOP_SECONDS = 10.0
"""How long a worker process gets to exit after it is told to, before it is terminated."""


def _cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
    """How a grid's cells run (see the module docstring); never part of a run's configuration: not
    written to config.json and not compared on resume."""
    executor: str = field("local", "where the cells run: local (one after the other in this process), "
                          "processes (--workers local processes), ray (tasks on a Ray cluster; the run "
                          "directory must be storage that every node mounts at the same path)")
    workers: int | None = field(None, "worker processes of --executor processes; each cell runs with "
                                "max(1, cores // workers) torch threads unless OMP_NUM_THREADS is set "
                                "(none: one per core)")
    retries: int | None = field(None, "times a failed cell (its error, or its worker process or Ray "
                                "worker lost) runs again before it is reported; a finished cell never "
                                "runs again (none: 0 with --executor local, 2 with processes and ray)")
    ray_address: str | None = field(None, "the Ray cluster of --executor ray: auto (the one started on "
                                    "this machine with `ray start`) or HOST:PORT of its head node "
                                    "(none: start a Ray instance on this machine for the run)")
    cell_cpus: float | None = field(None, "CPUs a cell reserves under --executor ray, and its torch "
                                    "threads (rounded down) (none: 1)")
    cell_gpus: float | None = field(None, "GPUs a cell reserves under --executor ray (none: 1 when "
                                    "the grid's device is cuda, else 0)")

    def __post_init__(self):
        check_choice("executor", self.executor, EXECUTORS)
        if self.workers is not None:
            check_int("workers", self.workers)
            _only_with("workers", "processes", self.executor)
        if self.retries is not None:
            check_int("retries", self.retries, 0)
        if self.ray_address is not None:
            if self.ray_address != "auto" and not (isinstance(self.ray_address, str) and _valid_address(
                    self.ray_address)):
                raise OptionError("ray_address", f"expected auto or HOST:PORT (a port in [1, 65535]), got "
                                                 f"{self.ray_address!r}")
            _only_with("ray_address", "ray", self.executor)
        if self.cell_cpus is not None:
            check_number("cell_cpus", self.cell_cpus, 0, strict=True)
            _only_with("cell_cpus", "ray", self.executor)
        if self.cell_gpus is not None:
            check_number("cell_gpus", self.cell_gpus, 0)
            _only_with("cell_gpus", "ray", self.executor)
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise OptionError("executor", "ray is not installed; pip install memdisc[ray] (or ray itself) to "
                                          "run the cells on a Ray cluster")

    @property
    def retry_limit(self) -> int:
        """Times a failed cell runs again: ``retries``, else :data:`DEFAULT_RETRIES` of the executor."""
        return DEFAULT_RETRIES[self.executor] if self.retries is None else self.retries

    @property
    def cpus_per_cell(self) -> float:
        """The CPUs a Ray task of a cell reserves: ``cell_cpus``, else 1."""
        return 1.0 if self.cell_cpus is None else self.cell_cpus

    @property
    def threads(self) -> int:
        """The torch threads of a cell (module docstring)."""
        if self.executor == "processes" and "OMP_NUM_THREADS" not in os.environ:
            return max(1, _cores() // (self.workers or _cores()))
        if self.executor == "ray":
            return max(1, int(self.cpus_per_cell))
        return torch.get_num_threads()

    @contextlib.contextmanager
    def start(self, device: torch.device) -> Iterator[Executor]:
        """The executor of a grid on ``device``, with this process at :attr:`threads` threads until the
        block ends (then as before); a Ray instance the executor started is shut down then."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            if self.executor == "local":
                yield sequential
            elif self.executor == "processes":
                yield ProcessExecutor(self.workers or _cores(), self.threads)
            else:
                gpus = self.cell_gpus if self.cell_gpus is not None else float(device.type == "cuda")
                with RayExecutor(self.ray_address, self.cpus_per_cell, gpus, self.threads) as executor:
                    yield executor
        finally:
            torch.set_num_threads(before)


LOCAL = ExecutorConfig()
"""The default: every cell in this process, one after the other."""


def _only_with(option: str, executor: str, chosen: str) -> None:
    if chosen != executor:
        raise OptionError(option, f"only used with --executor {executor}, got --executor {chosen}")


def _valid_address(text: str) -> bool:
    match = _ADDRESS.fullmatch(text)
    return match is not None and 1 <= int(match.group(1)) <= 65535


def _lost(cell: Cell, error: str) -> CellFailure:
    """The failure of a cell whose worker was lost or whose task did not run (no traceback: the cell
    did not raise; ``error`` says what happened)."""
    return CellFailure(cell, error, "")


def _exit_text(code: int | None) -> str:
    """How a worker process ended: ``killed by SIGKILL`` or ``exit code 1``."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@contextlib.contextmanager
def made_once(path: Path) -> Iterator[None]:
    """Hold this block while a cell reads ``path``, or makes it when it is not there: a file that cells
    running at the same time may all need (a study's clean backbone and poisoned sets, a detection
    grid's suspect models).  An exclusive ``flock`` on ``.NAME.lock`` beside it: one cell makes the file,
    the others wait and then read it (check whether ``path`` exists inside the block; write it
    atomically).  The lock file goes when the block ends; one taken by a waiting cell by then is no
    longer the file's, which is harmless because every holder checks for ``path`` first.  Where the
    file system refuses locks (some network file systems), cells that run at once each make the file,
    to the same content.  Under torchrun no lock is taken: the ranks make the file together (their
    training is collective, and rank 0 writes while the others wait: ``memdisc.runtime.distributed``);
    a lock held by one rank would leave the others out of its collectives."""
    if process_comm().world_size > 1:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as handle:
        with contextlib.suppress(OSError):  # no locks on this file system: each cell makes it
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


# ----------------------------------------------------------------------------- local processes

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _use_threads(threads: int) -> None:
    """This worker process at ``threads`` threads, as ``OMP_NUM_THREADS=threads`` would have started it:
    torch's pool, the BLAS and OpenMP pools loaded already (numpy's, which scikit-learn's probe uses:
    threadpoolctl) and those loaded later (the environment they read).  Two workers with a BLAS pool
    of every core each would oversubscribe the machine."""
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


def _serve(task: Callable[[Cell], Outcome], threads: int, conn: multiprocessing.connection.Connection) -> None:
    """A worker process: ``task`` came once, with the process; then cells in, outcomes out, until None.
    An interrupt is the parent's to handle (it stops its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _use_threads(threads)
    with contextlib.suppress(EOFError, BrokenPipeError):  # the parent went away
        while (cell := conn.recv()) is not None:
            conn.send(task(cell))


class _Worker:
    """One worker process and its end of the pipe, and the cell it runs (None when idle)."""

    def __init__(self, context: Any, task: Callable[[Cell], Outcome], threads: int):
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(task, threads, theirs), name="memdisc-cell-worker")
        self.process.start()
        theirs.close()
        self.cell: Cell | None = None

    def give(self, cell: Cell) -> None:
        self.cell = cell
        with contextlib.suppress(OSError):  # a worker that died meanwhile: its sentinel reports it
            self.conn.send(cell)

    def outcome(self) -> tuple[Outcome, bool]:
        """The outcome of its cell once the pipe or the process is ready, and whether the worker lives."""
        cell, self.cell = self.cell, None
        try:
            if self.conn.poll():
                return self.conn.recv(), True
        except (EOFError, OSError):
            pass
        self.process.join(_STOP_SECONDS)
        return _lost(cell, f"WorkerDied: the worker process running the cell died "
                           f"({_exit_text(self.process.exitcode)})"), False

    def stop(self) -> None:
        """Tell an idle worker to exit; terminate a busy one (or one that does not exit)."""
        if self.cell is None and self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(_STOP_SECONDS)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.conn.close()


def _start_method() -> Any:
    """The multiprocessing context of the workers: forkserver where there is one (workers fork from a
    server process that imported torch and memdisc but never ran an op, so no thread pool is forked;
    a worker starts in well under a second), else spawn (a fresh interpreter, seconds)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["memdisc.experiments.runner"])
    return context


class ProcessExecutor:
    """``workers`` local processes (never forked from this process, which may hold torch threads:
    :func:`_start_method`), each at ``threads`` torch threads.  Each worker gets the task once, when it
    starts (a study's cell function holds the seed's data), then one cell at a time.  A worker that dies
    is reported as its cell's failure (exit code or signal) and replaced; the other workers go on."""

    def __init__(self, workers: int, threads: int):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: expected an integer >= 1, got {workers!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected an integer >= 1, got {threads!r}")
        self.workers, self.threads = workers, threads

    def __call__(self, task: Callable[[Cell], Outcome], cells: Sequence[Cell]) -> Iterator[Outcome]:
        context = _start_method()
        queue = collections.deque(cells)
        idle: list[_Worker] = []
        busy: list[_Worker] = []
        try:
            while queue or busy:
                while queue and len(busy) < self.workers:
                    worker = idle.pop() if idle else _Worker(context, task, self.threads)
                    worker.give(queue.popleft())
                    busy.append(worker)
                ready = set(multiprocessing.connection.wait([w.conn for w in busy] +
                                                            [w.process.sentinel for w in busy]))
                for worker in [w for w in busy if w.conn in ready or w.process.sentinel in ready]:
                    busy.remove(worker)
                    outcome, alive = worker.outcome()
                    if alive:
                        idle.append(worker)
                    else:
                        worker.stop()
                    yield outcome
        finally:
            for worker in idle + busy:
                worker.stop()


# ----------------------------------------------------------------------------- Ray

def _run_in_ray(task: Callable[[Cell], Outcome], threads: int, cell: Cell) -> Outcome:
    """One cell as a Ray task, at ``threads`` threads (:func:`_use_threads`)."""
    _use_threads(threads)
    return task(cell)


class RayExecutor:
    """Each cell a Ray task reserving ``cpus`` CPUs and ``gpus`` GPUs (Ray gives it its GPUs as
    ``cuda``), at ``threads`` torch threads; the task goes into the object store once per call (per
    seed).  Ray is connected to on the first call: ``address`` (``auto`` or ``HOST:PORT``), or a Ray
    instance started on this machine when None, which the executor shuts down when its ``with``
    block ends; a Ray connection this process already has is used as it is.  Ray's own retries are
    off (the runner retries); a lost worker or node becomes the cell's failure.  Every node needs
    memdisc and the run directory at the same path."""

    def __init__(self, address: str | None, cpus: float, gpus: float, threads: int):
        self.address, self.cpus, self.gpus, self.threads = address, cpus, gpus, threads
        self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._started:
            import ray
            ray.shutdown()
            self._started = False

    def _ray(self):
        import ray
        if not ray.is_initialized():
            ray.init(address=self.address)
            self._started = True
        return ray

    def __call__(self, task: Callable[[Cell], Outcome], cells: Sequence[Cell]) -> Iterator[Outcome]:
        ray = self._ray()
        remote = ray.remote(_run_in_ray).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0,
                                                 retry_exceptions=False, name="memdisc-cell")
        shared = ray.put(task)
        running = {remote.remote(shared, self.threads, cell): cell for cell in cells}
        try:
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                cell = running.pop(done[0])
                try:
                    outcome = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the worker or node lost, or the task not run
                    outcome = _lost(cell, f"{type(exc).__name__}: {exc}")
                yield outcome
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
