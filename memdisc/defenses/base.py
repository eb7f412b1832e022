"""The defence interface, its per-batch report and ST (ALGORITHM.md sections 3 and 5).
A defence never sees which samples are poisoned.

One interface for all of them, usable from any training loop::

    x_train, report = defense.correct(model, x, y, step)           # the batch to train on
    loss = defense.train_on(model, optimizer, x_train, y, report)  # one SGD step on it
    loss, report = defense.train_step(model, optimizer, x, y, step)  # both: correct + one SGD step

``report`` is a :class:`BatchReport` with per-sample information; its ``keep`` / ``weights``
(a detector used as a defence, memdisc.defenses.filtering) decide which rows the step trains on
and how much each counts.  :class:`Defense` is the
base class and, as it is, ST (train on the batch as received).  The PGD schedule shared by
the input-space corrections (DSC, AT) is defined here once: ``PGD_ITERS``, ``PGD_STEP_SIZE``,
``PGD_EPS``.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.checks import check_batch, describe
from memdisc.runtime.distributed import Comm, process_comm
from memdisc.training.victim import trainable_parameters

PGD_ITERS = 10
"""Default correction steps per batch of DSC and AT (the seed's)."""
PGD_STEP_SIZE = 0.02
"""Default signed step of DSC and AT (the seed's)."""
PGD_EPS = 0.2
"""Default L-inf radius of DSC's and AT's correction around the received batch (the seed's)."""


@dataclasses.dataclass
class BatchReport:
    """What a defence did to one batch.

    md: ``[B]`` discrepancy of each received sample (reduced over snapshots; a detector used as a
        defence: its detector's score), or None for defences that do not compute it.
    moved: ``[B]`` bool, rows that the correction changed at least once.
    iterations: ``[B]`` int, correction steps applied to each row.
    threshold: the threshold used for this batch (DSC), else None.
    keep: ``[B]`` bool, the rows to train on, or None for all of them (a detector used to
        drop rows).
    weights: ``[B]`` float >= 0, per-row loss weights, or None for the plain mean (a detector
        used to reweight rows).  :meth:`Defense.train_on` honours both.
    """
    md: torch.Tensor | None
    moved: torch.Tensor
    iterations: torch.Tensor
    threshold: float | None = None
    keep: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    @property
    def acted_on(self) -> torch.Tensor:
        """``[B]`` bool, the rows the defence did something to: moved, dropped or weighted below 1."""
        acted = self.moved
        if self.keep is not None:
            acted = acted | ~self.keep
        if self.weights is not None:
            acted = acted | (self.weights < 1)
        return acted


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
                   step: int, comm: Comm | None = None) -> tuple[torch.Tensor, BatchReport]:
        """Correct the batch, then one SGD step on it (:meth:`train_on` with the report).  Returns (loss, report)."""
        x_train, report = self.correct(model, x, y, step)
        return self.train_on(model, optimizer, x_train, y, report, comm=comm), report

    def train_on(self, model: nn.Module, optimizer: torch.optim.Optimizer, x_train: torch.Tensor,
                 y: torch.Tensor, report: BatchReport | None = None, comm: Comm | None = None) -> torch.Tensor:
        """One SGD step on ``x_train`` ([B, ...], the batch ``correct`` returned; y [B]), model in train
        mode, gradients through :meth:`clip_gradients`.  Returns the detached loss.

        With no ``report``, or one whose ``keep`` and ``weights`` are both None: the plain mean CE
        over every row.  Otherwise the weighted mean over the kept rows K (every row where ``keep``
        is None; w = 1 where ``weights`` is None):

            loss = sum_{i in K} w_i * CE_i / sum_{i in K} w_i

        Only the kept rows are forwarded (BatchNorm's batch and running statistics see only them).
        When that denominator is 0 (nothing kept, or every kept weight 0) no step is taken: the
        model, its mode, the gradients and the optimizer's state stay as they are, and the returned
        loss is NaN (an empty weighted mean).

        Over several processes (``comm``, default: this process's group; each holds its shard of the
        global batch) the sums run over every rank's rows: this rank's loss is its share (its own sums
        over the global denominator), the gradients are summed over ranks
        (:meth:`~memdisc.runtime.distributed.Comm.sync_gradients`) before clipping, rank 0's buffers and
        random state are copied to every rank after the step, and the step is skipped on every rank when
        the global denominator is 0.  The returned loss is then this rank's share."""
        comm = process_comm() if comm is None else comm
        keep = None if report is None else report.keep
        weights = None if report is None else report.weights
        if keep is None and weights is None:
            count = torch.tensor(float(y.shape[0]), device=y.device)
            share = count / comm.all_reduce_sum(count)
            model.train()
            loss = F.cross_entropy(model(x_train), y) * share if y.shape[0] else None
        else:
            rows, w = _kept_rows(keep, weights, y)
            total = w.sum()
            denominator = comm.all_reduce_sum(total)
            if not bool(denominator > 0):
                return torch.full((), float("nan"), device=y.device)
            model.train()
            loss = None
            if bool(total > 0):
                losses = F.cross_entropy(model(x_train[rows]), y[rows], reduction="none")
                loss = (w.to(losses.dtype) * losses).sum() / denominator.to(losses.dtype)
        optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
        comm.sync_gradients(trainable_parameters(model))
        self.clip_gradients(model)
        optimizer.step()
        comm.sync_buffers(model)
        comm.sync_random_state(y.device)
        return loss.detach() if loss is not None else torch.zeros((), device=y.device)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass



def _kept_rows(keep: torch.Tensor | None, weights: torch.Tensor | None,
               y: torch.Tensor) -> tuple[torch.Tensor | slice, torch.Tensor]:
    """The rows a step trains on (a bool mask, or every row) and their weights ``[K]`` (ones where
    ``weights`` is None), after checking ``report.keep`` / ``report.weights`` against the batch's labels y."""
    batch = y.shape[0]
    if keep is not None and (not isinstance(keep, torch.Tensor) or keep.shape != (batch,)
                             or keep.dtype != torch.bool or keep.device != y.device):
        raise ValueError(f"report.keep: expected a bool [{batch}] tensor on {y.device}, got {describe(keep)}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (batch,) or not weights.is_floating_point() \
                or weights.device != y.device:
            raise ValueError(f"report.weights: expected a floating [{batch}] tensor on {y.device}, "
                             f"got {describe(weights)}")
        if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise ValueError("report.weights: expected finite weights >= 0")
    rows = slice(None) if keep is None else keep
    w = torch.ones(batch, device=y.device) if weights is None else weights
    return rows, w[rows]
