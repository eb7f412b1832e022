"""What the backdoor attacks share (issue 14): target modes, the rows they poison, the labels, the test-time backdoor.

A backdoor attack replaces ``fraction`` of the training set (:mod:`memdisc.attacks.offline`) by
chosen rows with a trigger *stamped* on them, ``x' = stamp(x)`` (each subclass says how: BadNets'
patch, Blended's pattern), labelled with their target:

* ``all-to-one``: every stamped image goes to class ``target`` (the ASSET seed's: 2); only rows of
  the other classes are poisoned, and at test time only they count for the ASR;
* ``all-to-all``: an image of class y goes to ``(y + 1) mod C`` (the seed's ``backdoor_all2all``);
  every row may be poisoned.

At test time :meth:`BackdoorAttack.apply_backdoor` stamps the same trigger on test images and
gives each its target, judged by ``memdisc.eval.classification.attack_success_rate``.
"""
from __future__ import annotations

import abc
import dataclasses

import torch

from memdisc.attacks.base import AttackData
from memdisc.attacks.offline import OfflineAttack
from memdisc.checks import describe
from memdisc.config import OptionError, check_choice, check_int, check_number, field

__all__ = ["TARGET_MODES", "BackdoorConfig", "BackdoorAttack"]

TARGET_MODES = ("all-to-one", "all-to-all")


@dataclasses.dataclass
class BackdoorConfig:
    """The options every backdoor with a target mode has (the seed's: 5 % of the set, all-to-one to class 2)."""

    fraction: float = field(0.05, "fraction of the training set replaced by backdoored rows")
    mode: str = field("all-to-one", "all-to-one (every backdoored image to target) or all-to-all (y + 1 mod C)")
    target: int = field(2, "all-to-one: the target class")

    def __post_init__(self):
        """fraction in [0, 1]; a known mode; target a class index >= 0."""
        check_number("fraction", self.fraction, 0.0, 1.0)
        check_choice("mode", self.mode, TARGET_MODES)
        check_int("target", self.target, 0)


class BackdoorAttack(OfflineAttack):
    """A backdoor (module docstring).  ``cfg`` has ``fraction`` and ``target`` (and ``mode``, unless the
    subclass fixes :attr:`mode`); ``data`` needs only ``num_classes``.  A subclass implements :meth:`stamp`."""

    def __init__(self, cfg, data: AttackData, seed: int):
        super().__init__(cfg, data, seed)
        if self.mode == "all-to-one" and cfg.target >= data.num_classes:
            raise OptionError("target", f"expected a class index below num_classes={data.num_classes}, "
                                        f"got {cfg.target}")

    @property
    def mode(self) -> str:
        """The target mode, one of :data:`TARGET_MODES` (``cfg.mode``)."""
        return self.cfg.mode

    @abc.abstractmethod
    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` new tensor: the images ``x [N, C, H, W]`` (pixels in [0, 1]) with the trigger, in [0, 1]."""

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        """``[N]`` int64, the label the attacker wants for images of class ``y [N]``: ``target`` (all-to-one) or
        ``(y + 1) mod C`` (all-to-all)."""
        if self.mode == "all-to-one":
            return torch.full_like(y, self.cfg.target)
        return (y + 1) % self.data.num_classes

    def eligible(self, y: torch.Tensor) -> torch.Tensor | None:
        """All-to-one: the rows not already of the target class; all-to-all: every row."""
        return y != self.cfg.target if self.mode == "all-to-one" else None

    def eligible_rows(self) -> str:
        return f"the rows not of the target class {self.cfg.target}" if self.mode == "all-to-one" else "every row"

    def replace(self, x, y, generator):
        """The chosen rows stamped, with their target labels."""
        return self.stamp(x), self.target_labels(y)

    def apply_backdoor(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stamp(x) [N, C, H, W], target_labels(y) [N])`` for test images ``x [N, C, H, W]``, labels ``y [N]``."""
        self.check_received(x, y)
        return self.stamp(x), self.target_labels(y)

    def check_received(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Images ``x [N, C, H, W]`` (a trigger needs a height and a width), labels ``y [N]``."""
        super().check_received(x, y)
        if x.dim() != 4:
            raise ValueError(f"x: expected images [N, C, H, W], got {describe(x)}")
