"""The seed's direct method (yangcf10/Poisoning-attack, ``mnist_direct.py``) in torch: the
finite-difference baseline of bench_poison_crafting.py.  Bench-only (issue 13): memdisc's attack is
the autograd one, memdisc.attacks.gradient.

One poison point ``x_p [C, H, W]`` with label ``y_p``; per round, for every pixel i (D of them):

    x_tmp = x_p with pixel i + h            (h = 0.01, no clamp)
    reset the victim to its pre-trained weights theta_0
    one SGD step on (x_tmp, y_p): w -= lr * grad, biases -= 2 lr * grad   (lr 0.05; batch 1, so grad / 1)
    L_i = sum over the normal points of CE (``CalLogLoss``: -log max(p_y, 1e-10)), fed as
          ``len(x_normal) / normal_batch`` batches (the seed: 10 batches of one point)
    dir_i = sign(L_i - L_0)

``L_0`` is the same loss after the step on the unperturbed ``x_p`` (recomputed after each round);
then ``x_p <- clamp(x_p + step * dir, 0, 1)`` (step 0.2).  That is D model updates and D
normal-loss evaluations per point per round.  The seed runs its MXNet MLP with ``is_train=True``
(no BatchNorm or dropout there); here the victim runs in eval mode, as memdisc's attack does.
Only parameters with requires_grad take the step (the seed's SGD skips nothing else).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.attacks.gradient import lr_scales, victim_eval_mode

SEED_DEFAULTS = {"h": 0.01, "victim_lr": 0.05, "bias_lr_scale": 2.0, "step": 0.2, "rounds": 5, "num_normal": 10}


def _seed_log_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The seed's ``CalLogLoss``: ``sum_j -log(max(p_j[y_j], 1e-10))``."""
    p = F.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    return -p.clamp_min(1e-10).log().sum()


class FiniteDifferenceDirect:
    """The seed's per-pixel finite-difference direction for one poison point (module docstring).

    Args:
        model: the victim; its trainable parameters are reset to their values at construction
            before every step, and left at them when ``direction`` returns.
        x_normal, y_normal: ``[N, C, H, W]`` / ``[N]`` the normal points of the loss (the seed: 10).
        victim_lr, bias_lr_scale, h: the seed's 0.05, 2 and 0.01 by default.
        normal_batch: points per forward pass of the normal loss (the seed: 1).
    """

    def __init__(self, model: nn.Module, x_normal: torch.Tensor, y_normal: torch.Tensor,
                 victim_lr: float = SEED_DEFAULTS["victim_lr"], bias_lr_scale: float = SEED_DEFAULTS["bias_lr_scale"],
                 h: float = SEED_DEFAULTS["h"], normal_batch: int = 1):
        self.model = model
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.theta0 = [p.detach().clone() for _, p in self.params]
        scales = lr_scales(dict(self.params), bias_lr_scale)
        self.scales = [scales[n] for n, _ in self.params]
        self.x_normal, self.y_normal = x_normal, y_normal
        self.victim_lr, self.h, self.normal_batch = victim_lr, h, normal_batch

    def reset(self) -> None:
        """The victim back at its pre-trained trainable parameters (the seed's ``copyto``)."""
        with torch.no_grad():
            for (_, p), p0 in zip(self.params, self.theta0):
                p.copy_(p0)

    def loss_after_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Reset, one SGD step on the one point ``(x [1, C, H, W], y [1])``, the normal loss."""
        self.reset()
        params = [p for _, p in self.params]
        grads = torch.autograd.grad(F.cross_entropy(self.model(x), y, reduction="sum"), params)
        with torch.no_grad():
            for p, g, s in zip(params, grads, self.scales):
                p.sub_(self.victim_lr * s * g)
            loss = sum(_seed_log_loss(self.model(self.x_normal[i:i + self.normal_batch]),
                                      self.y_normal[i:i + self.normal_batch])
                       for i in range(0, self.x_normal.shape[0], self.normal_batch))
        return float(loss)

    def direction(self, x_p: torch.Tensor, y_p: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """``sign(L_i - L_0)`` for the flat pixel indices ``pixels`` (all D when None) of ``x_p [C, H, W]``
        with label ``y_p`` (int64 0-dim); ``[D]`` float, 0 at the pixels not evaluated."""
        x0, y = x_p.unsqueeze(0), y_p.view(1)
        flat = x0.flatten()
        direction = torch.zeros_like(flat)
        try:
            with victim_eval_mode(self.model):
                base = self.loss_after_step(x0, y)
                for i in (range(flat.numel()) if pixels is None else pixels.tolist()):
                    x_tmp = flat.clone()
                    x_tmp[i] += self.h
                    loss = self.loss_after_step(x_tmp.view_as(x0), y)
                    direction[i] = float(loss > base) - float(loss < base)
        finally:
            self.reset()
        return direction

    def craft(self, x_p: torch.Tensor, y_p: torch.Tensor, rounds: int = SEED_DEFAULTS["rounds"],
              step: float = SEED_DEFAULTS["step"]) -> torch.Tensor:
        """``x_p [C, H, W]`` after ``rounds`` rounds of ``clamp(x_p + step * direction, 0, 1)``."""
        x = x_p.clone()
        for _ in range(rounds):
            x = (x + step * self.direction(x, y_p).view_as(x)).clamp(0.0, 1.0)
        return x
