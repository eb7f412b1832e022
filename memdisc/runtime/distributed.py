"""The seam for running the online guard on several processes: one small communication object.

Four values must be global when the rows of a run are spread over processes (each process holding a
shard of the stream's batch, of the held-out data and of the evaluation set):

* DSC's calibrated quantile (``ThresholdSchedule.update``): the quantile of the held-out MD
  gathered from every process (``all_gather``);
* the per-batch rule's batch-mean MD (``DSC._loop``): the mean over the whole batch
  (``all_reduce_mean`` of the per-process means; equal shard sizes);
* the test error (``memdisc.eval.classification.error_rate``): wrong predictions and samples
  summed over processes (``all_reduce_sum``);
* the recorder (``RunRecord.record``): the scores of every row (``all_gather``).

Only the writer (``is_writer``, rank 0) writes files.  :data:`LOCAL` is one process: every collective
is the identity, so a single-process run computes exactly what it computed before the seam.
:class:`TorchDistributedComm` is the same contract over an initialised ``torch.distributed`` group.
"""
from __future__ import annotations

import torch


class Comm:
    """One process (world size 1): every collective returns its input, and this process writes."""
    rank: int = 0
    world_size: int = 1

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t [n_r, ...]`` of every rank concatenated along dim 0 in rank order: ``[sum_r n_r, ...]``."""
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``t`` over ranks (same shape on every rank)."""
        return t

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise mean of ``t`` over ranks (same shape on every rank)."""
        return t


LOCAL = Comm()
"""The single-process communication object, the default everywhere."""


class TorchDistributedComm(Comm):
    """:class:`Comm` over the default ``torch.distributed`` process group (initialised by the caller)."""

    def __init__(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchDistributedComm: torch.distributed is not initialised; call "
                               "init_process_group first")
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        dist = self._dist
        sizes = [torch.zeros((), dtype=torch.long, device=t.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor(t.shape[0], dtype=torch.long, device=t.device))
        longest = int(max(s.item() for s in sizes))
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:int(n.item())] for p, n in zip(parts, sizes)])

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        self._dist.all_reduce(out)
        return out

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(t) / self.world_size
