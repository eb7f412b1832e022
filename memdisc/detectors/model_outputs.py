"""What the detectors read of the model under test: its logits or its penultimate features for every
row of the set they score, in eval mode (the model's mode restored), without gradients; and the check
of a labelled set.

A set the model cannot take (wrong channels, rank, size) is a ValueError naming ``x``, never an error
from inside torch.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from memdisc.checks import check_batch, describe
from memdisc.eval.classification import _check_labels, eval_outputs
from memdisc.eval.probe import penultimate_features

__all__ = ["check_labelled", "logits_of", "features_of"]


def check_labelled(x, y, num_classes: int | None = None) -> None:
    """``x [N, ...]`` float pixels and ``y [N]`` int64 labels on x's device (a detector that reads the
    labels needs them), in ``[0, num_classes)`` when that is given.

    Raises:
        ValueError: naming ``x`` or ``y``.
    """
    if y is None:
        raise ValueError("y: this detector reads the labels of the rows it scores; got None")
    check_batch("x", x, "y", y)
    if num_classes is not None:
        _check_labels(y, num_classes)


def _run(model: nn.Module, x: torch.Tensor, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    try:
        return forward()
    except RuntimeError as exc:  # a shape or device the network does not take, raised inside torch
        raise ValueError(f"x: the model cannot take {describe(x)} on {x.device} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` logits of ``model`` on ``x [N, ...]`` (eval mode, no grad, on x's device).

    Raises:
        ValueError: naming ``x``.
    """
    return _run(model, x, lambda: eval_outputs(model, x))


def features_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` penultimate features ``model.features(x)`` (eval mode, no grad, on the CPU:
    :func:`memdisc.eval.probe.penultimate_features`).

    Raises:
        ValueError: naming ``model`` (no ``features``) or ``x``.
    """
    return _run(model, x, lambda: penultimate_features(model, x))
