"""Test-set evaluation shared by burn-in and the online phase."""
from __future__ import annotations

import torch


@torch.no_grad()
def error_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 error of ``model`` (eval mode, restored afterwards) on x [N, C, H, W] in [0,1], y [N]."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.long, device=y.device)
    for i in range(0, x.shape[0], batch_size):
        wrong += (model(x[i:i + batch_size]).argmax(1) != y[i:i + batch_size]).sum()
    model.train(was_training)
    return wrong.item() / max(1, x.shape[0])
