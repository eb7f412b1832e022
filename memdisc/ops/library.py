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

Environment:
  MEMDISC_REQUIRE_EXTENSION=1  a missing or mismatched build raises instead of warning.
  MEMDISC_DISABLE_EXTENSION=1  never load the build (reference kernels only).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

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

_STATE = {"loaded": False, "error": None}


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


_BUILD_INFO = Path(__file__).resolve().parent.parent / "_build_info.json"  # written by setup.py


def _read_build_info() -> dict | None:
    """setup.py's record of what the extension was built against (None when there is none)."""
    return json.loads(_BUILD_INFO.read_text()) if _BUILD_INFO.exists() else None


def _load_extension() -> None:
    """Import memdisc._C if it exists and matches this torch; otherwise warn once (or raise)."""
    if os.environ.get("MEMDISC_DISABLE_EXTENSION", "0") == "1":
        _STATE["error"] = "disabled by MEMDISC_DISABLE_EXTENSION=1"
        warnings.warn(f"memdisc: compiled kernels unavailable ({_STATE['error']}); using the PyTorch reference "
                      "kernels.", RuntimeWarning, stacklevel=3)
        return
    try:
        built = _read_build_info()
        if built is not None:
            built_for = built["torch"]
            if built_for != torch.__version__:
                raise ImportError(f"memdisc._C was built for torch {built_for}, this is torch {torch.__version__}; "
                                  "rebuild with `pip install --no-build-isolation -e .`")
        import memdisc._C  # noqa: F401  (registers the kernels)
        _STATE["loaded"] = True
    except (ImportError, OSError) as exc:
        _STATE["error"] = str(exc)
        if os.environ.get("MEMDISC_REQUIRE_EXTENSION", "0") == "1":
            raise ImportError(f"MEMDISC_REQUIRE_EXTENSION=1 but the memdisc extension did not load: {exc}") from exc
        warnings.warn(f"memdisc: compiled kernels unavailable ({exc}); using the PyTorch reference kernels.",
                      RuntimeWarning, stacklevel=3)


def extension_loaded() -> bool:
    """True when the compiled kernels of memdisc._C are registered."""
    return _STATE["loaded"]


def extension_error():
    """Why the extension did not load (None when it did)."""
    return _STATE["error"]


KERNEL_OPS = ("discrepancy", "discrepancy_backward", "pgd_step_")


def kernel_isa() -> str:
    """The instruction set memdisc's CPU kernels run with in this process: "avx512", "avx2" or
    "default" (capped by MEMDISC_CPU_ISA), or "reference" when the extension is not loaded."""
    if not _STATE["loaded"]:
        return "reference"
    import memdisc._C
    return memdisc._C.cpu_isa()


def extension_report() -> dict:
    """What the loaded build is: ``built_against`` (setup.py's record: torch, CUDA version, CUDA
    toolkit directory, architectures), ``compiled_with`` (the extension's own ``build_info`` parsed:
    torch, ``cxx`` = the host compiler's ``__cplusplus``, and with CUDA ``cuda_cxx``, ``cudart``,
    ``cuda_arch``), and ``kernels``: for each op, the devices (CPU, CUDA) whose dispatch key has
    a kernel of its own registered (the reference is registered as CompositeExplicitAutograd
    only).  Empty dict when the extension is not loaded."""
    if not _STATE["loaded"]:
        return {}
    import memdisc._C
    compiled = dict(item.split("=", 1) for item in memdisc._C.build_info().split(";"))
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    kernels = {op: [key for key in ("CPU", "CUDA") if has(f"memdisc::{op}", key)] for op in KERNEL_OPS}
    return {"built_against": _read_build_info(), "compiled_with": compiled, "kernels": kernels}


def missing_kernels(devices: tuple[str, ...] = ("CPU", "CUDA")) -> list[str]:
    """``"op: DEVICE"`` for every op of KERNEL_OPS without a compiled kernel on one of ``devices``
    (all of them when the extension is not loaded): the check that a build registered what it should."""
    kernels = extension_report().get("kernels", {})
    return [f"{op}: {d}" for op in KERNEL_OPS for d in devices if d not in kernels.get(op, [])]


_load_extension()
if not _STATE["loaded"]:
    _lib.impl("pgd_step_", _pgd_step_autograd, "Autograd", with_keyset=True)
