"""The one place a device name becomes a ``torch.device``.

Each entry point (``run_burnin``, ``run_online``, ``run_compare``) calls :func:`resolve_device` once
on its ``device`` option and passes the ``torch.device`` down; nothing below an entry point reads
the option again."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else must be a valid torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device: expected cpu, cuda or auto, got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but torch sees no CUDA device")
    return device
