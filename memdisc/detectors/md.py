"""Memorization Discrepancy as a detector: the per-sample KL between the outputs of a
model's historical snapshots and its current outputs, ``KL(p_snapshot(x) || p_current(x))``,
reduced over the K snapshots (Zhu et al., ICML 2023).  Higher = more suspicious."""
from __future__ import annotations

import torch
from torch import nn

from memdisc.checks import check_batch, check_samples, describe
from memdisc.detectors.base import Detector, register_detector
from memdisc.eval.classification import eval_mode
from memdisc.snapshots import SnapshotSet

__all__ = ["MDDetector", "discrepancy_scores", "reduce_over_snapshots", "REDUCTIONS"]

REDUCTIONS = ("mean", "max", "min")
"""The named reductions over the K snapshots (an int picks one snapshot instead)."""


@torch.no_grad()
def discrepancy_scores(model: nn.Module, snapshots: SnapshotSet, x: torch.Tensor, reduce: str | int = "mean",
                       temperature: float = 1.0) -> torch.Tensor:
    """Per-sample poison score ``[B]``: the MD of ``model`` (in eval mode, restored after)
    against the snapshots on x, reduced over the K snapshots."""
    with eval_mode(model):
        return reduce_over_snapshots(snapshots.discrepancy(model(x), x, temperature), reduce)


def reduce_over_snapshots(md: torch.Tensor, how: str | int = "mean") -> torch.Tensor:
    """Reduce ``[K, B]`` discrepancies to ``[B]``: "mean", "max", "min" or a slot index."""
    if isinstance(how, int) and not isinstance(how, bool):  # True would index as a new axis
        if not -md.shape[0] <= how < md.shape[0]:
            raise ValueError(f"reduce: snapshot index {how} out of range for K={md.shape[0]}")
        return md[how]
    if how == "mean":
        return md.mean(0)
    if how == "max":
        return md.amax(0)
    if how == "min":
        return md.amin(0)
    raise ValueError(f"reduce: expected 'mean', 'max', 'min' or an int, got {how!r}")


@register_detector("MD")
class MDDetector(Detector):
    """MD of the model under test against a :class:`SnapshotSet`, reduced over the snapshots.

    Args:
        snapshots: the K historical models.
        reduce: "mean", "max", "min" or a snapshot index.
        temperature: softmax temperature of both distributions (> 0).

    Nothing to fit: the snapshots are what the model is compared with (``fit`` is a no-op).  Flags by
    the default rule (:meth:`Detector.flag`).
    """

    needs_snapshots = True

    def __init__(self, snapshots: SnapshotSet, reduce: str | int = "mean", temperature: float = 1.0):
        if not isinstance(snapshots, SnapshotSet):
            raise ValueError(f"snapshots: expected a SnapshotSet, got {type(snapshots).__name__}")
        if not (isinstance(reduce, int) and not isinstance(reduce, bool)) and reduce not in REDUCTIONS:
            raise ValueError(f"reduce: expected one of {', '.join(REDUCTIONS)} or an int, got {reduce!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
        self.snapshots, self.reduce, self.temperature = snapshots, reduce, temperature

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` MD of ``model`` (eval mode, restored after) on x ``[N, ...]``, no grad; y (``[N]``, checked
        when given) unused.  A batch the networks cannot take is a ValueError naming ``x``."""
        check_samples("x", x)
        if y is not None:
            check_batch("x", x, "y", y)
        try:
            return discrepancy_scores(model, self.snapshots, x, self.reduce, self.temperature)
        except RuntimeError as exc:  # a shape or device the networks do not take, raised inside torch
            raise ValueError(f"x: the model and its snapshots cannot take {describe(x)} on {x.device} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
