"""BadNets ("badnets", Gu et al. 2017), offline: a white square patch in one corner, and a target label.

The trigger (:func:`stamp_patch`): every pixel of every channel in a ``p x p`` square at ``corner``
set to 1 (white), ``p = patch_size`` or, unset, ``max(1, round(5 * min(H, W) / 32))``: the
issue's 5x5 patch on 32x32 images, 4x4 on 28x28.  (The ASSET seed's ``posion_image_all2one``
whitens a 4x4 square one pixel in from the bottom-right corner of 32x32 images.)  The target label
and the rows poisoned follow :mod:`memdisc.attacks.backdoor` (all-to-one to ``target``, seed: 2;
or all-to-all); ``fraction`` of the set (seed: 5 %).
"""
from __future__ import annotations

import dataclasses

import torch

from memdisc.attacks.backdoor import BackdoorAttack, BackdoorConfig
from memdisc.attacks.base import register_attack
from memdisc.config import OptionError, check_choice, check_int, field

__all__ = ["PatchOptions", "BadNetsConfig", "BadNetsAttack", "CORNERS", "default_patch_size", "stamp_patch"]

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


def default_patch_size(height: int, width: int) -> int:
    """The default patch side for ``height x width`` images: 5 on 32, scaled, at least 1."""
    return max(1, round(5 * min(height, width) / 32))


def stamp_patch(x: torch.Tensor, patch_size: int | None, corner: str) -> torch.Tensor:
    """``[N, C, H, W]`` new tensor: ``x [N, C, H, W]`` with ``x'[:, :, rows, cols] = 1`` on the ``p x p`` square at
    ``corner`` (``p = patch_size``, or :func:`default_patch_size` where None); every other pixel as in ``x``.

    Raises:
        OptionError: naming ``patch_size`` when ``p`` exceeds the image's shorter side.
    """
    height, width = x.shape[-2:]
    p = default_patch_size(height, width) if patch_size is None else patch_size
    if p > min(height, width):
        raise OptionError("patch_size", f"expected at most the image side {min(height, width)}, got {p}")
    rows = slice(height - p, height) if corner.startswith("bottom") else slice(0, p)
    cols = slice(width - p, width) if corner.endswith("right") else slice(0, p)
    x = x.clone()
    x[:, :, rows, cols] = 1.0
    return x


@dataclasses.dataclass
class PatchOptions:
    """The patch trigger's options (BadNets', and the clean-label attack's by default)."""

    patch_size: int | None = field(None, "side of the square patch in pixels (None: 5 * min(H, W) / 32, rounded)")
    corner: str = field("bottom-right", "corner of the patch: bottom-right, bottom-left, top-right or top-left")

    def __post_init__(self):
        """Patch side >= 1 (or None); a known corner."""
        if self.patch_size is not None:
            check_int("patch_size", self.patch_size)
        check_choice("corner", self.corner, CORNERS)


@dataclasses.dataclass
class BadNetsConfig(PatchOptions, BackdoorConfig):
    """Options of BadNets (seed: a white patch, all-to-one to class 2, 5 % of the set): the backdoor's
    (fraction, mode, target), then the patch's (patch_size, corner)."""

    def __post_init__(self):
        BackdoorConfig.__post_init__(self)
        PatchOptions.__post_init__(self)


@register_attack("badnets")
class BadNetsAttack(BackdoorAttack):
    """BadNets (module docstring); ``cfg`` a :class:`BadNetsConfig`, ``data`` needs only ``num_classes``."""

    config_class = BadNetsConfig

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`stamp_patch` with the configured side and corner."""
        return stamp_patch(x, self.cfg.patch_size, self.cfg.corner)
