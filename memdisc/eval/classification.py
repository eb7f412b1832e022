"""Classification: the top-1 test error of a model, the attack success rate of a backdoor, and the
eval-mode context the training code and the defences share."""
from __future__ import annotations

import contextlib

import torch

from memdisc.checks import check_batch
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


@torch.no_grad()
def attack_success_rate(model: torch.nn.Module, attack, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 1000) -> float:
    """The attack success rate (ASR) of a backdoor: the test samples x [N, ...] in [0, 1], y [N] with the
    attack's backdoor applied (``attack.apply_backdoor(x, y) -> (x_backdoored, y_target)``); among the
    rows whose label differs from their target (``y != y_target``), the fraction ``model`` (eval mode,
    restored afterwards) classifies as the target:

        ASR = #{i : y_i != t_i and argmax f(x'_i) = t_i} / #{i : y_i != t_i}

    All-to-one: the rows of every class but the target count; all-to-all (t = y + 1 mod C): every row.
    ValueError for an attack without a backdoor, or when no row's label differs from its target."""
    check_batch("x", x, "y", y)
    hits = torch.zeros((), dtype=torch.long, device=y.device)
    count = torch.zeros((), dtype=torch.long, device=y.device)
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            backdoored = attack.apply_backdoor(x[i:i + batch_size], y[i:i + batch_size])
            if backdoored is None:
                raise ValueError(f"attack: {type(attack).__name__} plants no backdoor, so it has no attack success "
                                 f"rate; give a backdoor attack (e.g. badnets)")
            x_bd, target = backdoored
            counted = target != y[i:i + batch_size]
            hits += ((model(x_bd).argmax(1) == target) & counted).sum()
            count += counted.sum()
    if count.item() == 0:
        raise ValueError(f"y: no test row has a label other than its backdoor target ({x.shape[0]} rows); "
                         f"give test rows of other classes")
    return hits.item() / count.item()
