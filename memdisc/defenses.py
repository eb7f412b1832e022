"""Defences: how the online model consumes each incoming batch (ALGORITHM.md
sections 3 and 5).  A defence never sees which samples are poisoned.

One interface for all of them, usable from any training loop::

    x_train, report = defense.correct(model, x, y, step)   # the batch to train on
    loss = defense.train_on(model, optimizer, x_train, y)  # one SGD step on it
    loss, report = defense.train_step(model, optimizer, x, y, step)  # both: correct + one SGD step

``report`` is a :class:`BatchReport` with per-sample information.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.evaluate import eval_mode
from memdisc.graphs import CapturedLoop
from memdisc.ops import pgd_step_
from memdisc.snapshots import SnapshotSet, discrepancy_scores, reduce_over_snapshots


@dataclasses.dataclass
class BatchReport:
    """What a defence did to one batch.

    md: ``[B]`` discrepancy of each received sample (reduced over snapshots), or None
        for defences that do not compute it.
    moved: ``[B]`` bool, rows that the correction changed at least once.
    iterations: ``[B]`` int, correction steps applied to each row.
    threshold: the threshold used for this batch (DSC), else None.
    """
    md: torch.Tensor | None
    moved: torch.Tensor
    iterations: torch.Tensor
    threshold: float | None = None


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating [B, ...] batch, got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1] or y.dtype != torch.long:
        raise ValueError(f"y: expected int64 labels of shape [{x.shape[0]}], got {getattr(y, 'dtype', type(y))} "
                         f"{tuple(getattr(y, 'shape', ()))}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: the batch contains NaN or Inf values")


class Defense:
    """ST: train on the batch as received (the undefended case)."""

    name = "ST"

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, BatchReport]:
        """Return the batch to train on ([B, ...], same dtype) and a report."""
        _check_batch(x, y)
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


class GradientClipping(Defense):
    """GC: ST with the gradient norm clipped to ``bound`` before each step (seed: L-inf, 0.01)."""

    name = "GC"

    def __init__(self, norm: str = "inf", bound: float = 0.01):
        if norm not in ("inf", "2"):
            raise ValueError(f"norm: expected 'inf' or '2', got {norm!r}")
        if not bound > 0:
            raise ValueError(f"bound: expected > 0, got {bound}")
        self.norm_type, self.bound = (math.inf if norm == "inf" else 2.0), bound

    def clip_gradients(self, model: nn.Module) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), self.bound, norm_type=self.norm_type)


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a correction loop runs the model passes (the final train step is unaffected).

    channels_last: True, False, or "auto" (on CPU only): convert the networks and 4-d
        inputs to the channels-last memory format (speed: bench/NOTES.md).  It computes the
        same function in another summation order: logits, discrepancies and input gradients
        agree with NCHW to float32 rounding, but the corrected batches are not always equal:
        a sign step at a near-zero gradient, or a max-pool window with tied maxima, may go
        the other way (on one AVX2 CPU 98.4 % of the elements of a test batch were equal).
        Both are valid corrections: in the box and the eps-ball, each row stopped by its rule.
    autocast: None (float32), "bfloat16" or "float16": ``torch.autocast`` around the
        forward passes of the correction; the discrepancy op still accumulates in float32.
    cuda_graph: capture the whole fixed-length correction loop as a CUDA graph once per
        batch shape and replay it (``memdisc.graphs``); CUDA only, and for DSC only without
        early exit and row compaction (their defaults on CUDA).  Off by default: it has not
        been measured on a GPU yet (bench/NOTES.md).
    """
    channels_last: bool | str = "auto"
    autocast: str | None = None
    cuda_graph: bool = False

    def __post_init__(self):
        if self.channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last: expected true, false or 'auto', got {self.channels_last!r}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast: expected none, 'bfloat16' or 'float16', got {self.autocast!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph: expected true or false, got {self.cuda_graph!r}")

    def uses_channels_last(self, x: torch.Tensor) -> bool:
        wanted = x.device.type == "cpu" if self.channels_last == "auto" else self.channels_last
        return bool(wanted) and x.dim() == 4

    def prepare(self, x: torch.Tensor, *models: nn.Module) -> None:
        """Put the networks in the memory format that inputs like x will use (idempotent)."""
        if self.uses_channels_last(x):
            for m in models:
                m.to(memory_format=torch.channels_last)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.uses_channels_last(x) else x

    def context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        # No weight-cast cache: each region holds one forward (nothing to reuse), and graph capture needs it off.
        return torch.autocast(device.type, dtype=getattr(torch, self.autocast), cache_enabled=False)

    def check_graph_device(self, x: torch.Tensor) -> None:
        if self.cuda_graph and not x.is_cuda:
            raise ValueError(f"cuda_graph: CUDA graphs need the batch on a CUDA device, got {x.device}")


def _module_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers a captured loop reads through the model."""
    return [*model.parameters(), *model.buffers()]


class _PGDCorrection(Defense):
    """Shared loop of the input-space corrections: ``iters`` signed steps of ``step_size``
    in the L-inf ball of radius ``eps`` around the received batch, clamped to [0, 1]."""

    descent = True

    def __init__(self, iters: int = 10, step_size: float = 0.02, eps: float = 0.2, precision: Precision = Precision()):
        if iters < 0:
            raise ValueError(f"iters: expected >= 0, got {iters}")
        if not step_size > 0 or not eps >= 0:
            raise ValueError(f"step_size/eps: expected step_size > 0 and eps >= 0, got {step_size}, {eps}")
        self.iters, self.step_size, self.eps, self.precision = iters, step_size, eps, precision
        self._captured = CapturedLoop()

    def prepare(self, model, x):
        self.precision.prepare(x, model)

    def loss(self, model: nn.Module, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ctx) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def setup(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        return None

    def correct(self, model, x, y, step):
        _check_batch(x, y)
        self.precision.check_graph_device(x)
        self.prepare(model, x)
        with eval_mode(model):
            if self.precision.cuda_graph and self.iters > 0:
                (x_adv,) = self._captured(lambda xs, ys: self._loop(model, xs, ys), [x, y],
                                          lambda: _module_tensors(model), self.settings())
            else:
                (x_adv,) = self._loop(model, x, y)
        iters = torch.full((x.shape[0],), self.iters, dtype=torch.long, device=x.device)
        return x_adv, BatchReport(md=None, moved=iters > 0, iterations=iters)

    def settings(self) -> tuple:
        """The hyperparameters a captured loop freezes (a change gets a new graph)."""
        return type(self), self.iters, self.step_size, self.eps, self.precision

    def _loop(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
        """The ``iters`` steps from x (model already in eval mode): ``(x_corrected,)``."""
        x_adv = x.detach().clone()
        with self.precision.context(x.device):
            ctx = self.setup(model, self.precision.input(x), y)
        for _ in range(self.iters):
            x_adv.requires_grad_(True)
            with self.precision.context(x.device):
                loss = self.loss(model, model(self.precision.input(x_adv)), x, y, ctx)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach()
            pgd_step_(x_adv, grad, x, step=self.step_size, eps=self.eps, descent=self.descent)
        return (x_adv,)


class SeedAT(_PGDCorrection):
    """AT as the seed code does it: loss *descent*, no early stop, plus a small
    KL-to-natural-output term: loss = CE(f(x'), y) + kl_weight * KL(f(x) || f(x')).

    kl_weight=None means 1/C (C classes): the seed's ``nn.KLDivLoss()`` averages over
    B*C elements, i.e. the batch-mean KL divided by C."""

    name = "AT-seed"

    def __init__(self, iters: int = 10, step_size: float = 0.02, eps: float = 0.2, kl_weight: float | None = None,
                 precision: Precision = Precision()):
        super().__init__(iters, step_size, eps, precision)
        self.kl_weight = kl_weight

    def settings(self) -> tuple:
        return super().settings() + (self.kl_weight,)

    def setup(self, model, x, y):
        with torch.no_grad():
            return F.softmax(model(x), dim=1)

    def loss(self, model, logits, x, y, p_natural):
        kl = F.kl_div(F.log_softmax(logits, dim=1), p_natural, reduction="batchmean")
        weight = 1.0 / logits.shape[1] if self.kl_weight is None else self.kl_weight
        return F.cross_entropy(logits, y) + weight * kl


class MadryAT(_PGDCorrection):
    """Standard (Madry) adversarial training: loss *ascent* PGD, then train on the result."""

    name = "AT-madry"
    descent = False


class ThresholdSchedule:
    """The DSC threshold tau as a function of the online step s.

    kind="seed":       tau = tau0 + slope * s  (the seed's CIFAR-10 schedule 0.5 + 0.02 s)
    kind="fixed":      tau = tau0
    kind="calibrated": tau = the ``quantile`` of the discrepancy on clean held-out data
                       under the current model, re-measured every ``every`` steps
                       (per-sample scores in per-sample mode; means of resampled
                       batches of the stream's batch size in per-batch mode).
    """

    def __init__(self, kind: str = "calibrated", tau0: float = 0.5, slope: float = 0.02, quantile: float = 0.95,
                 every: int = 1):
        if kind not in ("seed", "fixed", "calibrated"):
            raise ValueError(f"kind: expected 'seed', 'fixed' or 'calibrated', got {kind!r}")
        if not 0 < quantile < 1:
            raise ValueError(f"quantile: expected 0 < q < 1, got {quantile}")
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        self.kind, self.tau0, self.slope, self.quantile, self.every = kind, tau0, slope, quantile, every
        self.value: float | None = None
        self.last_step: int | None = None

    def needs_measurement(self, step: int) -> bool:
        return self.kind == "calibrated" and (self.last_step is None or step - self.last_step >= self.every)

    def update(self, step: int, clean_scores: torch.Tensor, batch_size: int | None, generator: torch.Generator):
        """Set tau from per-sample clean scores ``[N]`` (batch_size given: per-batch mode)."""
        scores = clean_scores.float().cpu()
        if batch_size is not None:
            idx = torch.randint(0, scores.numel(), (256, batch_size), generator=generator)
            scores = scores[idx].mean(1)
        self.value = float(torch.quantile(scores, self.quantile))
        self.last_step = step

    def __call__(self, step: int) -> float:
        if self.kind == "seed":
            return self.tau0 + self.slope * step
        if self.kind == "fixed":
            return self.tau0
        if self.value is None:
            raise RuntimeError("DSC: the calibrated threshold has not been measured; call calibrate() first")
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.last_step = state["value"], state["last_step"]


class DSC(Defense):
    """Discrepancy-aware Sample Correction (ALGORITHM.md section 3).

    Before each of at most ``iters`` signed descent steps on CE (current model,
    eval mode), the discrepancy D of the corrected batch to the snapshots is
    measured; a row stops moving for good once

    * mode="batch":  mean_i D_i <= tau   (the seed's per-batch rule; the default: it held
      the accumulative attack best over the demo's seeds, README), or
    * mode="sample": its own D_i <= tau  (per-sample rule).

    The stop is a device-side mask fed to the fused PGD step, so the loop has
    no host synchronisation; ``early_exit`` (default: on CPU only, where a
    sync is free) leaves the loop once no row is active, and ``compact``
    (default: per-sample mode on CPU) forwards only the rows still moving.
    The CE is summed, not averaged, so a row's step does not depend on how
    many rows are still active (the sign of the gradient is the same).
    """

    def __init__(self, snapshots: SnapshotSet, mode: str = "batch", schedule: ThresholdSchedule | None = None,
                 iters: int = 10, step_size: float = 0.02, eps: float = 0.2, reduce: str | int = "mean",
                 temperature: float = 1.0, early_exit: str | bool = "auto", compact: str | bool = "auto",
                 heldout: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
                 precision: Precision = Precision()):
        if mode not in ("batch", "sample"):
            raise ValueError(f"mode: expected 'batch' or 'sample', got {mode!r}")
        if iters < 0 or not step_size > 0 or not eps >= 0:
            raise ValueError(f"iters/step_size/eps: expected >= 0, > 0, >= 0; got {iters}, {step_size}, {eps}")
        self.snapshots, self.mode, self.reduce, self.temperature = snapshots, mode, reduce, temperature
        self.schedule = schedule or ThresholdSchedule()
        self.iters, self.step_size, self.eps, self.early_exit = iters, step_size, eps, early_exit
        self.compact, self.precision = compact, precision
        self.heldout = heldout
        self.generator = torch.Generator().manual_seed(seed)
        self._captured = CapturedLoop()
        if self.schedule.kind == "calibrated" and heldout is None:
            raise ValueError("heldout: the calibrated threshold needs clean held-out data (x, y)")
        self.name = f"DSC-{mode}"

    def scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Per-sample discrepancy ``[B]`` of the model (eval mode) to the snapshots on x, no grad."""
        return discrepancy_scores(model, self.snapshots, x, self.reduce, self.temperature)

    def prepare(self, model, x):
        self.precision.prepare(x, model, *self.snapshots.models)

    def calibrate(self, model: nn.Module, step: int, batch_size: int) -> None:
        """Re-measure the calibrated threshold on the held-out clean data if it is due
        (``batch_size``: the stream's, for the per-batch rule's resampled batch means)."""
        if self.schedule.needs_measurement(step):
            x, _ = self.heldout
            batch = None if self.mode == "sample" else batch_size
            self.schedule.update(step, self.scores(model, x), batch, self.generator)

    def correct(self, model, x, y, step):
        _check_batch(x, y)
        self.precision.check_graph_device(x)
        self.calibrate(model, step, x.shape[0])
        tau = self.schedule(step)
        self.prepare(model, x)
        on_cpu = x.device.type == "cpu"
        early_exit = on_cpu if self.early_exit == "auto" else bool(self.early_exit)
        compact = self.mode == "sample" and (on_cpu if self.compact == "auto" else bool(self.compact))
        graph = self.precision.cuda_graph and self.iters > 0
        if graph and (early_exit or compact):
            raise ValueError("cuda_graph: a captured loop has a fixed length and fixed shapes; set early_exit and "
                             "compact to false (their defaults on CUDA)")
        with eval_mode(model):
            if compact:
                x_adv, md_received, iterations = self._loop_compact(model, x, y, tau)
            elif graph:
                self.snapshots.prepare(x)  # lazily built state, on this stream before any capture
                # md's dtype (float64 models give float64 MD), so the comparison is the eager loop's
                tau_t = torch.full((), tau, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                                   device=x.device)
                settings = (self.mode, self.iters, self.step_size, self.eps, self.reduce, self.temperature,
                            self.precision)
                x_adv, md_received, iterations = self._captured(
                    lambda xs, ys, ts: self._loop(model, xs, ys, ts, early_exit=False), [x, y, tau_t],
                    lambda: _module_tensors(model) + self.snapshots.tensors(), settings)
            else:
                x_adv, md_received, iterations = self._loop(model, x, y, tau, early_exit)
        if md_received is None:  # iters == 0
            md_received = self.scores(model, x)
        return x_adv, BatchReport(md=md_received, moved=iterations > 0, iterations=iterations, threshold=tau)

    def _measure(self, model: nn.Module, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, C]`` of the current model on xs (with grad) and the reduced discrepancy ``[B]``."""
        with self.precision.context(xs.device):
            xin = self.precision.input(xs)
            logits = model(xin)
            md = reduce_over_snapshots(
                self.snapshots.discrepancy(logits.detach(), xin.detach(), self.temperature), self.reduce)
        return logits, md

    def _loop(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, tau: float | torch.Tensor,
              early_exit: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Every row forwarded each step, stopped rows masked in the PGD step (no host sync unless
        ``early_exit``).  Returns (x_corrected [B, ...], md of the received batch [B] or None if
        iters == 0, iterations [B])."""
        B = x.shape[0]
        active = torch.ones(B, dtype=torch.bool, device=x.device)
        iterations = torch.zeros(B, dtype=torch.long, device=x.device)
        x_adv = x.detach().clone()
        md_received = None
        for _ in range(self.iters):
            xs = x_adv.requires_grad_(True)
            logits, md = self._measure(model, xs)
            if md_received is None:
                md_received = md
            over = md > tau if self.mode == "sample" else (md.mean() > tau).expand(B)
            active &= over
            if early_exit and not bool(active.any()):
                break
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xs)
            x_adv = xs.detach()
            pgd_step_(x_adv, grad, x, step=self.step_size, eps=self.eps, active=active, descent=True)
            iterations += active
        return x_adv.detach(), md_received, iterations

    def _loop_compact(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      tau: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per-sample rule, forwarding only the rows still moving (exits once none is); same returns as ``_loop``."""
        B = x.shape[0]
        rows = torch.arange(B, device=x.device)
        iterations = torch.zeros(B, dtype=torch.long, device=x.device)
        x_adv = x.detach().clone()
        md_received = None
        for _ in range(self.iters):
            xs = x_adv[rows].requires_grad_(True)
            logits, md = self._measure(model, xs)
            if md_received is None:
                md_received = md
            keep = md > tau
            if not bool(keep.any()):
                break
            (grad,) = torch.autograd.grad(F.cross_entropy(logits[keep], y[rows[keep]], reduction="sum"), xs)
            rows = rows[keep]
            moved = xs.detach()[keep]
            pgd_step_(moved, grad[keep], x[rows], step=self.step_size, eps=self.eps, descent=True)
            x_adv[rows] = moved
            iterations[rows] += 1
        return x_adv, md_received, iterations

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"].cpu())  # a checkpoint loaded with map_location=cuda


DEFENSES = ("ST", "GC", "AT-seed", "AT-madry", "DSC-batch", "DSC-sample")
