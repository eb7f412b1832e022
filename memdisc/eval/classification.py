"""Classification: the top-1 test error of a model, and the eval-mode context the training code and the
defences share."""
from __future__ import annotations

import contextlib

import torch

from memdisc.runtime.distributed import LOCAL, Comm


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode for the block; its previous mode is restored, also on error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def error_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
               comm: Comm = LOCAL) -> float:
    """Top-1 error of ``model`` (eval mode, restored afterwards) on x [N, C, H, W] in [0,1], y [N]; over
    several processes (``comm``), wrong predictions and samples summed over every process's shard."""
    wrong = torch.zeros((), dtype=torch.long, device=y.device)
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            wrong += (model(x[i:i + batch_size]).argmax(1) != y[i:i + batch_size]).sum()
    wrong = comm.all_reduce_sum(wrong)
    count = comm.all_reduce_sum(torch.tensor(x.shape[0], dtype=torch.long, device=y.device))
    return wrong.item() / max(1, count.item())
