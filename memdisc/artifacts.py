"""Files a run writes: atomic writes, provenance, run directories, model files.

Every file is written to a temporary name in the same directory and renamed
into place, so a killed run never leaves a half-written file behind; the
temporary file a kill leaves (``.NAME.XXXXXXXX.tmp``) is removed by
:func:`remove_stale_temp_files` when the run starts again.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

import memdisc
from memdisc.runtime.distributed import process_comm


# The temporary names of atomic_write_bytes: mkstemp's prefix ".NAME." + 8 characters of [a-z0-9_] + ".tmp"
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file ``.NAME.XXXXXXXX.tmp`` + fsync + os.replace).

    An OSError (read-only or full directory, a file where a folder should be) is raised again
    naming ``path`` and what to check.

    Under torch.distributed (``memdisc.runtime.distributed``) every rank calls this at the same point:
    they all wait until each has arrived, rank 0 writes, and they wait again, so the file exists for
    every rank afterwards and no rank checks for it while rank 0 writes it; when rank 0 cannot write it,
    every rank raises an OSError.
    """
    path = Path(path)
    comm = process_comm()
    comm.barrier()
    error = None
    if comm.is_writer:
        try:
            _write_bytes(path, data)
        except OSError as exc:
            error = exc
    if comm.agree(error is not None):  # every rank raises when rank 0 could not write
        raise error if error is not None else OSError(errno.EIO, "rank 0 could not write it (its error is on its stderr)", str(path))
    return path


def _write_bytes(path: Path, data: bytes) -> None:
    """The write of :func:`atomic_write_bytes`, on this process."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write it ({exc.strerror}); check that its directory is writable "
                          "and has free space", str(path)) from exc
        raise


def remove_stale_temp_files(*directories: str | Path) -> list[Path]:
    """Delete the temporary files that a run killed inside :func:`atomic_write_bytes` left in
    ``directories`` (each one level, not recursive; missing folders are skipped).

    Only names of memdisc's own pattern ``.NAME.XXXXXXXX.tmp`` are touched.  Call it when a run
    (re)starts in directories it owns, after checking that they hold this run.  Returns the
    removed paths (none on a rank other than 0 of a distributed run: those are rank 0's).
    """
    removed = []
    if not process_comm().is_writer:  # rank 0's own files, which it may be writing now
        return removed
    for directory in map(Path, directories):
        if directory.is_dir():
            for path in sorted(directory.iterdir()):
                if _TEMP_NAME.fullmatch(path.name) and path.is_file():
                    path.unlink()
                    removed.append(path)
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, remedy: str, objects: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object in ``path``, whose keys ``objects`` must hold JSON objects; otherwise a
    ValueError naming the file, what is wrong and ``remedy`` (what to do)."""
    try:
        value = json.loads(Path(path).read_bytes())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({exc}); {remedy}") from exc
    if not isinstance(value, dict) or not all(isinstance(value.get(k), dict) for k in objects):
        wanted = f" with {', '.join(objects)}" if objects else ""
        raise ValueError(f"{path}: not the JSON object{wanted} memdisc writes; {remedy}")
    return value


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def git_commit() -> str:
    """The commit of the memdisc checkout (with '+dirty' when it has local changes), or 'unknown'."""
    root = Path(memdisc.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        # --no-optional-locks: a status query must not take .git/index.lock (it would race concurrent commits)
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"


def cpu_instruction_sets() -> dict[str, str]:
    """Which instruction set computed a CPU result: the CPU, and what each kernel family used.

    ``memdisc``: memdisc's CPU kernels (capped by MEMDISC_CPU_ISA); ``aten``: torch's own
    kernels (capped by ATEN_CPU_CAPABILITY); ``onednn``: the cap on oneDNN's convolutions and
    matmuls (ONEDNN_MAX_CPU_ISA, "unrestricted" when unset: the best the CPU has).
    """
    from memdisc.ops.extension import kernel_isa

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "memdisc": kernel_isa(),
            "aten": torch.backends.cpu.get_cpu_capability(),
            "onednn": os.environ.get("ONEDNN_MAX_CPU_ISA", "unrestricted")}


def provenance(seed: int | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions, commit, device, CPU instruction sets, seed and the number of processes (torch.distributed
    ranks) to record beside every result."""
    from memdisc.ops import extension_loaded

    import numpy
    return {"memdisc": memdisc.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "commit": git_commit(), "device": device_name(device),
            "cpu_isa": cpu_instruction_sets(), "extension": extension_loaded(), "seed": seed,
            "processes": process_comm().world_size}


MODEL_FILE_FORMAT = "memdisc-model-1"
"""The ``format`` tag of a model file; files written before the rename carry ``memdisc-snapshot-1``
(the same layout), and load unchanged."""
_READABLE_FORMATS = (MODEL_FILE_FORMAT, "memdisc-snapshot-1")


def save_model_file(path: str | Path, *, model: torch.nn.Module, model_spec: dict[str, Any], epoch: int,
                    test_error: float, config: dict[str, Any], seed: int,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Atomically save a model file: a network with what rebuilds it (the burn-in's historical
    snapshots ``snapshots/epoch_NNN.pt`` and its resumable ``checkpoint.pt`` are such files).

    The file holds: ``format`` (:data:`MODEL_FILE_FORMAT`), ``state_dict``, ``model_spec`` (the
    ``build_model`` kwargs, so the network can be rebuilt without the config), ``optimizer`` state,
    ``epoch``, ``test_error``, the full ``config``, ``seed``, ``provenance`` and ``extra``.
    """
    payload = {"format": MODEL_FILE_FORMAT, "state_dict": model.state_dict(), "model_spec": model_spec,
               "optimizer": optimizer.state_dict() if optimizer is not None else None, "epoch": epoch,
               "test_error": test_error, "config": config, "seed": seed,
               "provenance": provenance(seed, next(model.parameters()).device),
               "extra": extra or {}}
    return atomic_torch_save(payload, path)


def load_torch_file(path: str | Path, remedy: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a file memdisc wrote; a damaged file is a ValueError naming it and ``remedy``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ValueError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc}); {remedy}") from exc


_MODEL_FILE_REMEDY = "the file is damaged: run the burn-in again in a fresh --out directory"


def load_model_file(path: str | Path, remedy: str = _MODEL_FILE_REMEDY) -> dict[str, Any]:
    """Load a model file written by ``save_model_file``; errors naming the file for a missing, damaged
    (ending in ``remedy``: what to do) or foreign one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file (run `memdisc burnin` first)")
    payload = load_torch_file(path, remedy)
    if not isinstance(payload, dict) or payload.get("format") not in _READABLE_FORMATS:
        raise ValueError(f"{path}: not a memdisc model file; {remedy}")
    return payload


def model_from_file(payload: dict[str, Any], device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the network recorded in a model file's payload (``load_model_file``) and load its weights."""
    from memdisc.models import build_model

    model = build_model(**payload["model_spec"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device)
