"""BadNets ("badnets", Gu et al. 2017), offline: a white square patch in one corner, and a target label.

The backdoor: every pixel of every channel in a ``p x p`` square at ``corner`` set to 1 (white),
``p = patch_size`` or, unset, ``max(1, round(5 * min(H, W) / 32))``: the seed's 5x5 patch on
32x32 images, 4x4 on 28x28.  The target label:

* ``all-to-one`` (the seed's): every backdoored image goes to class ``target`` (seed: 2);
  only rows of other classes are poisoned, and at test time only they count for the ASR;
* ``all-to-all``: an image of class y goes to ``(y + 1) mod C``.

Training set: ``fraction`` of it (seed: 5 %) replaced by backdoored rows with target labels
(:mod:`memdisc.attacks.offline`); test time: :meth:`BadNetsAttack.apply_backdoor`, judged by
``memdisc.eval.classification.attack_success_rate``.
"""
from __future__ import annotations

import dataclasses

import torch

from memdisc.attacks.base import AttackData, register_attack
from memdisc.attacks.offline import OfflineAttack
from memdisc.checks import describe
from memdisc.config import OptionError, check_choice, check_int, check_number, field

__all__ = ["BadNetsConfig", "BadNetsAttack", "TARGET_MODES", "CORNERS", "default_patch_size"]

TARGET_MODES = ("all-to-one", "all-to-all")
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


def default_patch_size(height: int, width: int) -> int:
    """The default patch side for ``height x width`` images: the seed's 5 on 32, scaled, at least 1."""
    return max(1, round(5 * min(height, width) / 32))


@dataclasses.dataclass
class BadNetsConfig:
    """Options of BadNets (seed: a 5x5 white patch on 32x32, all-to-one to class 2, 5 % of the set)."""

    fraction: float = field(0.05, "fraction of the training set replaced by backdoored rows")
    mode: str = field("all-to-one", "all-to-one (every backdoored image to target) or all-to-all (y + 1 mod C)")
    target: int = field(2, "all-to-one: the target class")
    patch_size: int | None = field(None, "side of the square patch in pixels (None: 5 * min(H, W) / 32, rounded)")
    corner: str = field("bottom-right", "corner of the patch: bottom-right, bottom-left, top-right or top-left")

    def __post_init__(self):
        """fraction in [0, 1]; a known mode and corner; target a class index >= 0; patch side >= 1."""
        check_number("fraction", self.fraction, 0.0, 1.0)
        check_choice("mode", self.mode, TARGET_MODES)
        check_int("target", self.target, 0)
        if self.patch_size is not None:
            check_int("patch_size", self.patch_size)
        check_choice("corner", self.corner, CORNERS)


@register_attack("badnets")
class BadNetsAttack(OfflineAttack):
    """BadNets (module docstring); ``cfg`` a :class:`BadNetsConfig`, ``data`` needs only ``num_classes``."""

    config_class = BadNetsConfig

    def __init__(self, cfg: BadNetsConfig, data: AttackData, seed: int):
        super().__init__(cfg, data, seed)
        if cfg.mode == "all-to-one" and cfg.target >= data.num_classes:
            raise OptionError("target", f"expected a class index below num_classes={data.num_classes}, "
                                        f"got {cfg.target}")

    def eligible(self, y: torch.Tensor) -> torch.Tensor | None:
        """All-to-one: the rows not already of the target class; all-to-all: every row."""
        return y != self.cfg.target if self.cfg.mode == "all-to-one" else None

    def replace(self, x, y, generator):
        """The chosen rows backdoored, with their target labels."""
        return self._backdoor(x, y)

    def apply_backdoor(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x with the patch [N, C, H, W], y_target [N])`` for test images ``x [N, C, H, W]``, labels ``y [N]``."""
        self.check_received(x, y)
        return self._backdoor(x, y)

    def check_received(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Images ``x [N, C, H, W]`` (a patch needs a height and a width), labels ``y [N]``."""
        super().check_received(x, y)
        if x.dim() != 4:
            raise ValueError(f"x: expected images [N, C, H, W], got {describe(x)}")

    def _backdoor(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = x.shape[-2:]
        p = default_patch_size(height, width) if self.cfg.patch_size is None else self.cfg.patch_size
        if p > min(height, width):
            raise OptionError("patch_size", f"expected at most the image side {min(height, width)}, got {p}")
        rows = slice(height - p, height) if self.cfg.corner.startswith("bottom") else slice(0, p)
        cols = slice(width - p, width) if self.cfg.corner.endswith("right") else slice(0, p)
        x = x.clone()
        x[:, :, rows, cols] = 1.0
        if self.cfg.mode == "all-to-one":
            return x, torch.full_like(y, self.cfg.target)
        return x, (y + 1) % self.data.num_classes
