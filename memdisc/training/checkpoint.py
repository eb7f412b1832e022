"""The resumable state of an online run: ``OUT/state.pt``.

One file holds the run's configuration, the state of every stateful component (model, optimizer,
defence, snapshot ring, attack; ``None`` for an absent attack) and the :class:`RunRecord` so far.
:func:`save_state` writes it atomically; :func:`load_state` restores the components in place and
returns the record, or ``None`` when there is no file (a fresh run).  (Burn-in checkpoints are
``memdisc.artifacts`` model files, written by ``memdisc.training.supervised``.)  The file also records
the number of processes of the run (``processes``; 1 in files written before it was recorded): a
run spread over several resumes only on as many."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from memdisc.artifacts import atomic_torch_save, load_torch_file
from memdisc.config import comparable, to_dict
from memdisc.eval.recorder import RunRecord
from memdisc.runtime.distributed import LOCAL, Comm, check_processes

#: The stateful components, in the order they are saved and restored.
COMPONENTS = ("model", "optimizer", "defense", "snapshots", "attack")
STATE_KEYS = {"config", *COMPONENTS, "progress", "processes"}


def save_state(path: Path, cfg: Any, components: dict[str, Any], record: RunRecord, processes: int = 1) -> None:
    """Write ``path``: ``cfg`` (a config dataclass), each component's ``state_dict()`` (None for an
    absent one), the record and the number of processes of the run."""
    atomic_torch_save({"config": to_dict(cfg), "processes": processes,
                       **{name: components[name].state_dict() if components[name] is not None else None
                          for name in COMPONENTS},
                       "progress": dataclasses.asdict(record)}, path)


def load_state(path: Path, cfg: Any, components: dict[str, Any], device: torch.device,
               comm: Comm = LOCAL) -> RunRecord | None:
    """Restore the components from ``path`` and return its record; None when ``path`` does not exist.
    ValueError naming the file for a file memdisc did not write, one of another configuration or one
    written by a run on another number of processes than ``comm``'s."""
    if not path.exists():
        return None
    remedy = "delete it to restart this online run from step 0"
    state = load_torch_file(path, remedy, device)
    if not isinstance(state, dict) or not STATE_KEYS - {"processes"} <= set(state) <= STATE_KEYS:
        raise ValueError(f"{path}: not the online state memdisc writes; {remedy}")
    check_processes(path, state.get("processes", 1), comm)
    if comparable(type(cfg), state["config"]) != comparable(type(cfg), to_dict(cfg)):
        raise ValueError(f"{path}: a run with another configuration; use another --out")
    for name in COMPONENTS:
        if components[name] is not None:
            components[name].load_state_dict(state[name])
    if comm.is_writer:
        print(f"resuming {cfg.out} at step {state['progress']['step']}")
    return RunRecord(**state["progress"])
