"""The reusable gradient-alignment toolkit of crafted poisons (Pang et al., NeurIPS 2021;
gradient-matching poisons reuse it).

With per-parameter-tensor normalisation ``n(v) = v / max(||v||_2, 1e-12)`` (flattened; the
``F.normalize`` convention the seed uses, so a zero gradient tensor contributes 0, never NaN),
a crafting problem is signed steps on one objective of an input batch ``X`` (labels ``y``):

    J(X; D) = sum_l < n(grad_theta_l CE(f(X), y)), D_l >

for a constant direction ``D`` (one tensor per parameter, computed once per batch).  Each
step is ``memdisc.ops.pgd_step_`` (sign, step, L-inf projection, [0, 1] clamp, only rows of
the ``active`` mask), and the loop never reads a value back to the host.  Gradients are taken
w.r.t. the victim's trainable parameters (``memdisc.training.victim.trainable_parameters``: every
parameter of a plain model, as the seed; the head of a transfer victim).  ``accumulative_direction`` is the
direction of Pang et al.'s accumulative objective H (memdisc.attacks.accumulative);
``memdisc.oracle.seed`` holds the plain port of the seed code these functions are tested
against.

The norms are one ``torch._foreach_norm`` and the dots one ``torch.dot`` per tensor, the
fastest of the forms measured (bench/NOTES.md, "Gradient alignment").
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.checks import check_batch
from memdisc.ops import pgd_step_
from memdisc.training.victim import trainable_parameters

__all__ = ["NORM_EPS", "TERMS", "MODES", "gradient_alignment", "crafting_state", "craft_alignment",
           "accumulative_direction"]

NORM_EPS = 1e-12
"""Zero-norm guard of ``n(v) = v / max(||v||, NORM_EPS)``, as ``F.normalize`` (the seed's call)."""

TERMS = ("both", "first", "second")
"""Terms of the accumulative direction: both, the gamma (clean-gradient) term only, the G term only."""
MODES = ("eval", "train")
"""The model's mode while crafting."""


def _norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L]`` tensor of ``max(||g_l||_2, NORM_EPS)`` (one foreach launch for all L tensors)."""
    return torch.stack(torch._foreach_norm(list(grads))).clamp_min(NORM_EPS)


def _dots(grads_a: Sequence[torch.Tensor], grads_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L]`` tensor of ``<a_l, b_l>`` over flattened tensors."""
    return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(grads_a, grads_b)])


def _normalized(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[n(g_l)]``: every tensor divided by its clamped L2 norm."""
    return list(torch._foreach_div(list(grads), list(_norms(grads).unbind())))


def _check_lists(name_a: str, grads_a, name_b: str, grads_b) -> None:
    if len(grads_a) == 0 or len(grads_a) != len(grads_b):
        raise ValueError(f"{name_a}/{name_b}: expected two non-empty sequences of equal length, got "
                         f"{len(grads_a)} and {len(grads_b)} tensors")
    for i, (a, b) in enumerate(zip(grads_a, grads_b)):
        if a.shape != b.shape:
            raise ValueError(f"{name_b}[{i}]: expected shape {tuple(a.shape)} to match {name_a}[{i}], "
                             f"got {tuple(b.shape)}")


def gradient_alignment(grads_a: Sequence[torch.Tensor], grads_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over parameter tensors of the cosine of two gradients.

    ``A = sum_l <a_l, b_l> / (max(||a_l||, eps) * max(||b_l||, eps)) = sum_l <n(a_l), n(b_l)>``
    with eps = ``NORM_EPS``; a zero tensor contributes 0.

    Args:
        grads_a, grads_b: equal-length sequences of tensors, ``grads_b[l]`` of the shape of
            ``grads_a[l]`` (e.g. the per-parameter gradients of two losses).
    Returns:
        0-dim tensor, differentiable w.r.t. both lists (usable under create_graph).
    """
    grads_a, grads_b = list(grads_a), list(grads_b)
    _check_lists("grads_a", grads_a, "grads_b", grads_b)
    return (_dots(grads_a, grads_b) / (_norms(grads_a) * _norms(grads_b))).sum()


@contextlib.contextmanager
def crafting_state(model: nn.Module, mode: str = "eval") -> Iterator[list[nn.Parameter]]:
    """Put ``model`` in crafting state for the block and restore it afterwards.

    Inside: the model in ``mode`` ("eval" or "train", through ``model.train``, so a transfer
    victim's frozen backbone stays in eval mode).  On exit every module's training flag is
    restored; with ``mode="train"`` the buffers (BatchNorm running statistics) are restored too,
    so crafting never changes the victim.  Yields the parameters crafting differentiates, the
    victim's trainable ones (``trainable_parameters(model)``).  Crafting takes gradients with
    ``torch.autograd.grad``, so the parameters' ``.grad`` is never written.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model: expected a module with trainable parameters (requires_grad)")
    flags = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if mode == "train" else []
    try:
        model.train(mode == "train")
        yield params
    finally:
        for m, training in flags:
            m.training = training
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _param_grads(loss: torch.Tensor, params: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
    """``grad_theta loss`` for every parameter (zeros where the loss does not use one)."""
    return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True))


def _craft(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
           direction: list[torch.Tensor], *, eps: float, steps: int, step_size: float, ascent: bool,
           active: torch.Tensor | None) -> torch.Tensor:
    """The crafting loop of ``craft_alignment``; ``model`` already in crafting state."""
    x0 = x.detach().contiguous()
    xp = x0.clone().requires_grad_(True)
    for _ in range(steps):
        grads = _param_grads(_loss(model, xp, y), params, True)
        objective = (_dots(grads, direction) / _norms(grads)).sum()
        (gx,) = torch.autograd.grad(objective, xp)
        with torch.no_grad():
            pgd_step_(xp, gx, x0, step=step_size, eps=eps, active=active, descent=not ascent)
    return xp.detach()


def craft_alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, direction: Sequence[torch.Tensor], *,
                    eps: float, steps: int, step_size: float, ascent: bool, active: torch.Tensor | None = None,
                    mode: str = "eval") -> torch.Tensor:
    """Signed steps on ``J(X) = sum_l <n(grad_theta_l CE(f(X), y)), D_l>``.

    ``steps`` times ``X <- clip_[0,1](Pi_eps(X +/- step_size * sign(grad_X J); x))``,
    ``+`` when ``ascent``, only on the rows where ``active`` is True.

    Args:
        x: ``[B, ...]`` pixels in [0, 1]; y: ``[B]`` class indices.
        direction: one constant tensor ``D_l`` per trainable parameter, in ``trainable_parameters(model)``
            order.
        active: optional ``[B]`` bool on x's device; rows with False come back bit-identical.
        mode: the model's mode while crafting ("eval" as the seed, or "train").
    Returns:
        ``[B, ...]`` the crafted batch (detached): ``|X - x| <= eps`` and ``X`` in [0, 1].
    """
    check_batch("x", x, "y", y)
    with crafting_state(model, mode) as params:
        direction = list(direction)
        _check_lists("trainable_parameters(model)", params, "direction", direction)
        return _craft(model, params, x, y, direction, eps=eps, steps=steps, step_size=step_size,
                      ascent=ascent, active=active)


def _direction(model: nn.Module, params: list[torch.Tensor], x, y, x_val, y_val,
               trigger: Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]], *,
               gamma: float, terms: str) -> list[torch.Tensor]:
    """``D`` of H (model in crafting state); ``trigger(grad CE(S_val))`` gives ``(P(S_T), y_T)``."""
    parts = []
    if terms in ("both", "first"):
        parts.append(torch._foreach_mul(_normalized(_param_grads(_loss(model, x, y), params, False)), gamma))
    if terms in ("both", "second"):
        g_val = _param_grads(_loss(model, x_val, y_val), params, True)
        x_trig, y_trig = trigger([g.detach() for g in g_val])
        g_trig = _param_grads(_loss(model, x_trig, y_trig), params, True)
        parts.append(_normalized(_param_grads(gradient_alignment(g_trig, g_val), params, False)))
    direction = parts[0] if len(parts) == 1 else torch._foreach_add(parts[0], parts[1])
    return [d.detach() for d in direction]


def accumulative_direction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_trigger: torch.Tensor,
                           y_trigger: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *,
                           gamma: float = 1.0, terms: str = "both", mode: str = "eval") -> list[torch.Tensor]:
    """The constant direction ``D`` of the accumulative objective H, one tensor per trainable parameter.

    ``D_l = gamma * n(grad_theta_l CE(x, y)) + n(G_l)``, ``G = grad_theta A(CE(x_trigger), CE(x_val))``;
    ``terms="first"`` keeps only the gamma term, ``"second"`` only the G term.
    x: ``[B, ...]`` the clean incoming batch; x_trigger: the (poisoned) trigger batch;
    x_val: the attacker's validation batch; labels are ``[N]`` class indices.
    """
    if terms not in TERMS:
        raise ValueError(f"terms: expected one of {TERMS}, got {terms!r}")
    check_batch("x", x, "y", y)
    check_batch("x_trigger", x_trigger, "y_trigger", y_trigger)
    check_batch("x_val", x_val, "y_val", y_val)
    with crafting_state(model, mode) as params:
        return _direction(model, params, x, y, x_val, y_val, lambda _: (x_trigger, y_trigger), gamma=gamma,
                          terms=terms)

