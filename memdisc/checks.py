"""The argument checks shared by the library's entry points, so one rule reads one way everywhere.

Each raises ``ValueError`` starting with the argument's name as the caller spells it.
"""
from __future__ import annotations

import torch

__all__ = ["describe", "check_samples", "check_batch"]


def describe(value: object) -> str:
    """How an argument reads in an error message: a tensor's dtype and shape, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def check_samples(name_x: str, x) -> None:
    """``x`` a floating ``[N, ...]`` tensor of pixels in [0, 1] (an unlabelled batch)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"{name_x}: expected a floating [N, ...] tensor of pixels in [0, 1], got {describe(x)}")


def check_batch(name_x: str, x, name_y: str, y, *, finite: bool = False) -> None:
    """A labelled batch: ``x`` as :func:`check_samples` takes, ``y`` int64 ``[N]`` class indices on
    x's device (what ``F.cross_entropy`` takes); ``finite``: x holds no NaN or Inf (a read back to
    the host, so only at the entry of a whole correction)."""
    check_samples(name_x, x)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.int64 \
            or y.device != x.device:
        where = "" if not isinstance(y, torch.Tensor) else f" on {y.device}"
        raise ValueError(f"{name_y}: expected an int64 [{x.shape[0]}] tensor of class indices on {x.device}, "
                         f"got {describe(y)}{where}")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name_x}: the batch contains NaN or Inf values")
