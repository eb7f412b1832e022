"""``StudyResult``: the typed result of one cell of the poisoning study (``memdisc study``,
:mod:`memdisc.experiments.study`), the schema of the cell's ``result.json`` and its payload in the
grid's results (``kind`` ``"study-cell"`` in :data:`memdisc.experiments.results.PAYLOADS`).

A module of its own, beside the study, so that the results schema can know it without importing the
study (which imports the results).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from memdisc.eval.result import JsonRecord

__all__ = ["StudyResult"]


@dataclasses.dataclass
class StudyResult(JsonRecord):
    """Every number of one cell: one victim trained in one setting on one poisoned set, measured.

    Accuracies are fractions in [0, 1], losses the mean cross-entropy; ``per_class_accuracy[c]`` is
    the test accuracy on class c (None for a class absent from the test rows).  ``training`` is the
    :class:`~memdisc.training.fit.TrainingLog` as a dict (per epoch: train_loss, val_loss,
    val_error; best_epoch, stopped_early).  ``craft_seconds``: the time the attack took to make this
    poisoned set (0 for the baseline; the same for the three settings that share it).
    ``saliency``: the file of the cell's saliency maps in its directory, or None.
    """
    kind: ClassVar[str] = "study-cell"   # its name in a cell result (memdisc.experiments.results)
    file: ClassVar[str] = "result.json"  # its file in the cell's directory
    described = "study cell result"
    attack: str
    setting: str
    fraction: float
    poisoned: int                   # training rows the attack replaced
    config: dict[str, Any]          # dataset, model, sizes, the setting's and the attack's options
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    per_class_accuracy: list[float | None]
    probe_accuracy: float
    craft_seconds: float
    train_seconds: float
    training: dict[str, Any]
    saliency: str | None
    provenance: dict[str, Any]
