"""Adversarial training as a defence: the batch is moved by PGD before the SGD step.

``SeedAT`` (loss descent with a small KL term, as the seed code) and ``MadryAT`` (loss
ascent), on one shared loop, ``_PGDCorrection``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.checks import check_batch
from memdisc.defenses.base import PGD_EPS, PGD_ITERS, PGD_STEP_SIZE, BatchReport, Defense
from memdisc.eval.classification import eval_mode
from memdisc.ops import pgd_step_
from memdisc.runtime import CapturedLoop, Precision
from memdisc.runtime.cuda_graphs import module_tensors


class _PGDCorrection(Defense):
    """Shared loop of the input-space corrections: ``iters`` signed steps of ``step_size``
    in the L-inf ball of radius ``eps`` around the received batch, clamped to [0, 1]."""

    descent = True

    def __init__(self, iters: int = PGD_ITERS, step_size: float = PGD_STEP_SIZE, eps: float = PGD_EPS,
                 precision: Precision = Precision()):
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
        check_batch("x", x, "y", y, finite=True)
        self.precision.check_graph_device(x)
        self.prepare(model, x)
        with eval_mode(model):
            if self.precision.cuda_graph and self.iters > 0:
                (x_adv,) = self._captured(lambda xs, ys: self._loop(model, xs, ys), [x, y],
                                          lambda: module_tensors(model), self.settings())
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

    def __init__(self, iters: int = PGD_ITERS, step_size: float = PGD_STEP_SIZE, eps: float = PGD_EPS,
                 kl_weight: float | None = None, precision: Precision = Precision()):
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

