"""The detector interface: a per-sample suspicion score, higher = more suspicious, and the
detector's own rule for which scores it flags.

``detector.fit(model, x_clean, y_clean)`` once where the detector learns from clean data,
then ``detector.score(model, x, y) -> [N]`` and ``detector.flag(scores, y) -> [N] bool``.
``DETECTORS`` maps each name to its class; ``@register_detector(name)`` adds one, and the contract
tests (tests/test_contracts.py) then cover it.  Every registered class is built from the
historical snapshots and its own keyword options, ``cls(snapshots, **options)``: a detector
that reads them (``needs_snapshots``, MD) takes a :class:`~memdisc.snapshots.SnapshotSet`, the
others take None or a SnapshotSet, which they ignore.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import nn

from memdisc.checks import describe
from memdisc.detectors.thresholds import check_scores, tail_threshold
from memdisc.snapshots import SnapshotSet

__all__ = ["Detector", "DETECTORS", "register_detector"]


class Detector(abc.ABC):
    """Scores samples for how likely each is poisoned, and flags the suspicious ones."""

    name: str = ""
    needs_snapshots: bool = False
    """True: built from the historical snapshots (a SnapshotSet); False: from None or a SnapshotSet (ignored)."""

    @classmethod
    def check_snapshots(cls, snapshots) -> None:
        """``snapshots`` a SnapshotSet, or also None where the detector does not read them.

        Raises:
            ValueError: naming ``snapshots``.
        """
        if isinstance(snapshots, SnapshotSet) or (snapshots is None and not cls.needs_snapshots):
            return
        expected = "a SnapshotSet" if cls.needs_snapshots else "None or a SnapshotSet (unused)"
        raise ValueError(f"snapshots: {cls.__name__} takes {expected}, got {describe(snapshots)}")

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> "Detector":
        """Learn from clean samples ``x [N, ...]``, ``y [N]`` under ``model``; nothing by default."""
        return self

    @abc.abstractmethod
    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` float suspicion of each sample of ``x [N, ...]`` (labels ``y [N]`` where the
        detector reads them), higher = more suspicious; no gradient."""

    def flag(self, scores: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` bool: the rows this detector calls poisoned, from its own ``scores [N]`` of a whole
        set (``y [N]``, the set's labels, where the rule reads them; checked when given).

        Default rule: the Gaussian tail of the lower half (:func:`~memdisc.detectors.thresholds.tail_threshold`),
        ``scores >= mu + sigma * sqrt(-2 ln 1e-6)``.

        Raises:
            ValueError: naming ``scores`` (not a non-empty [N] float tensor of finite values) or ``y``.
        """
        check_scores(scores, y)
        return scores.double() >= tail_threshold(scores)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"state: expected the empty state of {type(self).__name__}, got keys {sorted(state)}")


DETECTORS: dict[str, type[Detector]] = {}
"""Every detector by name (filled by ``register_detector`` as memdisc.detectors is imported)."""


def register_detector(name: str) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: add the class to ``DETECTORS`` under ``name`` (and set its ``name``)."""
    def register(cls: type[Detector]) -> type[Detector]:
        if name in DETECTORS:
            raise ValueError(f"name: a detector named {name!r} is already registered ({DETECTORS[name].__name__})")
        cls.name = name
        DETECTORS[name] = cls
        return cls
    return register
