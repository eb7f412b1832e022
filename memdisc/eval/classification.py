"""Classification: the top-1 test error of a model, its loss, accuracy and per-class accuracy, the
attack success rate of a backdoor, and the eval-mode pass and context the training code, the
defences and the study's measurements share.

Every measurement runs the model in eval mode (its previous mode restored), without gradients,
over consecutive batches of ``batch_size`` rows (:func:`eval_outputs`); x and y are on the model's
device.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from memdisc.checks import check_batch, describe
from memdisc.config import check_int
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
def eval_outputs(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000,
                 output: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``output(x[i:i + batch_size])`` of every batch, concatenated: ``[N, ...]``, with ``model`` in eval
    mode (restored afterwards) and no gradient; ``output`` defaults to ``model`` (the logits [N, C]),
    e.g. ``model.features`` for the penultimate representation [N, D].  An empty ``x`` is one empty
    batch, so the result keeps the output's trailing shape.

    Raises:
        ValueError: naming ``batch_size`` when it is not an int >= 1.
    """
    check_int("batch_size", batch_size)
    output = model if output is None else output
    with eval_mode(model):
        return torch.cat([output(x[i:i + batch_size]) for i in range(0, max(1, x.shape[0]), batch_size)])


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(f"y: expected class indices in [0, {num_classes}), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


@torch.no_grad()
def error_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
               comm: Comm = LOCAL) -> float:
    """Top-1 error of ``model`` (eval mode, restored afterwards) on x [N, C, H, W] in [0,1], y [N]; over
    several processes (``comm``), wrong predictions and samples summed over every process's shard."""
    wrong = (eval_outputs(model, x, batch_size).argmax(1) != y).sum()
    wrong = comm.all_reduce_sum(wrong)
    count = comm.all_reduce_sum(torch.tensor(x.shape[0], dtype=torch.long, device=y.device))
    return wrong.item() / max(1, count.item())


def loss_and_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      batch_size: int = 1000) -> tuple[float, float]:
    """``(mean cross-entropy, top-1 accuracy)`` of ``model`` on x [N, C, H, W] in [0, 1], y [N] int64
    (N >= 1): ``(1/N) sum_i CE(f(x_i), y_i)`` and ``#{i : argmax f(x_i) = y_i} / N`` from one eval-mode
    pass (:func:`eval_outputs`).

    Raises:
        ValueError: naming ``x`` (not a batch, or empty), ``y`` (not its labels, or outside the model's
            classes) or ``batch_size``.
    """
    check_batch("x", x, "y", y)
    if x.shape[0] == 0:
        raise ValueError(f"x: expected at least one sample (a mean over none is undefined), got {describe(x)}")
    logits = eval_outputs(model, x, batch_size)
    _check_labels(y, logits.shape[1])
    correct = (logits.argmax(1) == y).sum()
    return F.cross_entropy(logits, y).item(), correct.item() / x.shape[0]


def per_class_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       batch_size: int = 1000) -> list[float]:
    """``[num_classes]`` the top-1 accuracy of ``model`` on the rows of each class,
    ``acc_k = #{i : y_i = k, argmax f(x_i) = k} / #{i : y_i = k}``, NaN for a class absent from ``y``;
    x [N, C, H, W] in [0, 1], y [N] int64 in ``[0, num_classes)``.

    Raises:
        ValueError: naming ``x``, ``y``, ``num_classes`` (an int >= 1) or ``batch_size``.
    """
    check_batch("x", x, "y", y)
    check_int("num_classes", num_classes)
    _check_labels(y, num_classes)
    correct = eval_outputs(model, x, batch_size).argmax(1) == y
    rows = torch.bincount(y, minlength=num_classes).double()
    hits = torch.bincount(y[correct], minlength=num_classes).double()
    return (hits / rows).tolist()  # 0 / 0 = NaN for an absent class


@torch.no_grad()
def attack_success_rate(model: torch.nn.Module, attack, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 1000) -> float:
    """The attack success rate (ASR) of a backdoor: the test samples x [N, ...] in [0, 1], y [N] with the
    attack's backdoor applied (``attack.apply_backdoor(x, y) -> (x_backdoored, y_target)``); among the
    rows whose label differs from their target (``y != y_target``), the fraction ``model`` (eval mode,
    restored afterwards) classifies as the target:

        ASR = #{i : y_i != t_i and argmax f(x'_i) = t_i} / #{i : y_i != t_i}

    All-to-one: the rows of every class but the target count; all-to-all (t = y + 1 mod C): every row.
    ValueError for an attack without a backdoor (or not an attack), a target the model has no output for,
    or when no row's label differs from its target."""
    check_batch("x", x, "y", y)
    if not callable(getattr(attack, "apply_backdoor", None)):
        raise ValueError(f"attack: expected a memdisc Attack with a backdoor (e.g. badnets), got "
                         f"{type(attack).__name__}")
    hits = torch.zeros((), dtype=torch.long, device=y.device)
    count = torch.zeros((), dtype=torch.long, device=y.device)
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            backdoored = attack.apply_backdoor(x[i:i + batch_size], y[i:i + batch_size])
            if backdoored is None:
                raise ValueError(f"attack: {type(attack).__name__} plants no backdoor, so it has no attack success "
                                 f"rate; give a backdoor attack (e.g. badnets)")
            x_bd, target = backdoored
            logits = model(x_bd)
            if bool((target >= logits.shape[1]).any()):
                raise ValueError(f"attack: its backdoor targets class {int(target.max())}, but the model has "
                                 f"{logits.shape[1]} outputs; give the attack the model's number of classes")
            counted = target != y[i:i + batch_size]
            hits += ((logits.argmax(1) == target) & counted).sum()
            count += counted.sum()
    if count.item() == 0:
        raise ValueError(f"y: no test row has a label other than its backdoor target ({x.shape[0]} rows); "
                         f"give test rows of other classes")
    return hits.item() / count.item()
