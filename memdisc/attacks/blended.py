"""Blended ("blended", Chen et al. 2017, arXiv 1712.05526), offline: a fixed random pattern blended into the image.

The trigger (:func:`blend`): ``x' = (1 - alpha) * x + alpha * P``, with ``P`` one pattern of the
image's shape ``[C, H, W]``, every pixel uniform in [0, 1] (:func:`blend_pattern`: Chen et al.'s
random-noise key, each pixel uniform over the pixel range), drawn from a CPU generator seeded
with ``pattern_seed``, not with the attack's seed: the same pattern for every attack seed, on
every device, and at test time.  ``x'`` stays in [0, 1] (a convex combination).

Chen et al. have two weights, ``alpha_train`` for the poisons (0.05 to 0.2 in their experiments) and
``alpha_test`` for the test inputs (at least as large); memdisc blends both with one ``alpha``
(default 0.15, inside the issue's 0.1 - 0.2), so the attack success rate is measured with the
trigger the model was trained on.
The target label and the rows poisoned follow :mod:`memdisc.attacks.backdoor` (all-to-one to
``target``, default 2; or all-to-all); ``fraction`` of the set (default 5 %).
"""
from __future__ import annotations

import dataclasses

import torch

from memdisc.attacks.backdoor import BackdoorAttack, BackdoorConfig
from memdisc.attacks.base import register_attack
from memdisc.config import OptionError, check_seed, field

__all__ = ["BlendOptions", "BlendedConfig", "BlendedAttack", "blend_pattern", "blend"]


def blend_pattern(shape: tuple[int, ...], pattern_seed: int) -> torch.Tensor:
    """``P``: a float32 CPU tensor of ``shape`` (``[C, H, W]``), ``torch.rand`` on a CPU generator seeded with
    ``pattern_seed`` (every pixel uniform in [0, 1); the same on every machine)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(pattern_seed))


def blend(x: torch.Tensor, alpha: float, pattern_seed: int) -> torch.Tensor:
    """``[N, C, H, W]`` new tensor ``(1 - alpha) * x + alpha * P`` for images ``x [N, C, H, W]``, with
    ``P = blend_pattern(x.shape[1:], pattern_seed)`` in x's dtype, on x's device."""
    pattern = blend_pattern(tuple(x.shape[1:]), pattern_seed).to(device=x.device, dtype=x.dtype)
    return (1.0 - alpha) * x + alpha * pattern


@dataclasses.dataclass
class BlendOptions:
    """The blended trigger's options (Blended's; the clean-label attack's with ``trigger = "blended"``)."""

    alpha: float = field(0.15, "blend weight of the pattern, x' = (1 - alpha) x + alpha P (Chen et al.: 0.05 - 0.2)")
    pattern_seed: int = field(0, "seed of the fixed uniform [0, 1] pattern P (not the attack's seed: one pattern "
                                 "for every attack seed and at test time)")

    def __post_init__(self):
        """alpha in (0, 1]; pattern_seed a seed in [0, 2**32)."""
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise OptionError("alpha", f"expected a number > 0 and <= 1, got {self.alpha!r}")
        check_seed("pattern_seed", self.pattern_seed)


@dataclasses.dataclass
class BlendedConfig(BlendOptions, BackdoorConfig):
    """Options of Blended: the backdoor's (fraction 5 %, mode, target 2), then the blend's (alpha, pattern_seed)."""

    def __post_init__(self):
        BackdoorConfig.__post_init__(self)
        BlendOptions.__post_init__(self)


@register_attack("blended")
class BlendedAttack(BackdoorAttack):
    """Blended (module docstring); ``cfg`` a :class:`BlendedConfig`, ``data`` needs only ``num_classes``."""

    config_class = BlendedConfig

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`blend` with the configured ``alpha`` and ``pattern_seed``."""
        return blend(x, self.cfg.alpha, self.cfg.pattern_seed)
