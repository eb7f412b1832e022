"""Registration of the memdisc custom operators with torch.library.

The schemas live here.  The pure-PyTorch reference is registered as the
``CompositeExplicitAutograd`` kernel; when the compiled extension
``memdisc._C`` loads, its ``TORCH_LIBRARY_IMPL(memdisc, CPU|CUDA)`` kernels take
precedence for those devices, so the hot path has no Python ``if``.

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


@torch.library.register_fake("memdisc::discrepancy")
def _discrepancy_fake(current, snapshots, temperature=1.0, reverse=False):
    acc = acc_dtype(current.dtype)
    K, B = snapshots.shape[0], current.shape[0]
    return (current.new_empty((K, B), dtype=acc), current.new_empty((B,), dtype=acc),
            current.new_empty((K, B), dtype=acc))


@torch.library.register_fake("memdisc::discrepancy_backward")
def _discrepancy_backward_fake(grad_kl, current, snapshots, lse_current, lse_snapshots, kl, temperature, reverse):
    return torch.empty_like(current), torch.empty_like(snapshots)


@torch.library.register_fake("memdisc::pgd_step_")
def _pgd_step_fake(x, grad, x0, active, step, eps, lo, hi, descent):
    return None


def _discrepancy_setup_context(ctx, inputs, output):
    current, snapshots, temperature, reverse = inputs
    kl, lse_current, lse_snapshots = output
    ctx.save_for_backward(current, snapshots, lse_current, lse_snapshots, kl)
    ctx.temperature, ctx.reverse = temperature, reverse
    ctx.mark_non_differentiable(lse_current, lse_snapshots)


def _discrepancy_backward(ctx, grad_kl, _grad_lse_current, _grad_lse_snapshots):
    current, snapshots, lse_current, lse_snapshots, kl = ctx.saved_tensors
    grad_current, grad_snapshots = torch.ops.memdisc.discrepancy_backward.default(
        grad_kl.contiguous(), current, snapshots, lse_current, lse_snapshots, kl, ctx.temperature, ctx.reverse)
    return grad_current, grad_snapshots, None, None


torch.library.register_autograd("memdisc::discrepancy", _discrepancy_backward,
                                setup_context=_discrepancy_setup_context)

_STATE = {"loaded": False, "error": None}


def _load_extension() -> None:
    """Import memdisc._C if it exists and matches this torch; otherwise warn once (or raise)."""
    if os.environ.get("MEMDISC_DISABLE_EXTENSION", "0") == "1":
        _STATE["error"] = "disabled by MEMDISC_DISABLE_EXTENSION=1"
        warnings.warn(f"memdisc: compiled kernels unavailable ({_STATE['error']}); using the PyTorch reference "
                      "kernels.", RuntimeWarning, stacklevel=3)
        return
    info_path = Path(__file__).resolve().parent.parent / "_build_info.json"
    try:
        if info_path.exists():
            built_for = json.loads(info_path.read_text())["torch"]
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


_load_extension()
