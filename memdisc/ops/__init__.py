"""memdisc's custom operators: batched snapshot discrepancy and the fused PGD step.

``discrepancy`` and ``pgd_step_`` validate their arguments (clear ``ValueError``
naming the argument: rank, shape, dtype, device, non-finite scalars), then call
``torch.ops.memdisc.*``, which dispatches to the compiled CPU/CUDA kernel when
``memdisc._C`` is loaded and to the PyTorch reference otherwise.  Tensor
values are never inspected on the host (no sync): non-finite logits and
images go through, with the results documented on each function.
"""
from __future__ import annotations

import math

import torch

from memdisc.checks import describe
from memdisc.ops import library  # noqa: F401  (defines the ops; loads the extension)
from memdisc.ops.extension import extension_error, extension_loaded
from memdisc.ops.reference import (discrepancy_backward_reference, discrepancy_reference,
                                   pgd_step_reference)

__all__ = ["discrepancy", "pgd_step_", "extension_loaded", "extension_error", "discrepancy_reference",
           "discrepancy_backward_reference", "pgd_step_reference"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_discrepancy_op = torch.ops.memdisc.discrepancy.default
_pgd_op = torch.ops.memdisc.pgd_step_.default


def discrepancy(current: torch.Tensor, snapshots: torch.Tensor, temperature: float = 1.0,
                reverse: bool = False) -> torch.Tensor:
    """Memorization Discrepancy of every sample against every snapshot.

    Args:
        current: ``[B, C]`` logits of the current model.
        snapshots: ``[K, B, C]`` logits of K historical models on the same batch.
        temperature: T > 0; probabilities are ``softmax(logits / T)``.
        reverse: False gives ``KL(p_snapshot || p_current)`` (the paper's MD),
            True gives ``KL(p_current || p_snapshot)``.

    Returns:
        ``[K, B]`` float32 (float64 for float64 inputs), differentiable w.r.t. both inputs,
        twice too (``create_graph=True``).  B = 0 or K = 0 gives an empty result.

    Non-finite logits give a non-finite KL for that (k, i), as the reference: NaN for
    a NaN or +inf logit, and for a -inf logit in the first distribution of the KL
    (0 * inf, not the limit 0); +inf for a -inf logit in the second (current for the
    forward KL), or NaN where float32 underflows the first's probability of that
    class to 0.  Gradients match the reference where the KL is finite; elsewhere
    they are non-finite at least wherever the reference's are.
    """
    if not isinstance(current, torch.Tensor) or current.dim() != 2:
        raise ValueError(f"current: expected a [B, C] tensor of logits, got {describe(current)}")
    if not isinstance(snapshots, torch.Tensor) or snapshots.dim() != 3:
        raise ValueError(f"snapshots: expected a [K, B, C] tensor of logits, got {describe(snapshots)}")
    if snapshots.device != current.device:
        raise ValueError(f"snapshots: expected a tensor on {current.device} like current, got {snapshots.device}")
    if snapshots.shape[1:] != current.shape:
        raise ValueError(f"snapshots: expected [K, {current.shape[0]}, {current.shape[1]}] to match current "
                         f"{tuple(current.shape)}, got {tuple(snapshots.shape)}")
    if current.dtype not in _FLOATS or snapshots.dtype != current.dtype:
        raise ValueError(f"current/snapshots: expected one floating dtype, got {current.dtype} and {snapshots.dtype}")
    if current.shape[1] < 1:
        raise ValueError("current: the class dimension C must be >= 1")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    return _discrepancy_op(current, snapshots, float(temperature), bool(reverse))[0]


def pgd_step_(x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, *, step: float, eps: float,
              lo: float = 0.0, hi: float = 1.0, active: torch.Tensor | None = None,
              descent: bool = True) -> torch.Tensor:
    """Fused signed-gradient step with L-inf projection and box clamp, in place on ``x``.

    ``x <- clip_[lo,hi](clip_[x0-eps, x0+eps](x - d*step*sign(grad)))`` with d = +1 for
    descent, -1 for ascent.  x, grad, x0: ``[B, ...]`` of one floating dtype on one
    device (any strides; B = 0 is a no-op); active: optional ``[B]`` bool, rows with
    False stay bit-for-bit unchanged.  step, eps, lo, hi: finite floats.
    Returns x.

    Non-finite values, as the reference: a NaN in x or x0 makes that element NaN; a
    NaN in grad counts as sign 0 (``torch.sign``), so the element is only projected;
    +-inf go through the clamps.  No derivative: under grad mode an input that
    requires grad raises (PyTorch's in-place error for a leaf x); call it under
    ``torch.no_grad()``.  x's version counter is bumped, so a backward that saved x
    raises.
    """
    for name, t in (("x", x), ("grad", grad), ("x0", x0)):
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.dtype not in _FLOATS:
            raise ValueError(f"{name}: expected a floating tensor with a batch dimension, got {describe(t)}")
    if grad.shape != x.shape or x0.shape != x.shape:
        raise ValueError(f"grad/x0: expected the shape of x {tuple(x.shape)}, got {tuple(grad.shape)} and "
                         f"{tuple(x0.shape)}")
    if grad.dtype != x.dtype or x0.dtype != x.dtype:
        raise ValueError(f"grad/x0: expected dtype {x.dtype}, got {grad.dtype} and {x0.dtype}")
    if active is not None and (not isinstance(active, torch.Tensor) or active.dtype != torch.bool
                               or active.shape != x.shape[:1]):
        raise ValueError(f"active: expected a bool tensor of shape [{x.shape[0]}], got {describe(active)}")
    for name, t in (("grad", grad), ("x0", x0), ("active", active)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like x, got {t.device}")
    for name, v in (("step", step), ("eps", eps), ("lo", lo), ("hi", hi)):
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number, got {v}")
    if not eps >= 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    if not lo <= hi:
        raise ValueError(f"lo/hi: expected lo <= hi, got {lo} > {hi}")
    _pgd_op(x, grad, x0, active, float(step), float(eps), float(lo), float(hi), bool(descent))
    return x
