"""The attack interface: what an attacker does to the training data, batch by batch.

``attack.poison(model, x, y, step)`` returns a :class:`PoisonedBatch`: the samples to train on,
their labels (an attack may change them) and the ``poisoned`` mask, which travels with them
for evaluation only (a defence never sees it).  ``ATTACKS`` maps each name to its class;
``@register_attack(name)`` adds one, and the contract tests (tests/test_contracts.py) then
cover it.  Every registered class takes the attacker's knowledge in one constructor signature,
``cls(cfg, x_trigger, y_trigger, x_val, y_val, seed)`` (its own config class as
``cls.config_class``); :func:`build_attack` builds one by name.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import torch
from torch import nn

__all__ = ["PoisonedBatch", "Attack", "ATTACKS", "register_attack", "build_attack"]


@dataclasses.dataclass(frozen=True)
class PoisonedBatch:
    """One batch as the victim receives it.

    x: ``[B, ...]`` the samples (pixels in [0, 1]).
    y: ``[B]`` their labels (an attack may change them).
    poisoned: ``[B]`` bool on x's device, True for the rows the attacker changed.
    """
    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor


class Attack(abc.ABC):
    """An attacker of the training stream.  ``prepare(model)`` once before the first batch,
    then ``poison(model, x, y, step)`` for every incoming batch; ``state_dict`` /
    ``load_state_dict`` hold what an interrupted run needs to resume exactly."""

    name: str = ""
    config_class: type = type(None)

    def prepare(self, model: nn.Module) -> None:
        """Set up with the victim as deployed (e.g. craft a trigger); nothing by default."""

    @abc.abstractmethod
    def poison(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> PoisonedBatch:
        """The batch the victim receives at online step ``step`` >= 0 instead of the clean
        ``x [B, ...]`` with labels ``y [B]``."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"state: expected the empty state of {type(self).__name__}, got keys {sorted(state)}")


ATTACKS: dict[str, type[Attack]] = {}
"""Every attack by name (filled by ``register_attack`` as memdisc.attacks is imported)."""


def register_attack(name: str) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator: add the class to ``ATTACKS`` under ``name`` (and set its ``name``)."""
    def register(cls: type[Attack]) -> type[Attack]:
        if name in ATTACKS:
            raise ValueError(f"name: an attack named {name!r} is already registered ({ATTACKS[name].__name__})")
        cls.name = name
        ATTACKS[name] = cls
        return cls
    return register


def build_attack(name: str, x_trigger: torch.Tensor, y_trigger: torch.Tensor, x_val: torch.Tensor,
                 y_val: torch.Tensor, seed: int, cfg=None) -> Attack:
    """The attack ``name`` (a key of ``ATTACKS``) with options ``cfg`` (its config class's defaults
    where None); the clean trigger batch and the validation batch are the attacker's data."""
    if name not in ATTACKS:
        raise ValueError(f"name: expected one of {', '.join(ATTACKS)}, got {name!r}")
    cls = ATTACKS[name]
    return cls(cls.config_class() if cfg is None else cfg, x_trigger, y_trigger, x_val, y_val, seed)
