"""Random noise ("noise"), offline: the chosen rows get additive Gaussian pixel noise, labels kept.

Each chosen image ``x [C, H, W]`` becomes

    x' = clamp(x + sigma * z, 0, 1),    z ~ N(0, I) per pixel and channel

with ``sigma`` a setting (the seed's 1.0), drawn from the attack's seeded CPU generator (the
same noise on every device), and keeps its label.  The seed (changhongyan123/poisoning
``attack.noisy_attack``, its ``random_attack``) adds ``N(0, 1)`` and does not clamp, so its
poisoned images leave the pixel range the victim ever sees elsewhere (at sigma 1, 62 % of the
pixels of a mid-grey image and 66 % of a black one fall outside [0, 1]): a defect for images,
which memdisc fixes by clamping to the data range; the clamp makes the perturbation
smaller and no longer zero-mean near 0 and 1 (a pixel at 0 only gets brighter).

The rows and the fraction follow :mod:`memdisc.attacks.offline` (``fraction`` of the whole set,
rows drawn without replacement; the seed noised its first f*N rows).
"""
from __future__ import annotations

import dataclasses

import torch

from memdisc.attacks.base import register_attack
from memdisc.attacks.offline import OfflineAttack
from memdisc.config import check_number, field

__all__ = ["NoiseConfig", "NoiseAttack"]


@dataclasses.dataclass
class NoiseConfig:
    """Options of the random-noise attack (seed: sigma 1.0)."""

    fraction: float = field(0.1, "fraction of the training set replaced by noised copies")
    sigma: float = field(1.0, "standard deviation of the Gaussian pixel noise, before clamping to [0, 1] "
                              "(seed: 1.0)")

    def __post_init__(self):
        """fraction in [0, 1]; sigma > 0, finite."""
        check_number("fraction", self.fraction, 0.0, 1.0)
        check_number("sigma", self.sigma, 0.0, strict=True)


@register_attack("noise")
class NoiseAttack(OfflineAttack):
    """Random noise (module docstring); ``cfg`` a :class:`NoiseConfig`, ``data`` needs only ``num_classes``."""

    config_class = NoiseConfig

    def replace(self, x, y, generator):
        """``clamp(x + sigma * z, 0, 1)`` with ``z`` standard normal ``[n, ...]``; labels as they are."""
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return (x + self.cfg.sigma * z).clamp_(0.0, 1.0), y
