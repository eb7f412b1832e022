"""``DetectResult``: the typed result of one cell of the detection grid (``memdisc detect``,
:mod:`memdisc.experiments.detect`), the schema of the cell's ``result.json`` and its payload in the
grid's results (``kind`` ``"detect-cell"`` in :data:`memdisc.experiments.results.PAYLOADS`).

A module of its own, beside the grid, so that the results schema can know it without importing the
grid (which imports the results).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from memdisc.eval.result import JsonRecord

__all__ = ["DetectResult"]


@dataclasses.dataclass
class DetectResult(JsonRecord):
    """Every number of one cell: one detector scoring one poisoned training set under one suspect model
    (trained in one setting), then the set without the rows it flagged, retrained.

    Rates are fractions in [0, 1]; a positive is a poisoned row.  ``detection`` is
    :func:`memdisc.eval.detection.detection_summary` of the scores against the poisoned mask (auroc,
    tpr_at_fpr at ``fpr_target``, n_pos, n_neg, a compact ROC) plus the detector's own decision:
    ``flagged`` rows, ``tpr`` and ``fpr`` of its flags.  ``before`` and ``after`` hold the clean test
    error and the attack success rate (None for an attack without a backdoor) of the suspect model and
    of the model retrained without the flagged rows; ``after`` also its ``train_seconds`` and
    ``training`` log.  ``scores``: the file of the per-row scores, poisoned mask and flags in the
    cell's directory.
    """
    kind: ClassVar[str] = "detect-cell"   # its name in a cell result (memdisc.experiments.results)
    file: ClassVar[str] = "result.json"   # its file in the cell's directory
    described = "detection cell result"
    attack: str
    setting: str
    detector: str
    poisoned: int                   # training rows the attack replaced
    config: dict[str, Any]          # dataset, model, sizes, the setting's, attack's and detector's options
    detection: dict[str, Any]
    detect_seconds: float           # fit + score + flag
    before: dict[str, Any]
    after: dict[str, Any]
    scores: str
    provenance: dict[str, Any]
