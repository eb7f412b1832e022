"""The detector interface: a per-sample suspicion score, higher = more suspicious.

``detector.fit(model, x_clean, y_clean)`` once where the detector learns from clean data,
then ``detector.score(model, x, y) -> [N]`` for any batch.  ``DETECTORS`` maps each name to its
class; ``@register_detector(name)`` adds one, and the contract tests (tests/test_contracts.py)
then cover it.  Every registered class is built from the historical snapshots and its own
keyword options, ``cls(snapshots, **options)`` (a detector that needs no snapshots ignores them).
"""
from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import nn

__all__ = ["Detector", "DETECTORS", "register_detector"]


class Detector(abc.ABC):
    """Scores samples for how likely each is poisoned."""

    name: str = ""

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> "Detector":
        """Learn from clean samples ``x [N, ...]``, ``y [N]`` under ``model``; nothing by default."""
        return self

    @abc.abstractmethod
    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` float suspicion of each sample of ``x [N, ...]`` (labels ``y [N]`` where the
        detector reads them), higher = more suspicious; no gradient."""

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
