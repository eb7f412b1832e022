"""Running one run on several processes: the communication object (:class:`Comm`) and the
torch.distributed set-up under ``torchrun``.

A run on W processes (ranks) keeps every model identical on every rank and spreads the rows of each
*global* minibatch over them: rank r takes its contiguous part (:meth:`Comm.shard`, sizes differing by
at most one), so the ranks together see exactly the batches a one-process run sees.  What must be
global goes through one small object:

* training: the gradients of a step (``DistributedDataParallel`` in the burn-in and
  ``memdisc.training.fit``; :meth:`Comm.sync_gradients` in the online defences' step, whose kept rows
  may leave a rank's shard empty), with each rank's loss scaled so that the sum over ranks is the
  global batch's loss (:func:`share_loss`); BatchNorm normalises each rank's shard, and rank 0's
  buffers are copied to every rank after each epoch or step (:meth:`Comm.sync_buffers`), so the
  ranks' models stay equal; so is rank 0's random state where a shard's dropout drew from it;
* DSC's calibrated quantile (``ThresholdSchedule.update``): the held-out MD of every rank
  (``all_gather``);
* the per-batch rule's batch-mean MD (``DSC._loop``): sums and counts over ranks (``row_mean``);
* the test error (``memdisc.eval.classification.error_rate``): wrong predictions and samples
  summed over ranks (``all_reduce_sum``);
* the recorder (``RunRecord.record``): the scores of every row (``all_gather``).

Files: every file memdisc writes goes through ``memdisc.artifacts.atomic_write_bytes``; under
torch.distributed every rank calls it at the same point of the program, rank 0 writes and the others
wait for it (:func:`process_comm`), so a file one rank reads after that point exists for all; when
rank 0 cannot write it, every rank raises.

:data:`LOCAL` is one process: every collective is the identity, so a single-process run computes
exactly what it computed before the seam.  :class:`TorchDistributedComm` is the same contract over an
initialised ``torch.distributed`` group; :func:`init_distributed` starts it from torchrun's
environment (gloo on CPU, NCCL on CUDA; collectives time out after ``MEMDISC_DIST_TIMEOUT`` seconds,
default 600, so a rank that died makes the others fail instead of waiting for ever).
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.nn.functional as F
from torch import nn

#: The environment variable of the collectives' timeout, in seconds.
TIMEOUT_VARIABLE = "MEMDISC_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


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

    def row_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of every rank's rows of ``t [n_r]``: ``sum_r sum(t_r) / sum_r n_r`` (a scalar)."""
        return t.mean()

    def barrier(self) -> None:
        """Wait until every rank has called it."""

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` copied into ``t`` on every rank (in place); returns ``t``."""
        return t

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch ``t [N, ...]``: part ``rank`` of ``t.tensor_split(world_size)``
        (contiguous, sizes ``ceil`` or ``floor`` of ``N / world_size``, earlier ranks the larger)."""
        return t

    def sync_gradients(self, params: list[nn.Parameter]) -> None:
        """Replace every parameter's gradient by its sum over ranks (a missing one counts as zeros): with
        each rank's loss scaled to its share of the global loss, the global batch's gradient."""

    def sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) copied to every rank, as DDP does."""

    def sync_random_state(self, device: torch.device) -> None:
        """Rank 0's global random state (CPU, and ``device``'s when CUDA) copied to every rank: a forward
        on this rank's shard (dropout) draws as many numbers as the shard has rows, and later draws that
        must agree (batches, initialisations) would otherwise differ between ranks."""

    def agree(self, failed: bool) -> bool:
        """Whether any rank passed ``failed`` True (every rank gets the same answer)."""
        return failed


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

    def row_mean(self, t: torch.Tensor) -> torch.Tensor:
        total, count = self.all_reduce_sum(torch.stack([t.sum(), torch.tensor(t.numel(), dtype=t.dtype,
                                                                               device=t.device)]))
        return total / count

    def barrier(self) -> None:
        self._dist.barrier()

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        self._dist.broadcast(t, src=0)
        return t

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        return t.tensor_split(self.world_size)[self.rank]

    def sync_gradients(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()

    def sync_buffers(self, module: nn.Module) -> None:
        for buffer in module.buffers():
            self.broadcast_(buffer)

    def sync_random_state(self, device: torch.device) -> None:
        torch.set_rng_state(self.broadcast_(torch.get_rng_state()))
        if device.type == "cuda":
            torch.cuda.set_rng_state(self.broadcast_(torch.cuda.get_rng_state(device)), device)

    def agree(self, failed: bool) -> bool:
        return bool(self.all_reduce_sum(torch.tensor([int(failed)])).item() > 0)


def share_loss(logits: torch.Tensor, y: torch.Tensor, rows: int, comm: Comm) -> torch.Tensor:
    """This rank's share of the mean cross-entropy over a global minibatch of ``rows`` rows, of which it
    holds ``logits [n_r, C]`` and ``y [n_r]``: ``CE_mean * W n_r / rows``, so that DDP's average over the
    W ranks' gradients is the global batch's mean-loss gradient (times exactly 1.0 on one process).  A
    rank without a row (a short last minibatch) contributes 0, through ``logits`` so that every parameter
    still takes part in DDP's reduction."""
    if y.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, y) * (comm.world_size * y.numel() / rows)


def check_processes(path, written_by: int, comm: Comm) -> None:
    """Refuse to resume the state file ``path`` written by a run on ``written_by`` processes on another
    number (ValueError naming the file and what to do)."""
    if written_by != comm.world_size:
        raise ValueError(f"{path}: written by a run on {written_by} process(es), resumed on {comm.world_size}; "
                         "resume with the same number (torchrun --nproc-per-node), or use a different --out")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or another launcher setting ``WORLD_SIZE``)
    started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout() -> datetime.timedelta:
    """The collectives' timeout: ``MEMDISC_DIST_TIMEOUT`` seconds (default 600)."""
    raw = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 1e9:
        raise ValueError(f"{TIMEOUT_VARIABLE}: expected a number of seconds > 0, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def init_distributed(device: torch.device) -> tuple[Comm, torch.device]:
    """The processes of this run and the device of this process.

    Started by torchrun (``WORLD_SIZE`` > 1): the default process group is initialised from its
    environment (``env://``), gloo for a CPU ``device`` and NCCL for CUDA, each rank on the GPU of its
    ``LOCAL_RANK``, with :func:`timeout`; returns a :class:`TorchDistributedComm`.  Otherwise (or when a
    group is already initialised: the caller's) :data:`LOCAL` or the existing group, and ``device``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return TorchDistributedComm(), device
    if not launched_by_torchrun():
        return LOCAL, device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"device: under torchrun each process takes the GPU of its LOCAL_RANK; expected cuda, "
                             f"got {device}")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout())
    return TorchDistributedComm(), device


def shutdown_distributed() -> None:
    """Destroy the default process group, when one is initialised (the end of a command)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_comm() -> Comm:
    """The processes this process belongs to: the initialised ``torch.distributed`` group, else :data:`LOCAL`."""
    import torch.distributed as dist

    return TorchDistributedComm() if dist.is_available() and dist.is_initialized() else LOCAL


def data_parallel(model: nn.Module, comm: Comm) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` over ``comm``'s group (the model itself on one
    process).  Its forward and backward average the gradients over ranks."""
    if comm.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
