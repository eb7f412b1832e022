"""The defence interface, its per-batch report and ST (ALGORITHM.md sections 3 and 5).
A defence never sees which samples are poisoned.

One interface for all of them, usable from any training loop::

    x_train, report = defense.correct(model, x, y, step)   # the batch to train on
    loss = defense.train_on(model, optimizer, x_train, y)  # one SGD step on it
    loss, report = defense.train_step(model, optimizer, x, y, step)  # both: correct + one SGD step

``report`` is a :class:`BatchReport` with per-sample information.  :class:`Defense` is the
base class and, as it is, ST (train on the batch as received).  The PGD schedule shared by
the input-space corrections (DSC, AT) is defined here once: ``PGD_ITERS``, ``PGD_STEP_SIZE``,
``PGD_EPS``.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.checks import check_batch

PGD_ITERS = 10
"""Default correction steps per batch of DSC and AT (the seed's)."""
PGD_STEP_SIZE = 0.02
"""Default signed step of DSC and AT (the seed's)."""
PGD_EPS = 0.2
"""Default L-inf radius of DSC's and AT's correction around the received batch (the seed's)."""


@dataclasses.dataclass
class BatchReport:
    """What a defence did to one batch.

    md: ``[B]`` discrepancy of each received sample (reduced over snapshots), or None
        for defences that do not compute it.
    moved: ``[B]`` bool, rows that the correction changed at least once.
    iterations: ``[B]`` int, correction steps applied to each row.
    threshold: the threshold used for this batch (DSC), else None.
    keep: ``[B]`` bool, the rows to train on, or None for all of them (a detector used as a
        filter; no defence sets it yet).
    weights: ``[B]`` float, per-row loss weights, or None for the plain mean (a detector
        used to reweight; no defence sets it yet).
    """
    md: torch.Tensor | None
    moved: torch.Tensor
    iterations: torch.Tensor
    threshold: float | None = None
    keep: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class Defense:
    """The defence interface, and ST itself: train on the batch as received (the undefended case).

    Subclasses override :meth:`correct` (what to train on), :meth:`clip_gradients` (between
    backward and the optimizer step), :meth:`prepare`, and the state methods when they hold
    state an interrupted run must restore.
    """

    name = "ST"

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                step: int) -> tuple[torch.Tensor, BatchReport]:
        """Return the batch to train on ([B, ...], same dtype) and a report."""
        check_batch("x", x, "y", y, finite=True)
        zeros = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return x, BatchReport(md=None, moved=zeros.bool(), iterations=zeros)

    def clip_gradients(self, model: nn.Module) -> None:
        """Hook between backward and the optimizer step (GC clips here)."""

    def prepare(self, model: nn.Module, x: torch.Tensor) -> None:
        """Set the networks up for batches like x once, before the stream starts (e.g. the
        memory format); ``correct`` does it lazily otherwise."""

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   step: int) -> tuple[torch.Tensor, BatchReport]:
        """Correct the batch, then one SGD step on it (:meth:`train_on`).  Returns (loss, report)."""
        x_train, report = self.correct(model, x, y, step)
        return self.train_on(model, optimizer, x_train, y), report

    def train_on(self, model: nn.Module, optimizer: torch.optim.Optimizer, x_train: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        """One SGD step on ``x_train`` ([B, ...], the batch ``correct`` returned; y [B]), model in train
        mode, plain mean CE, gradients through :meth:`clip_gradients`.  Returns the detached loss."""
        model.train()
        loss = F.cross_entropy(model(x_train), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.clip_gradients(model)
        optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

