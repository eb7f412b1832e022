"""The one result schema of every experiment grid: a cell's result in an envelope, and the file of
a whole grid.

:class:`CellResult` is the envelope of one finished cell, the same for every grid::

    {"schema": "memdisc.cell-result/1", "grid": str, "id": "seed=S/axis=value/...", "seed": int,
     "axes": {axis: value}, "kind": str, "payload": {...}}

``payload`` is the cell's typed result as its class writes it (``kind`` names the class in
:data:`PAYLOADS`: ``"online-run"`` is ``memdisc.eval.result.RunResult``, ``result.json`` of an
online run; ``"study-cell"`` is ``memdisc.experiments.study_result.StudyResult``, a cell of
``memdisc study``; ``"detect-cell"`` is ``memdisc.experiments.detect_result.DetectResult``, a cell
of ``memdisc detect``); its provenance (versions, commit, device, seed) is the payload's own.  A cell that
failed is a :class:`CellFailure` (its id, the error and the traceback).  :class:`GridResults`
is the file that collects them (``"schema": "memdisc.grid-results/1"``, then ``grid``, ``cells``
and ``failures``).  Each ``from_json`` refuses an object of another schema or kind, naming what
it expected.
"""
from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path
from typing import Any

from memdisc.artifacts import read_json
from memdisc.eval.result import RunResult
from memdisc.experiments.grid import Cell
from memdisc.experiments.detect_result import DetectResult
from memdisc.experiments.study_result import StudyResult

#: Payload classes by ``kind``.
PAYLOADS: dict[str, type] = {cls.kind: cls for cls in (RunResult, StudyResult, DetectResult)}

CELL_SCHEMA = "memdisc.cell-result/1"
GRID_SCHEMA = "memdisc.grid-results/1"


def _check_object(obj: Any, schema: str, keys: tuple[str, ...], what: str) -> None:
    """``obj`` is a JSON object of ``schema`` with exactly ``keys``; else a ValueError saying what it is not."""
    if not isinstance(obj, dict) or obj.get("schema") != schema:
        found = obj.get("schema") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"not {what} (expected \"schema\": {schema!r}, got {found!r})")
    missing, unknown = [k for k in keys if k not in obj], sorted(set(obj) - set(keys))
    if missing or unknown:
        raise ValueError(f"not {what} (" + "; ".join(f"{label}: {', '.join(names)}" for label, names in
                                                    (("missing", missing), ("unknown", unknown)) if names) + ")")


def _cell(obj: dict[str, Any], what: str) -> Cell:
    """The cell of an object with ``id``, ``seed`` and ``axes``, its id checked against the other two."""
    if not isinstance(obj["axes"], dict) or isinstance(obj["seed"], bool) or not isinstance(obj["seed"], int):
        raise ValueError(f"not {what} (expected an integer seed and a dict of axes, got {obj['seed']!r} and "
                         f"{obj['axes']!r})")
    cell = Cell(obj["seed"], obj["axes"])
    if cell.id != obj["id"]:
        raise ValueError(f"not {what} (its id {obj['id']!r} is not that of its seed and axes, {cell.id!r})")
    return cell


@dataclasses.dataclass(frozen=True)
class CellResult:
    """One finished cell: which grid and cell it is, and its typed result."""
    grid: str
    cell: Cell
    payload: Any

    @property
    def kind(self) -> str:
        return self.payload.kind

    @property
    def provenance(self) -> dict[str, Any]:
        """Versions, commit, device and seed of the run that computed the payload."""
        return self.payload.provenance

    def to_json(self) -> dict[str, Any]:
        return {"schema": CELL_SCHEMA, "grid": self.grid, "id": self.cell.id, "seed": self.cell.seed,
                "axes": dict(self.cell.axes), "kind": self.kind, "payload": self.payload.to_json()}

    @classmethod
    def from_json(cls, obj: Any) -> CellResult:
        """The cell result of a :meth:`to_json` object; ValueError for anything else."""
        what = "a memdisc cell result"
        _check_object(obj, CELL_SCHEMA, ("schema", "grid", "id", "seed", "axes", "kind", "payload"), what)
        if obj["kind"] not in PAYLOADS:
            raise ValueError(f"not {what} memdisc can read (kind {obj['kind']!r}; known: {', '.join(PAYLOADS)})")
        return cls(obj["grid"], _cell(obj, what), PAYLOADS[obj["kind"]].from_json(obj["payload"]))


@dataclasses.dataclass(frozen=True)
class CellFailure:
    """A cell that raised: ``error`` is ``Type: message``; ``traceback`` where it was raised (empty
    for an error whose message names the option or file: a ValueError or OSError)."""
    cell: Cell
    error: str
    traceback: str

    @classmethod
    def of(cls, cell: Cell, exc: Exception) -> CellFailure:
        """The failure of ``cell`` by ``exc``, in the ``except`` block that caught it."""
        named = isinstance(exc, (ValueError, OSError))
        return cls(cell, f"{type(exc).__name__}: {exc}", "" if named else traceback.format_exc())

    def to_json(self) -> dict[str, Any]:
        return {"id": self.cell.id, "seed": self.cell.seed, "axes": dict(self.cell.axes), "error": self.error,
                "traceback": self.traceback}

    @classmethod
    def from_json(cls, obj: Any) -> CellFailure:
        keys = ("id", "seed", "axes", "error", "traceback")
        if not isinstance(obj, dict) or sorted(obj) != sorted(keys):
            raise ValueError(f"not a memdisc cell failure (expected the keys {', '.join(keys)}, got {obj!r})")
        return cls(_cell(obj, "a memdisc cell failure"), obj["error"], obj["traceback"])


@dataclasses.dataclass(frozen=True)
class GridResults:
    """Every cell of one grid run: the finished ones in cell order, then the failed ones."""
    grid: str
    cells: list[CellResult]
    failures: list[CellFailure]

    def to_json(self) -> dict[str, Any]:
        return {"schema": GRID_SCHEMA, "grid": self.grid, "cells": [c.to_json() for c in self.cells],
                "failures": [f.to_json() for f in self.failures]}

    @classmethod
    def from_json(cls, obj: Any) -> GridResults:
        _check_object(obj, GRID_SCHEMA, ("schema", "grid", "cells", "failures"), "the results of a memdisc grid")
        return cls(obj["grid"], [CellResult.from_json(c) for c in obj["cells"]],
                   [CellFailure.from_json(f) for f in obj["failures"]])

    @classmethod
    def read(cls, path: str | Path) -> GridResults:
        """The grid results in ``path``; a ValueError naming the file for anything else."""
        obj = read_json(path, "give the results file of a memdisc grid")
        try:
            return cls.from_json(obj)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def read_payload(payload: type, path: Path) -> Any:
    """The finished cell result in ``path`` (a ``payload.file``); a ValueError naming the file if damaged."""
    remedy = "delete it to run this cell again"
    obj = read_json(path, remedy)
    try:
        return payload.from_json(obj)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}; {remedy}") from None
