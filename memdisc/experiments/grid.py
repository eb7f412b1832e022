"""An experiment grid: named axes and seeds, and the cells they make.

A :class:`Grid` holds its axes (axis name -> values, e.g. ``{"attack": ["label-flip", "noise"],
"fraction": [0.1, 0.3]}``) and its seeds; its cells are every combination, in one fixed order:
seeds outermost (a seed's cells run together, after the prerequisite they share), then the
axes in the order given, each in the order of its values.  A cell's id is stable and readable,
the seed then ``axis=value`` per axis, ``seed=0/attack=noise/fraction=0.3``, and its directory
is ``root / layout`` with the layout's ``{id}``, ``{seed}`` and ``{axis}`` fields filled in
(default ``cells/{id}``; ``memdisc compare`` lays its runs out as ``runs/{run}``).

``payload`` is the class of a cell's result (``memdisc.eval.result.RunResult`` for an online
run): ``kind`` (its name in a cell result), ``file`` (its file in the cell's directory, whose
presence marks the cell finished), ``to_json()``, ``from_json(obj)`` and ``provenance``.
:func:`memdisc.experiments.runner.run_grid` runs the cells.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

# An axis value that is a string must be a name, so that ids and directories need no quoting.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def value_text(value: Any) -> str:
    """How an axis value is written in a cell id: a name as is, a number or bool as in JSON."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of a grid: the seed and one value per axis (in the grid's axis order)."""
    seed: int
    axes: dict[str, Any]

    @property
    def id(self) -> str:
        """``seed=S/axis=value/...``: stable across runs, unique in its grid."""
        return "/".join([f"seed={self.seed}", *(f"{name}={value_text(v)}" for name, v in self.axes.items())])


def _check_value(axis: str, value: Any) -> None:
    ok = (isinstance(value, str) and _NAME.fullmatch(value) is not None) or isinstance(value, bool) or \
        (isinstance(value, (int, float)) and math.isfinite(value))
    if not ok:
        raise ValueError(f"axes[{axis!r}]: expected values that are finite numbers, booleans or names (letters, "
                         f"digits, '.', '_', '+', '-'), got {value!r}")


@dataclasses.dataclass(frozen=True)
class Grid:
    """Axes x seeds -> cells (see the module docstring).

    name: recorded in every cell result ("compare", and the study and detection grids to come).
    root: the grid's directory.  axes: axis name (an identifier, not ``seed`` or ``id``) -> a
    non-empty list of distinct values.  seeds: a non-empty list of distinct seeds in [0, 2**32).
    payload: the cells' result class.  layout: a cell's directory under ``root``.
    results_file: where :func:`~memdisc.experiments.runner.run_grid` writes every cell's result
    (``memdisc.experiments.results.GridResults``) under ``root``; None when the caller writes its own.
    """
    name: str
    root: Path
    axes: dict[str, list]
    seeds: list[int]
    payload: type
    layout: str = "cells/{id}"
    results_file: str | None = "results.json"

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))
        if not isinstance(self.name, str) or _NAME.fullmatch(self.name) is None:
            raise ValueError(f"name: expected a name (letters, digits, '.', '_', '+', '-'), got {self.name!r}")
        if not isinstance(self.axes, dict):
            raise ValueError(f"axes: expected a dict of axis name -> list of values, got {self.axes!r}")
        for axis, values in self.axes.items():
            if not isinstance(axis, str) or not axis.isidentifier() or axis in ("seed", "id"):
                raise ValueError(f"axes: expected axis names that are identifiers other than seed and id, "
                                 f"got {axis!r}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"axes[{axis!r}]: expected a non-empty list of values, got {values!r}")
            for value in values:
                _check_value(axis, value)
            texts = [value_text(v) for v in values]
            if len(set(texts)) != len(texts):
                raise ValueError(f"axes[{axis!r}]: expected distinct values, got {values!r}")
        if not isinstance(self.seeds, list) or not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
                isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 32 for s in self.seeds):
            raise ValueError(f"seeds: expected a non-empty list of distinct integers in [0, 2**32), got {self.seeds!r}")
        for attr in ("kind", "file", "from_json", "to_json"):
            if not hasattr(self.payload, attr):
                raise ValueError(f"payload: expected a result class with kind, file, to_json and from_json "
                                 f"(such as memdisc.eval.result.RunResult), got {self.payload!r}")
        directories: dict[Path, str] = {}
        for cell in self.cells():
            try:
                path = self.directory(cell)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"layout: {self.layout!r} does not format ({exc!r}); its fields are id, seed and "
                                 f"the axes {', '.join(self.axes)}") from None
            if path in directories:
                raise ValueError(f"layout: cells {directories[path]} and {cell.id} share the directory {path}; "
                                 "name every axis and the seed that take more than one value in it")
            directories[path] = cell.id

    def cells(self) -> list[Cell]:
        """Every cell, seeds outermost, then the axes in order (the order the runner runs them)."""
        names = list(self.axes)
        return [Cell(seed, dict(zip(names, values)))
                for seed in self.seeds for values in itertools.product(*self.axes.values())]

    def directory(self, cell: Cell) -> Path:
        """The cell's directory: ``root / layout`` filled in."""
        fields = {name: value_text(v) for name, v in cell.axes.items()}
        return self.root / self.layout.format(id=cell.id, seed=cell.seed, **fields)

    def result_path(self, cell: Cell) -> Path:
        """The cell's result file, whose presence marks it finished."""
        return self.directory(cell) / self.payload.file
