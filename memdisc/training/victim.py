"""The victim: the module a training setting trains, and which of its parameters train.

A victim is any module with ``features(x) -> [B, D]`` (the penultimate representation), ``head``
(the final ``nn.Linear(D, C)``) and ``forward(x) == head(features(x))`` -> logits ``[B, C]``:

* end-to-end and online: a model of :mod:`memdisc.models` itself, every parameter trains;
* transfer: a :class:`TransferVictim`, a trained model's features frozen under a head that trains.

What trains is what requires grad (:func:`trainable_parameters`): optimizers, the attacks' crafting
(:mod:`memdisc.attacks.crafting`) and the defences differentiate those parameters only.  History
copies (:class:`memdisc.snapshots.SnapshotSet`) come from :func:`frozen_copy`, which shares a frozen
backbone instead of copying it, and follow only :func:`trained_module`'s state.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from memdisc.checks import describe

__all__ = ["TransferVictim", "trainable_parameters", "trainable_named_parameters", "trained_module", "frozen_copy"]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that train (``requires_grad``), in ``model.parameters()`` order:
    every parameter of a plain model (the same list as ``list(model.parameters())``), the head's of a
    :class:`TransferVictim`.

    Raises:
        ValueError: naming ``model`` when it is not an ``nn.Module``.
    """
    return list(trainable_named_parameters(model).values())


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the parameters of ``model`` that train (:func:`trainable_parameters`,
    named as in ``model.named_parameters()``: what ``torch.func.functional_call`` takes).

    Raises:
        ValueError: naming ``model`` when it is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {describe(model)}")
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class TransferVictim(nn.Module):
    """The transfer setting's victim: ``head(backbone.features(x))`` with the backbone frozen.

    Args:
        backbone: a trained model with ``features(x)`` and a linear ``head`` (any model of
            :mod:`memdisc.models`).  It is frozen in place and kept, not copied: its parameters stop
            requiring grad, it stays in eval mode whatever :meth:`train` is asked (BatchNorm running
            statistics never drift, dropout is off), and several victims may share it.  Its own head
            is unused.
        head: the ``nn.Linear(D, C)`` that trains, on the backbone's ``D`` features (``C`` classes:
            any count, e.g. a fresh layer for another task); default: a trainable copy of the
            backbone's head.

    forward: x ``[B, ...]`` -> ``head(features(x))`` ``[B, C]``; gradients reach the input through
    the frozen backbone (what attacks need), and only the head's parameters get any.

    Raises:
        ValueError: naming ``backbone`` (no ``features``/linear head) or ``head`` (not a linear
            layer on D inputs, or a layer of the backbone).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        if not isinstance(backbone, nn.Module) or not callable(getattr(backbone, "features", None)) \
                or not isinstance(getattr(backbone, "head", None), nn.Linear):
            raise ValueError(f"backbone: expected a model with features(x) and a linear head (memdisc.models), got "
                             f"{describe(backbone)}")
        source = backbone.head
        if head is None:
            head = copy.deepcopy(source).requires_grad_(True)
        elif not isinstance(head, nn.Linear) or head.in_features != source.in_features:
            raise ValueError(f"head: expected an nn.Linear on the backbone's {source.in_features} features, got "
                             f"{head if isinstance(head, nn.Module) else describe(head)}")
        elif any(p is q for p in head.parameters() for q in backbone.parameters()):
            raise ValueError("head: a layer of the backbone is frozen with it; pass a new nn.Linear, or none for a "
                             "trainable copy of the backbone's head")
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = head

    def train(self, mode: bool = True) -> TransferVictim:
        """``mode`` for the head; the backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> TransferVictim:
        """``requires_grad`` for the head's parameters; the backbone's stay frozen."""
        super().requires_grad_(requires_grad)
        self.backbone.requires_grad_(False)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's features ``[B, D]``."""
        return self.backbone.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def trained_module(model: nn.Module) -> nn.Module:
    """The part of ``model`` whose state training changes: a :class:`TransferVictim`'s head, else the
    whole model (what a history of the model must record)."""
    return model.head if isinstance(model, TransferVictim) else model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as it is now, for history: eval mode, no parameter requiring grad.

    A :class:`TransferVictim`'s backbone is shared with the original, not copied (it never changes),
    so K copies of a transfer victim hold K heads and one backbone."""
    memo = {id(model.backbone): model.backbone} if isinstance(model, TransferVictim) else {}
    return copy.deepcopy(model, memo).eval().requires_grad_(False)
