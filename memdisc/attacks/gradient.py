"""The direct gradient ("optimal") poisons of Yang et al. (arXiv 1703.01340), by autograd.

Each poison point ``x_p`` (pixels in [0, 1], label ``y_p``) is optimised, alone, for the loss
the victim has on clean validation data after it trained on that point:

    theta_0     = the victim's trainable parameters (those with requires_grad; the rest fixed)
    theta_{t+1} = theta_t - victim_lr * s * grad_theta CE(f_theta_t(x_p), y_p),   t < T
    L(x_p)      = mean_j CE(f_theta_T(x_val_j), y_val_j)

with ``T = unroll_steps`` (the seed: 1) and ``s = bias_lr_scale`` for parameters named
``*.bias`` (BatchNorm's beta included), 1 for the rest (the seed's MXNet SGD doubles bias
steps: ``bias_lr_scale=2``).  ``dL/dx_p`` goes through the unrolled steps
(``torch.func.grad`` of a function holding ``torch.func.grad``: second order), and each round
is the seed's signed step

    x_p <- clamp(x_p + step_size * sign(dL/dx_p), 0, 1).

Every point has its own unrolled victim (``torch.func.vmap`` over the points, ``chunk`` at a
time); the victim's weights are never modified.  The victim runs in eval mode while crafting:
BatchNorm normalises with its running statistics (a one-point batch has no batch statistics
of its own) and dropout is off; the module's training flags are restored afterwards.

The seed (``mnist_direct.py``) estimates the sign of each pixel's derivative by a forward
difference instead: pixel + 0.01, one SGD step from the pre-trained weights, the summed CE of
10 training points that follow the poison, ``sign(L_i - L_0)``; that is D model updates and D
10-point evaluations per point per round (D = 784 on MNIST).  Its defaults: 5 rounds of step
0.2, victim lr 0.05, biases at 2x lr, 10 validation points, labels ``y + 1``.  Its faithful
port is ``bench/fd_direct_attack.py``, the baseline of ``bench/bench_poison_crafting.py``
(speed and sign agreement: bench/NOTES.md, "Optimal poisons").
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from memdisc.attacks.base import AttackData, register_attack
from memdisc.attacks.offline import OfflineAttack
from memdisc.checks import check_batch, describe
from memdisc.config import check_int, check_number, field
from memdisc.training.victim import trainable_named_parameters

__all__ = ["GradientConfig", "GradientAttack", "OptimalPoisonAttack", "poison_labels", "check_victim",
           "victim_eval_mode", "victim_parameters", "lr_scales", "unrolled_parameters", "poison_objective",
           "poison_gradient", "craft_gradient_poisons"]


@dataclasses.dataclass
class GradientConfig:
    """Options of the direct gradient attack (the seed's in the help: 5 rounds of step 0.2, lr 0.05,
    biases 2x, 10 validation points, one unrolled step).

    rounds 10 of step 0.1 on 10 validation points: measured on Fashion-MNIST against the objective
    on held-out images (bench/NOTES.md, "Optimal poisons"): step 0.1 is the best or within 10 % of
    the best at 10 rounds on both victims measured, where 0.2 overshoots on the MLP; 100 validation
    points gain up to 23 % on the CNN at 10 times the cost, where 20 rounds on 10 points gain 90 %
    at twice the cost.
    """

    fraction: float = field(0.1, "fraction of the training set replaced by poisons")
    rounds: int = field(10, "signed steps per poison point (seed: 5)")
    step_size: float = field(0.1, "signed step on the pixels per round (seed: 0.2)")
    victim_lr: float = field(0.05, "SGD learning rate of the victim's unrolled steps (seed: 0.05)")
    unroll_steps: int = field(1, "SGD steps of the victim on each poison point (seed: 1)")
    bias_lr_scale: float = field(1.0, "learning-rate factor of the bias parameters in the unrolled steps "
                                      "(seed: 2, MXNet's convention; 1: plain SGD as memdisc trains)")
    val_size: int = field(10, "clean validation points of the objective (seed: 10)")
    chunk: int = field(32, "poison points per vmapped call (memory: chunk x val_size forward passes)")

    def __post_init__(self):
        """fraction in [0, 1], counts >= 1, step and learning rate > 0, bias factor >= 0, all finite."""
        check_number("fraction", self.fraction, 0.0, 1.0)
        for name in ("rounds", "unroll_steps", "val_size", "chunk"):
            check_int(name, getattr(self, name))
        check_number("step_size", self.step_size, 0.0, strict=True)
        check_number("victim_lr", self.victim_lr, 0.0, strict=True)
        check_number("bias_lr_scale", self.bias_lr_scale, 0.0)


def poison_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels the seed's optimal poisons carry: ``(y + 1) mod num_classes`` (``[P]`` int64)."""
    return (y + 1) % num_classes


@contextlib.contextmanager
def victim_eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode for the block, its training flags restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def check_victim(model, num_classes: int, use: str) -> None:
    """``model`` an nn.Module whose ``head``, where it has a linear one, has ``num_classes`` outputs.

    Raises:
        ValueError: naming ``model``, and saying ``use`` (what the attack does with it) when it is no module.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: {use}; expected an nn.Module, got {describe(model)}")
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and head.out_features != num_classes:
        raise ValueError(f"model: its head has {head.out_features} outputs, but the attack's data has "
                         f"num_classes {num_classes}; give AttackData the model's number of classes")


def victim_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: detached tensor}`` of the parameters the victim trains
    (:func:`memdisc.training.victim.trainable_named_parameters`; a frozen backbone's parameters stay the
    module's own in ``functional_call``).

    Raises:
        ValueError: naming ``model`` when it is not a module or has no trainable parameter.
    """
    params = {n: p.detach() for n, p in trainable_named_parameters(model).items()}
    if not params:
        raise ValueError("model: expected a module with at least one parameter with requires_grad")
    return params


def lr_scales(params: dict[str, torch.Tensor], bias_lr_scale: float) -> dict[str, float]:
    """``{name: s}``: ``bias_lr_scale`` for ``*.bias`` parameters, 1 for the rest."""
    return {n: bias_lr_scale if n.rsplit(".", 1)[-1] == "bias" else 1.0 for n in params}


def unrolled_parameters(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        victim_lr: float, unroll_steps: int, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """``theta_T``: ``unroll_steps`` SGD steps from ``params`` on the mean CE of ``(x [b, ...], y [b])``,
    ``theta <- theta - victim_lr * scales[name] * grad``; differentiable w.r.t. ``x`` and ``params``
    (under torch.func transforms and plain autograd alike)."""
    def train_loss(theta):
        return F.cross_entropy(functional_call(model, theta, (x,)), y)

    theta = params
    for _ in range(unroll_steps):
        g = grad(train_loss)(theta)
        theta = {n: theta[n] - victim_lr * scales[n] * g[n] for n in theta}
    return theta


def _check_problem(model, x_p, y_p, x_val, y_val, victim_lr, unroll_steps, bias_lr_scale):
    check_batch("x_p", x_p, "y_p", y_p)
    check_batch("x_val", x_val, "y_val", y_val)
    if x_val.shape[1:] != x_p.shape[1:] or x_val.dtype != x_p.dtype or x_val.device != x_p.device:
        raise ValueError(f"x_val: expected samples like x_p's ({x_p.dtype}, {tuple(x_p.shape[1:])}, {x_p.device}), "
                         f"got {describe(x_val)} on {x_val.device}")
    check_number("victim_lr", victim_lr, 0.0, strict=True)
    check_int("unroll_steps", unroll_steps)
    check_number("bias_lr_scale", bias_lr_scale, 0.0)
    return victim_parameters(model)


def _point_objective(model, params, scales, x_val, y_val, victim_lr, unroll_steps):
    """``L(x_p)`` of one point ``x_p [...]``, ``y_p []`` (the function vmapped over the points)."""
    def objective(x_p, y_p):
        theta = unrolled_parameters(model, params, x_p.unsqueeze(0), y_p.unsqueeze(0), victim_lr, unroll_steps,
                                    scales)
        return F.cross_entropy(functional_call(model, theta, (x_val,)), y_val)
    return objective


def poison_objective(model: nn.Module, x_p: torch.Tensor, y_p: torch.Tensor, x_val: torch.Tensor,
                     y_val: torch.Tensor, victim_lr: float, unroll_steps: int = 1, bias_lr_scale: float = 1.0,
                     chunk: int | None = None) -> torch.Tensor:
    """``[P]`` the objective ``L(x_p)`` of every point, each with its own unrolled victim (module docstring).

    Args:
        model: the victim (its weights are read, never changed; run in eval mode).
        x_p, y_p: ``[P, ...]`` float poison points in [0, 1], ``[P]`` int64 their labels.
        x_val, y_val: ``[V, ...]`` clean validation samples like ``x_p``'s, ``[V]`` int64 labels.
        victim_lr, unroll_steps, bias_lr_scale: the unrolled SGD (> 0, >= 1, >= 0).
        chunk: points per vmapped call (None: all at once).
    """
    params = _check_problem(model, x_p, y_p, x_val, y_val, victim_lr, unroll_steps, bias_lr_scale)
    fn = _point_objective(model, params, lr_scales(params, bias_lr_scale), x_val, y_val, victim_lr, unroll_steps)
    with victim_eval_mode(model), torch.no_grad():
        return vmap(fn, chunk_size=chunk)(x_p, y_p)


def poison_gradient(model: nn.Module, x_p: torch.Tensor, y_p: torch.Tensor, x_val: torch.Tensor,
                    y_val: torch.Tensor, victim_lr: float, unroll_steps: int = 1, bias_lr_scale: float = 1.0,
                    chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad [P, ...], L [P])``: ``dL/dx_p`` of every point and the objective itself (arguments as
    :func:`poison_objective`).  Point i's gradient depends on point i alone (``vmap`` of the
    per-point ``grad``)."""
    params = _check_problem(model, x_p, y_p, x_val, y_val, victim_lr, unroll_steps, bias_lr_scale)
    fn = _point_objective(model, params, lr_scales(params, bias_lr_scale), x_val, y_val, victim_lr, unroll_steps)
    with victim_eval_mode(model):
        return vmap(grad_and_value(fn), chunk_size=chunk)(x_p.detach(), y_p)


def craft_gradient_poisons(model: nn.Module, x_p: torch.Tensor, y_p: torch.Tensor, x_val: torch.Tensor,
                           y_val: torch.Tensor, cfg: GradientConfig) -> torch.Tensor:
    """``[P, ...]`` the poison points after ``cfg.rounds`` signed steps from ``x_p``.

    Every round: ``x_p <- clamp(x_p + cfg.step_size * sign(dL/dx_p), 0, 1)`` with ``L`` over the
    first ``cfg.val_size`` rows of ``x_val`` (all if fewer).  ``y_p`` (``[P]`` int64) are the labels the
    poisons carry (the seed's: :func:`poison_labels`); arguments otherwise as :func:`poison_objective`.
    """
    if not isinstance(cfg, GradientConfig):
        raise ValueError(f"cfg: expected a GradientConfig, got {describe(cfg)}")
    check_batch("x_val", x_val, "y_val", y_val)
    x_val, y_val = x_val[:cfg.val_size], y_val[:cfg.val_size]
    x = x_p.detach().clone()
    for _ in range(cfg.rounds):
        g, _ = poison_gradient(model, x, y_p, x_val, y_val, cfg.victim_lr, cfg.unroll_steps, cfg.bias_lr_scale,
                               cfg.chunk)
        x = (x + cfg.step_size * g.sign()).clamp_(0.0, 1.0)
    return x


class OptimalPoisonAttack(OfflineAttack):
    """An offline attack of Yang et al.: the chosen rows become poisons crafted against the victim,
    with the labels :func:`poison_labels`.

    ``poison(model, x, y, 0)`` needs ``model`` (the victim the poisons are crafted against: the
    attacker's pre-trained model) and holds it and the clean set ``x`` as ``self.victim`` /
    ``self.clean`` while :meth:`OfflineAttack.poison` draws the rows and calls :meth:`replace`
    (whose signature carries neither).  ``data`` must hold the clean validation data ``x_val`` /
    ``y_val`` (the objective's; the first ``cfg.val_size`` rows are used).  The model is never
    modified; the state is empty.
    """

    def __init__(self, cfg, data: AttackData, seed: int):
        super().__init__(cfg, data, seed)
        if data.x_val is None:
            raise ValueError(f"x_val: the {self.name} attack needs clean validation data (x_val, y_val), got none")
        self.victim: nn.Module | None = None
        self.clean: torch.Tensor | None = None

    def poison(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int = 0):
        """:meth:`OfflineAttack.poison` with ``model`` required (an nn.Module)."""
        check_victim(model, self.data.num_classes, f"the {self.name} attack crafts its poisons against the victim")
        self.victim, self.clean = model, x
        try:
            return super().poison(model, x, y, step)
        finally:
            self.victim = self.clean = None

    def validation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``cfg.val_size`` rows of the attacker's validation data, on ``device``."""
        n = self.cfg.val_size
        return self.data.x_val[:n].to(device), self.data.y_val[:n].to(device)

    def replace(self, x, y, generator):
        """``(craft(x, y, generator), poison_labels(y))``; nothing to craft for zero rows."""
        x_poison = x.clone() if x.shape[0] == 0 else self.craft(x, y, generator)
        return x_poison, poison_labels(y, self.data.num_classes)

    @abc.abstractmethod
    def craft(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The poisons ``[n, ...]`` made from the chosen clean rows ``x [n, ...]`` (labels ``y [n]``)."""


@register_attack("gradient")
class GradientAttack(OptimalPoisonAttack):
    """The direct gradient attack (module docstring): ``fraction`` of the training set replaced by
    :func:`craft_gradient_poisons` of the chosen rows; ``cfg`` a :class:`GradientConfig`."""

    config_class = GradientConfig

    def craft(self, x, y, generator):
        x_val, y_val = self.validation(x.device)
        return craft_gradient_poisons(self.victim, x, poison_labels(y, self.data.num_classes), x_val, y_val, self.cfg)
