"""Any detector as a defence: drop or down-weight the rows it flags (``DetectorDefense``), and its
options (``FilterConfig``).

For each batch the detector scores every row (``memdisc.detectors``, higher = more suspicious)
and a row is *flagged* when its score exceeds the threshold tau.  tau is DSC's
:class:`~memdisc.defenses.dsc.ThresholdSchedule`; calibrated (the default), it is the ``quantile``
of the detector's per-sample scores on the defender's clean held-out batch under the current
model, re-measured every ``recalibrate_every`` steps, so about ``1 - quantile`` of clean rows
are flagged whatever the detector's scale.  Then, with the batch itself unchanged:

* ``action="drop"``: ``report.keep = ~flagged``, the step trains on the other rows only;
* ``action="reweight"``: ``report.weights`` = ``flagged_weight`` for flagged rows, 1 for the
  others, the step takes the weighted mean loss.

:meth:`memdisc.defenses.base.Defense.train_on` applies both (a batch with nothing kept takes no
step).  The detector is fitted once, on the held-out batch, with the model the first batch meets.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from memdisc.checks import check_batch
from memdisc.config import check_choice, check_int, check_number, field
from memdisc.defenses.base import BatchReport, Defense
from memdisc.defenses.dsc import ThresholdSchedule
from memdisc.detectors.base import Detector
from memdisc.runtime.distributed import LOCAL, Comm

__all__ = ["FilterConfig", "DetectorDefense", "ACTIONS"]

ACTIONS = ("drop", "reweight")
"""What a :class:`DetectorDefense` does with the rows its detector flags."""


@dataclasses.dataclass
class FilterConfig:
    """The options of the detector defences (``MD-drop``, ``MD-reweight``)."""

    quantile: float = field(0.95, "flag a row whose score exceeds this quantile of the clean held-out scores")
    recalibrate_every: int = field(1, "re-measure the threshold every N online steps")
    flagged_weight: float = field(0.1, "reweight: loss weight of a flagged row (the others weigh 1)")
    reduce: str = field("mean", "MD's reduction over the K snapshots: mean, max or min")

    def __post_init__(self):
        """0 < quantile < 1; recalibrate_every >= 1; flagged_weight in [0, 1]."""
        check_number("quantile", self.quantile, 0.0, 1.0, strict=True)
        check_int("recalibrate_every", self.recalibrate_every)
        check_number("flagged_weight", self.flagged_weight, 0.0, 1.0)
        check_choice("reduce", self.reduce, ("mean", "max", "min"))


class DetectorDefense(Defense):
    """A detector used as a defence (module docstring).

    Args:
        detector: any :class:`~memdisc.detectors.base.Detector` (e.g. ``DETECTORS["MD"](snapshots)``).
        action: "drop" or "reweight".
        heldout: ``(x [N, ...], y [N])`` the defender's clean held-out batch: the detector's ``fit``
            and the calibrated threshold.
        schedule: the threshold (default: calibrated at the 0.95 quantile, every step).
        flagged_weight: in [0, 1], the loss weight of a flagged row under "reweight".
        comm: the processes of a run spread over several (the held-out scores are gathered from all).

    Its name is ``"<detector>-<action>"`` (``MD-drop``).  ``train_on`` needs the report ``correct``
    returned (a ValueError otherwise: without it the step would train on every row).
    """

    def __init__(self, detector: Detector, action: str, heldout: tuple[torch.Tensor, torch.Tensor],
                 schedule: ThresholdSchedule | None = None, flagged_weight: float = 0.1, comm: Comm = LOCAL):
        if not isinstance(detector, Detector):
            raise ValueError(f"detector: expected a Detector, got {type(detector).__name__}")
        if action not in ACTIONS:
            raise ValueError(f"action: expected one of {', '.join(ACTIONS)}, got {action!r}")
        if not isinstance(heldout, tuple) or len(heldout) != 2:
            raise ValueError("heldout: expected the defender's clean held-out batch (x, y)")
        check_batch("heldout", heldout[0], "heldout", heldout[1])
        check_number("flagged_weight", flagged_weight, 0.0, 1.0)
        self.detector, self.action, self.heldout = detector, action, heldout
        self.schedule = schedule or ThresholdSchedule()
        self.flagged_weight, self.comm = float(flagged_weight), comm
        self.name = f"{detector.name}-{action}"
        self._fitted = False

    def prepare(self, model: nn.Module, x: torch.Tensor) -> None:
        """Fit the detector on the held-out batch under ``model``, once (``correct`` does it otherwise)."""
        if not self._fitted:
            self.detector.fit(model, *self.heldout)
            self._fitted = True

    def correct(self, model, x, y, step):
        """The batch unchanged, and a report whose ``keep`` (drop) or ``weights`` (reweight) follow the
        rows flagged (score > tau); ``threshold`` is tau."""
        check_batch("x", x, "y", y, finite=True)
        self.prepare(model, x)
        if self.schedule.needs_measurement(step):
            self.schedule.update(step, self.detector.score(model, *self.heldout), comm=self.comm)
        tau = self.schedule(step)
        scores = self.detector.score(model, x, y)
        flagged = scores > tau
        zeros = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        report = BatchReport(md=scores, moved=zeros.bool(), iterations=zeros, threshold=tau)
        if self.action == "drop":
            report.keep = ~flagged
        else:
            report.weights = torch.where(flagged, self.flagged_weight, 1.0).to(x.dtype)
        return x, report

    def train_on(self, model, optimizer, x_train, y, report=None, comm=None):
        if report is None:
            raise ValueError(f"report: {self.name} trains on the rows its report keeps or weights; pass the "
                             f"BatchReport correct() returned")
        return super().train_on(model, optimizer, x_train, y, report, comm)

    def state_dict(self) -> dict:
        return {"fitted": self._fitted, "detector": self.detector.state_dict(),
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"fitted", "detector", "schedule"} <= state.keys():
            raise ValueError(f"state: expected a dict from {type(self).__name__}.state_dict()")
        self.detector.load_state_dict(state["detector"])
        self.schedule.load_state_dict(state["schedule"])
        self._fitted = state["fitted"]
