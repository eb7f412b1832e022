"""The attack interface: what an attacker does to the training data.

``attack.poison(model, x, y, step)`` returns a :class:`PoisonedBatch`: the samples to train on,
their labels (an attack may change them) and the ``poisoned`` mask, which travels with them
for evaluation only (a defence never sees it).  Two kinds share it (``Attack.kind``):

* ``"online"``: called for every incoming batch of the stream, ``step`` = the online step
  (the accumulative attack);
* ``"offline"``: called once, ``step`` = 0, on the whole training set; it returns the poisoned
  training set (:class:`memdisc.attacks.offline.OfflineAttack`).

Every attack *replaces* rows, never adds them: the victim receives as many rows as were sent,
in the same order, and ``poisoned`` marks the replaced ones (so a poison fraction is the
fraction of the set the victim trains on, whatever the set's size).

Words: the **trigger batch** is Pang et al.'s ``S_T``, the batch the accumulative attack sends
last to set off what it accumulated (``AttackData.x_trigger``, ``trigger_batch``, the
``*_trigger`` fields of a run's result).  A **backdoor** is a pattern an attack plants at
training time and applies to test inputs (``Attack.apply_backdoor``; BadNets' patch), judged
by the attack success rate (``memdisc.eval.classification.attack_success_rate``).

``ATTACKS`` maps each name to its class; ``@register_attack(name)`` adds one, and the contract
tests (tests/test_contracts.py) then cover it.  Every registered class takes one constructor
shape, ``cls(cfg, data, seed)``: its own options (``cls.config_class``), what the attacker
knows (:class:`AttackData`) and a seed; :func:`build_attack` builds one by name.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import torch
from torch import nn

from memdisc.checks import check_batch, describe

__all__ = ["PoisonedBatch", "AttackData", "Attack", "KINDS", "ATTACKS", "register_attack", "build_attack",
           "check_labels"]

KINDS = ("online", "offline")
"""The kinds of attack (``Attack.kind``): poisoning each batch of a stream, or a training set once."""


@dataclasses.dataclass(frozen=True)
class PoisonedBatch:
    """One batch (or, from an offline attack, the whole training set) as the victim receives it.

    x: ``[B, ...]`` the samples (pixels in [0, 1]).
    y: ``[B]`` their labels (an attack may change them).
    poisoned: ``[B]`` bool on x's device, True for the rows the attacker replaced.
    """
    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor


def check_labels(name: str, y: torch.Tensor, num_classes: int) -> None:
    """Class indices ``y`` all in ``[0, num_classes)`` (one read back to the host)."""
    if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(f"{name}: expected class indices in [0, {num_classes}), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


@dataclasses.dataclass(frozen=True)
class AttackData:
    """What the attacker knows besides the victim model; each attack reads what it needs.

    num_classes: C >= 2, the number of classes of the task.
    x_val, y_val: ``[N_val, ...]`` / ``[N_val]`` clean validation data (the accumulative attack's
        ``S_val``; the loss a gradient poison raises), or None.
    x_trigger, y_trigger: ``[B_T, ...]`` / ``[B_T]`` the clean trigger batch ``S_T`` the accumulative
        attack poisons and sends last, or None.

    Each pair is given whole or not at all; the samples of both pairs have one shape, dtype and
    device, and every label is in ``[0, num_classes)``.
    """
    num_classes: int
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    x_trigger: torch.Tensor | None = None
    y_trigger: torch.Tensor | None = None

    def __post_init__(self):
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes: expected an integer >= 2, got {self.num_classes!r}")
        given = []
        for x_name, y_name in (("x_val", "y_val"), ("x_trigger", "y_trigger")):
            x, y = getattr(self, x_name), getattr(self, y_name)
            if (x is None) != (y is None):
                raise ValueError(f"{y_name if y is None else x_name}: expected {x_name} and {y_name} together "
                                 f"(or neither), got only {x_name if y is None else y_name}")
            if x is not None:
                check_batch(x_name, x, y_name, y)
                check_labels(y_name, y, self.num_classes)
                given.append((x_name, x))
        if len(given) == 2:
            (name_a, a), (name_b, b) = given
            if b.shape[1:] != a.shape[1:] or b.dtype != a.dtype or b.device != a.device:
                raise ValueError(f"{name_a}: expected samples like {name_b}'s ({b.dtype}, {tuple(b.shape[1:])}, "
                                 f"{b.device}), got {describe(a)} on {a.device}")


class Attack(abc.ABC):
    """An attacker of the training data (see the module docstring for the two kinds).

    ``prepare(model)`` once before the first ``poison``; then ``poison(model, x, y, step)`` for
    every incoming batch (online) or once on the whole training set at step 0 (offline);
    ``apply_backdoor(x, y)`` at test time where the attack planted a backdoor; ``state_dict`` /
    ``load_state_dict`` hold what an interrupted run needs to resume exactly.

    Args (every subclass):
        cfg: the attack's options, an instance of ``config_class``.
        data: :class:`AttackData`, what the attacker knows.
        seed: integer >= 0; every random choice of the attack is a function of it.
    """

    name: str = ""
    kind: str = ""
    config_class: type = type(None)

    def __init__(self, cfg, data: AttackData, seed: int):
        if not isinstance(cfg, self.config_class):
            raise ValueError(f"cfg: expected a {self.config_class.__name__}, got {type(cfg).__name__}")
        if not isinstance(data, AttackData):
            raise ValueError(f"data: expected an AttackData, got {type(data).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.cfg, self.data, self.seed = cfg, data, seed

    def check_received(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x [N, ...]``, ``y [N]`` a labelled batch (:func:`memdisc.checks.check_batch`) whose samples are
        like the ones the attacker knows (the same sample shape and dtype as AttackData's, where it has any)."""
        check_batch("x", x, "y", y)
        known = self.data.x_trigger if self.data.x_trigger is not None else self.data.x_val
        if known is not None and (x.shape[1:] != known.shape[1:] or x.dtype != known.dtype):
            raise ValueError(f"x: expected samples like the attacker's data ({known.dtype}, "
                             f"{tuple(known.shape[1:])}), got {describe(x)}")

    def prepare(self, model: nn.Module) -> None:
        """Set up with the victim as deployed (e.g. craft a trigger batch); nothing by default."""

    @abc.abstractmethod
    def poison(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> PoisonedBatch:
        """What the victim receives instead of the clean ``x [B, ...]`` with labels ``y [B]``: at online
        step ``step`` >= 0 (online), or as its training set (offline, ``step`` = 0)."""

    def apply_backdoor(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The test inputs ``x [N, ...]`` (labels ``y [N]``) with the attack's backdoor applied, and the
        label the attacker wants for each, ``(x_backdoored [N, ...], y_target [N] int64)``; None for an
        attack that plants no backdoor (this default)."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"state: expected the empty state of {type(self).__name__}, got keys {sorted(state)}")


ATTACKS: dict[str, type[Attack]] = {}
"""Every attack by name (filled by ``register_attack`` as memdisc.attacks is imported)."""


def register_attack(name: str) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator: add the class to ``ATTACKS`` under ``name`` (and set its ``name``); its
    ``kind`` must be one of ``KINDS``."""
    def register(cls: type[Attack]) -> type[Attack]:
        if name in ATTACKS:
            raise ValueError(f"name: an attack named {name!r} is already registered ({ATTACKS[name].__name__})")
        if cls.kind not in KINDS:
            raise ValueError(f"kind: expected {cls.__name__}.kind in {', '.join(KINDS)}, got {cls.kind!r}")
        cls.name = name
        ATTACKS[name] = cls
        return cls
    return register


def build_attack(name: str, seed: int, cfg=None, **data) -> Attack:
    """The attack ``name`` (a key of ``ATTACKS``) with options ``cfg`` (its config class's defaults
    where None) and ``seed``; ``data`` are the fields of :class:`AttackData` as keywords
    (``num_classes``, and ``x_val``/``y_val``, ``x_trigger``/``y_trigger`` where the attack uses them)."""
    if name not in ATTACKS:
        raise ValueError(f"name: expected one of {', '.join(ATTACKS)}, got {name!r}")
    known = [f.name for f in dataclasses.fields(AttackData)]
    for key in data:
        if key not in known:
            raise ValueError(f"{key}: not something an attacker knows; expected keywords from {', '.join(known)}")
    if "num_classes" not in data:
        raise ValueError("num_classes: expected the number of classes of the task (an integer >= 2), got none")
    cls = ATTACKS[name]
    return cls(cls.config_class() if cfg is None else cfg, AttackData(**data), seed)
