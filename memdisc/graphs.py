"""CUDA-graph capture of a fixed-shape, fixed-length computation (the correction loops).

A correction loop of ``iters`` steps launches, per step, every kernel of a
forward and a backward pass, the snapshot forwards, the discrepancy and the PGD
step; at the paper's shapes (batch 100) those launches, not the arithmetic, are
the GPU's cost.  :class:`CapturedLoop` records the whole loop once as a CUDA
graph and replays it: one launch per batch.

What the graph reads besides its inputs (the model's and the snapshots'
weights) it reads through the storage it had at capture, so in-place updates
(optimizer steps, ``SnapshotSet.observe``) are seen by the next replay.  The
capture is redone when the inputs' shapes, dtypes or strides change, when a
watched tensor's storage moves (a module moved or rebuilt).  Anything else the
function reads (hyperparameters, Python flags) is frozen at capture.

The captured function must be capturable: no host synchronisation (``.item()``,
``bool(tensor)``), no CPU tensors, no random numbers.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class CapturedLoop:
    """Replays ``fn(*inputs) -> tuple[Tensor, ...]`` from a CUDA graph (see the module docstring)."""

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self.captures = 0  # how many times a graph was recorded
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key = None
        self._static_in: list[torch.Tensor] = []
        self._static_out: tuple[torch.Tensor, ...] = ()

    @staticmethod
    def _signature(inputs: Sequence[torch.Tensor], watch: Sequence[torch.Tensor]):
        return (tuple((t.shape, t.dtype, t.device, t.stride()) for t in inputs), tuple(t.data_ptr() for t in watch))

    def __call__(self, fn: Callable[..., tuple[torch.Tensor, ...]], inputs: Sequence[torch.Tensor],
                 watch: Callable[[], Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """Run ``fn(*inputs)`` from the graph, capturing it first if needed; returns copies of the outputs.

        watch: returns the tensors fn reads besides its inputs (checked for moved storage each call).
        """
        bad = [i for i, t in enumerate(inputs) if not (isinstance(t, torch.Tensor) and t.is_cuda)]
        if bad:
            raise ValueError(f"inputs: CUDA-graph capture needs CUDA tensors; inputs {bad} are not")
        if self._graph is None or self._signature(inputs, watch()) != self._key:
            self._capture(fn, inputs, watch)
        for buf, t in zip(self._static_in, inputs):
            buf.copy_(t)
        self._graph.replay()
        return tuple(t.clone() for t in self._static_out)

    def _capture(self, fn, inputs, watch) -> None:
        self._graph, self._static_out = None, ()  # release the previous graph's memory pool first
        static_in = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (lazy initialisation, cuDNN autotuning) off the capture
            for _ in range(self.warmup):
                fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*static_in)
        self._graph, self._static_in, self._static_out = graph, static_in, tuple(out)
        self._key = self._signature(inputs, watch())  # after the warm-up built any lazy state
        self.captures += 1
