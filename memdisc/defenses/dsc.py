"""DSC, Discrepancy-aware Sample Correction (ALGORITHM.md section 3): the threshold
schedule, the options section ``[online.dsc]`` and the defence."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.config import check_choice, check_int, check_number, field
from memdisc.checks import check_batch
from memdisc.defenses.base import PGD_EPS, PGD_ITERS, PGD_STEP_SIZE, BatchReport, Defense
from memdisc.eval.classification import eval_mode
from memdisc.ops import pgd_step_
from memdisc.runtime import CapturedLoop, Precision
from memdisc.runtime.cuda_graphs import module_tensors
from memdisc.runtime.distributed import LOCAL, Comm
from memdisc.detectors.md import MDDetector, reduce_over_snapshots
from memdisc.snapshots import SnapshotSet


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

    def update(self, step: int, clean_scores: torch.Tensor, batch_size: int | None = None,
               generator: torch.Generator | None = None, comm: Comm = LOCAL):
        """Set tau from per-sample clean scores ``[N]`` (batch_size given: per-batch mode, the 256 batch
        means drawn with ``generator``); over several processes (``comm``), the scores of every process's
        shard of the held-out data."""
        scores = comm.all_gather(clean_scores.float()).cpu()
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


@dataclasses.dataclass
class DSCConfig:
    """The options of DSC (the ``[online.dsc]`` section): its threshold schedule and correction."""

    threshold: str = field("calibrated", "threshold schedule: calibrated, seed (0.5 + 0.02 s) or fixed")
    tau0: float = field(0.5, "seed/fixed schedule: tau at step 0")
    slope: float = field(0.02, "seed schedule: tau increase per online step")
    quantile: float = field(0.95, "calibrated schedule: quantile of clean held-out discrepancy")
    recalibrate_every: int = field(1, "calibrated schedule: re-measure every N online steps")
    iters: int = field(PGD_ITERS, "maximum correction steps per batch")
    step_size: float = field(PGD_STEP_SIZE, "correction step size")
    eps: float = field(PGD_EPS, "L-inf radius of the correction around the received batch")
    reduce: str = field("mean", "reduction over K snapshots: mean, max or min")

    def __post_init__(self):
        """A known threshold kind and reduction; finite tau0 and slope; 0 < quantile < 1; counts >= 1
        (iters >= 0); step size > 0; eps in [0, 1] (pixels are in [0, 1])."""
        check_choice("threshold", self.threshold, ("calibrated", "seed", "fixed"))
        check_number("tau0", self.tau0)
        check_number("slope", self.slope)
        check_number("quantile", self.quantile, 0.0, 1.0, strict=True)
        check_int("recalibrate_every", self.recalibrate_every)
        check_int("iters", self.iters, 0)
        check_number("step_size", self.step_size, 0.0, strict=True)
        check_number("eps", self.eps, 0.0, 1.0)
        check_choice("reduce", self.reduce, ("mean", "max", "min"))


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
                 iters: int = PGD_ITERS, step_size: float = PGD_STEP_SIZE, eps: float = PGD_EPS,
                 reduce: str | int = "mean",
                 temperature: float = 1.0, early_exit: str | bool = "auto", compact: str | bool = "auto",
                 heldout: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
                 precision: Precision = Precision(), comm: Comm = LOCAL):
        if mode not in ("batch", "sample"):
            raise ValueError(f"mode: expected 'batch' or 'sample', got {mode!r}")
        if iters < 0 or not step_size > 0 or not eps >= 0:
            raise ValueError(f"iters/step_size/eps: expected >= 0, > 0, >= 0; got {iters}, {step_size}, {eps}")
        self.snapshots, self.mode, self.reduce, self.temperature = snapshots, mode, reduce, temperature
        self.detector = MDDetector(snapshots, reduce, temperature)
        self.schedule = schedule or ThresholdSchedule()
        self.iters, self.step_size, self.eps, self.early_exit = iters, step_size, eps, early_exit
        self.compact, self.precision, self.comm = compact, precision, comm
        self.heldout = heldout
        self.generator = torch.Generator().manual_seed(seed)
        self._captured = CapturedLoop()
        if self.schedule.kind == "calibrated" and heldout is None:
            raise ValueError("heldout: the calibrated threshold needs clean held-out data (x, y)")
        self.name = f"DSC-{mode}"

    def scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Per-sample discrepancy ``[B]`` of the model (eval mode) to the snapshots on x, no grad
        (the MD detector, ``self.detector``)."""
        return self.detector.score(model, x)

    def prepare(self, model, x):
        self.precision.prepare(x, model, *self.snapshots.models)

    def calibrate(self, model: nn.Module, step: int, batch_size: int) -> None:
        """Re-measure the calibrated threshold on the held-out clean data if it is due
        (``batch_size``: this process's rows of the stream's batch; the per-batch rule's resampled
        batch means are of the whole batch, the sum over processes)."""
        if self.schedule.needs_measurement(step):
            x, _ = self.heldout
            batch = None if self.mode == "sample" else int(self.comm.all_reduce_sum(torch.tensor(batch_size)))
            self.schedule.update(step, self.scores(model, x), batch, self.generator, self.comm)

    def correct(self, model, x, y, step):
        check_batch("x", x, "y", y, finite=True)
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
                    lambda: module_tensors(model) + self.snapshots.tensors(), settings)
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
            over = md > tau if self.mode == "sample" else (self.comm.row_mean(md) > tau).expand(B)
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

