"""The trivial baseline: a sample's loss under the model under test ("loss").

    score_i = CE(f(x_i), y_i) = -log softmax(f(x_i))_{y_i}

with ``f`` the model in eval mode: a row the model does not fit (a wrong label it has not memorised)
stands out; a backdoor the model has learned is fitted, so its poisons need not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.detectors.base import Detector, register_detector
from memdisc.detectors.model_outputs import check_labelled, logits_of

__all__ = ["LossDetector"]


@register_detector("loss")
class LossDetector(Detector):
    """Per-sample cross-entropy of the model under test (module docstring); no options, nothing to fit.
    Flags by the default rule (:meth:`Detector.flag`).

    Args:
        snapshots: None or a SnapshotSet (unused).
    """

    def __init__(self, snapshots=None):
        self.check_snapshots(snapshots)

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` float ``CE(f(x_i), y_i)``, f in eval mode (restored after), no grad; x ``[N, ...]`` in [0, 1],
        y ``[N]`` int64 labels in the model's classes.

        Raises:
            ValueError: naming ``x`` or ``y``.
        """
        check_labelled(x, y)
        logits = logits_of(model, x)
        check_labelled(x, y, logits.shape[1])
        return F.cross_entropy(logits, y, reduction="none")
