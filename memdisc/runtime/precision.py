"""Precision: how a correction loop runs its model passes (memory format, autocast, CUDA
graphs); the arithmetic of what it computes is the defence's."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a correction loop runs the model passes (the final train step is unaffected).

    channels_last: True, False, or "auto" (on CPU only): convert the networks and 4-d
        inputs to the channels-last memory format (speed: bench/NOTES.md).  It computes the
        same function in another summation order: logits, discrepancies and input gradients
        agree with NCHW to float32 rounding, but the corrected batches are not always equal:
        a sign step at a near-zero gradient, or a max-pool window with tied maxima, may go
        the other way (on one AVX2 CPU 98.4 % of the elements of a test batch were equal).
        Both are valid corrections: in the box and the eps-ball, each row stopped by its rule.
    autocast: None (float32), "bfloat16" or "float16": ``torch.autocast`` around the
        forward passes of the correction; the discrepancy op still accumulates in float32.
    cuda_graph: capture the whole fixed-length correction loop as a CUDA graph once per
        batch shape and replay it (``memdisc.runtime.cuda_graphs``); CUDA only, and for DSC only without
        early exit and row compaction (their defaults on CUDA).  Off by default: it has not
        been measured on a GPU yet (bench/NOTES.md).
    """
    channels_last: bool | str = "auto"
    autocast: str | None = None
    cuda_graph: bool = False

    def __post_init__(self):
        if self.channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last: expected true, false or 'auto', got {self.channels_last!r}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast: expected none, 'bfloat16' or 'float16', got {self.autocast!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph: expected true or false, got {self.cuda_graph!r}")

    def uses_channels_last(self, x: torch.Tensor) -> bool:
        wanted = x.device.type == "cpu" if self.channels_last == "auto" else self.channels_last
        return bool(wanted) and x.dim() == 4

    def prepare(self, x: torch.Tensor, *models: nn.Module) -> None:
        """Put the networks in the memory format that inputs like x will use (idempotent)."""
        if self.uses_channels_last(x):
            for m in models:
                m.to(memory_format=torch.channels_last)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.uses_channels_last(x) else x

    def context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        # No weight-cast cache: each region holds one forward (nothing to reuse), and graph capture needs it off.
        return torch.autocast(device.type, dtype=getattr(torch, self.autocast), cache_enabled=False)

    def check_graph_device(self, x: torch.Tensor) -> None:
        if self.cuda_graph and not x.is_cuda:
            raise ValueError(f"cuda_graph: CUDA graphs need the batch on a CUDA device, got {x.device}")

