"""Registration of the memdisc custom operators with torch.library.

The schemas live here.  The pure-PyTorch reference is registered as the
``CompositeExplicitAutograd`` kernel; when the compiled extension
``memdisc._C`` loads, its ``TORCH_LIBRARY_IMPL(memdisc, CPU|CUDA)`` kernels take
precedence for those devices, so the hot path has no Python ``if``.

Autograd: ``discrepancy`` has a registered backward (the fused
``discrepancy_backward`` op; with ``create_graph=True`` a differentiable
PyTorch backward, so second derivatives are exact).  ``pgd_step_`` has no
derivative and behaves like PyTorch's in-place ops: under grad mode a leaf
``x`` that requires grad (or a view of one) raises PyTorch's in-place error,
any other input that requires grad raises, and ``x``'s version counter is
bumped on every call.  The extension does this in C++
(csrc/bindings/pgd_autograd_cpu.cpp); without it ``_pgd_step_autograd``
below refuses inputs that require grad and the reference's ``x.copy_`` bumps
the version.

Loading the extension (and reporting on it) is :mod:`memdisc.ops.extension`.
"""
from __future__ import annotations

import torch

from memdisc.ops import extension
from memdisc.ops.reference import (acc_dtype, discrepancy_backward_reference, discrepancy_reference,
                                   pgd_step_reference)

_lib = torch.library.Library("memdisc", "FRAGMENT")
_lib.define("discrepancy(Tensor current, Tensor snapshots, float temperature=1.0, bool reverse=False)"
            " -> (Tensor, Tensor, Tensor)")
_lib.define("discrepancy_backward(Tensor grad_kl, Tensor current, Tensor snapshots, Tensor lse_current,"
            " Tensor lse_snapshots, Tensor kl, float temperature, bool reverse) -> (Tensor, Tensor)")
_lib.define("pgd_step_(Tensor(a!) x, Tensor grad, Tensor x0, Tensor? active, float step, float eps,"
            " float lo, float hi, bool descent) -> ()")
_lib.impl("discrepancy", discrepancy_reference, "CompositeExplicitAutograd")
_lib.impl("discrepancy_backward", discrepancy_backward_reference, "CompositeExplicitAutograd")
_lib.impl("pgd_step_", pgd_step_reference, "CompositeExplicitAutograd")


def _check_device(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    torch._check(t.device == like.device,
                 lambda: f"memdisc: {name} is on {t.device} but {like_name} is on {like.device}")


@torch.library.register_fake("memdisc::discrepancy")
def _discrepancy_fake(current, snapshots, temperature=1.0, reverse=False):
    _check_device("snapshots", snapshots, "current", current)
    acc = acc_dtype(current.dtype)
    K, B = snapshots.shape[0], current.shape[0]
    return (current.new_empty((K, B), dtype=acc), current.new_empty((B,), dtype=acc),
            current.new_empty((K, B), dtype=acc))


@torch.library.register_fake("memdisc::discrepancy_backward")
def _discrepancy_backward_fake(grad_kl, current, snapshots, lse_current, lse_snapshots, kl, temperature, reverse):
    for name, t in (("snapshots", snapshots), ("grad_kl", grad_kl), ("lse_current", lse_current),
                    ("lse_snapshots", lse_snapshots), ("kl", kl)):
        _check_device(name, t, "current", current)
    return torch.empty_like(current), torch.empty_like(snapshots)


@torch.library.register_fake("memdisc::pgd_step_")
def _pgd_step_fake(x, grad, x0, active, step, eps, lo, hi, descent):
    for name, t in (("grad", grad), ("x0", x0), ("active", active)):
        if t is not None:
            _check_device(name, t, "x", x)
    return None


def _discrepancy_setup_context(ctx, inputs, output):
    current, snapshots, temperature, reverse = inputs
    kl, lse_current, lse_snapshots = output
    ctx.save_for_backward(current, snapshots, lse_current, lse_snapshots, kl)
    ctx.temperature, ctx.reverse = temperature, reverse
    ctx.mark_non_differentiable(lse_current, lse_snapshots)


def _discrepancy_backward(ctx, grad_kl, _grad_lse_current, _grad_lse_snapshots):
    current, snapshots, lse_current, lse_snapshots, kl = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the backward itself must be differentiable w.r.t. current,
        # snapshots and grad_kl, so it runs as PyTorch ops on softmaxes recomputed from
        # the inputs (the saved lse are non-differentiable outputs).
        kl, lse_current, lse_snapshots = discrepancy_reference(current, snapshots, ctx.temperature, ctx.reverse)
        grad_current, grad_snapshots = discrepancy_backward_reference(
            grad_kl, current, snapshots, lse_current, lse_snapshots, kl, ctx.temperature, ctx.reverse)
    else:
        grad_current, grad_snapshots = torch.ops.memdisc.discrepancy_backward.default(
            grad_kl.contiguous(), current, snapshots, lse_current, lse_snapshots, kl, ctx.temperature, ctx.reverse)
    return grad_current, grad_snapshots, None, None


torch.library.register_autograd("memdisc::discrepancy", _discrepancy_backward,
                                setup_context=_discrepancy_setup_context)

def _pgd_step_autograd(keyset, x, grad, x0, active, step, eps, lo, hi, descent):
    """Autograd kernel of pgd_step_ without the extension (twin of csrc/bindings/pgd_autograd_cpu.cpp).

    Under grad mode an input that requires grad is refused, with PyTorch's own
    message for a leaf x or a view of one; the reference kernel's ``x.copy_``
    then bumps x's version counter.
    """
    if torch.is_grad_enabled() and (x.requires_grad or grad.requires_grad or x0.requires_grad):
        if x.requires_grad and x.is_leaf:
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
        if x._is_view() and x._base.is_leaf and x._base.requires_grad:
            raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")
        raise RuntimeError("memdisc::pgd_step_ has no derivative, but x, grad or x0 requires grad; call it under "
                           "torch.no_grad() or on detached tensors")
    with torch._C._AutoDispatchBelowAutograd():
        torch.ops.memdisc.pgd_step_.default.redispatch(keyset & torch._C._after_autograd_keyset, x, grad, x0, active,
                                                       step, eps, lo, hi, descent)


extension.load()
if not extension.extension_loaded():
    _lib.impl("pgd_step_", _pgd_step_autograd, "Autograd", with_keyset=True)
