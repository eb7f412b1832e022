"""CUDA-graph capture of a fixed-shape, fixed-length computation (the correction loops).

A correction loop of ``iters`` steps launches, per step, every kernel of a
forward and a backward pass, the snapshot forwards, the discrepancy and the PGD
step; at the paper's shapes (batch 100) those launches, not the arithmetic, are
the GPU's cost.  :class:`CapturedLoop` records the whole loop once as a CUDA
graph and replays it: one launch per batch.

What the graph reads besides its inputs (the model's and the snapshots'
weights) it reads through the storage it had at capture, so in-place updates
(optimizer steps, ``SnapshotSet.observe``) are seen by the next replay.  One
graph is kept per input signature (shapes, dtypes, strides) and ``settings``
(the loop's hyperparameters, which are frozen into the graph); a graph is
recorded again when a watched tensor's storage has moved (a module moved or
rebuilt).

The captured function must be capturable: no host synchronisation (``.item()``,
``bool(tensor)``), no CPU tensors, no random numbers, and any lazily built state
(e.g. stacked snapshot weights) built before the first call.
"""
from __future__ import annotations

import collections
from typing import Callable, Hashable, Sequence

import torch
from torch import nn


class CapturedLoop:
    """Replays ``fn(*inputs) -> tuple[Tensor, ...]`` from CUDA graphs (see the module docstring).

    Args:
        warmup: eager runs on a side stream before each capture (lazy initialisation, cuDNN autotuning).
        max_graphs: graphs kept (least recently used dropped first); each holds its own memory pool.
    """

    def __init__(self, warmup: int = 3, max_graphs: int = 4):
        self.warmup, self.max_graphs = warmup, max_graphs
        self.captures = 0  # how many times a graph was recorded
        self._graphs: collections.OrderedDict = collections.OrderedDict()  # key -> (ptrs, graph, static in, out)

    def __call__(self, fn: Callable[..., tuple[torch.Tensor, ...]], inputs: Sequence[torch.Tensor],
                 watch: Callable[[], Sequence[torch.Tensor]], settings: Hashable = ()) -> tuple[torch.Tensor, ...]:
        """Run ``fn(*inputs)`` from its graph, capturing it first if needed; returns copies of the outputs.

        watch: returns the tensors fn reads besides its inputs (checked for moved storage each call).
        settings: everything else fn depends on (hyperparameters); a new value gets its own graph.
        """
        bad = [i for i, t in enumerate(inputs) if not (isinstance(t, torch.Tensor) and t.is_cuda)]
        if bad:
            raise ValueError(f"inputs: CUDA-graph capture needs CUDA tensors; inputs {bad} are not")
        key = (tuple((t.shape, t.dtype, t.device, t.stride()) for t in inputs), settings)
        ptrs = tuple(t.data_ptr() for t in watch())
        entry = self._graphs.get(key)
        if entry is None or entry[0] != ptrs:
            entry = self._capture(key, fn, inputs, ptrs)
        self._graphs.move_to_end(key)
        _, graph, static_in, static_out = entry
        for buf, t in zip(static_in, inputs):
            buf.copy_(t)
        graph.replay()
        return tuple(t.clone() for t in static_out)

    def _capture(self, key, fn, inputs, ptrs):
        self._graphs.pop(key, None)  # release a stale graph's memory pool first
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        static_in = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tuple(fn(*static_in))
        self._graphs[key] = entry = (ptrs, graph, static_in, out)
        self.captures += 1
        return entry


def module_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers a captured loop reads through the model."""
    return [*model.parameters(), *model.buffers()]

