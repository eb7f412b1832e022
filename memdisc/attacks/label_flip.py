"""Label flipping ("label-flip"), offline: the chosen rows keep their pixels and get a wrong label.

* untargeted (the default): each chosen row gets a label drawn uniformly from the C - 1 classes
  other than its own, ``y' = (y + k) mod C`` with ``k`` uniform in ``{1, ..., C - 1}``, so a
  flipped row never keeps its true label;
* targeted (``source`` a and ``target`` b set): only rows of class a are chosen, and each gets b.

The rows and the fraction follow :mod:`memdisc.attacks.offline` (``fraction`` of the whole set).
"""
from __future__ import annotations

import dataclasses

import torch

from memdisc.attacks.base import AttackData, register_attack
from memdisc.attacks.offline import OfflineAttack
from memdisc.config import OptionError, check_int, check_number, field

__all__ = ["LabelFlipConfig", "LabelFlipAttack"]


@dataclasses.dataclass
class LabelFlipConfig:
    """Options of label flipping (untargeted unless ``source`` and ``target`` are set)."""

    fraction: float = field(0.1, "fraction of the training set whose labels are flipped")
    source: int | None = field(None, "targeted: flip only rows of this class (with target)")
    target: int | None = field(None, "targeted: the label the source rows get (with source)")

    def __post_init__(self):
        """fraction in [0, 1]; source and target both set or both unset, class indices >= 0, different."""
        check_number("fraction", self.fraction, 0.0, 1.0)
        for name, other in (("source", "target"), ("target", "source")):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, 0)
            elif getattr(self, other) is not None:
                raise OptionError(name, f"expected a class index with {other} set (targeted flip), got none")
        if self.source is not None and self.source == self.target:
            raise OptionError("target", f"expected a class other than source ({self.source}), got {self.target}")


@register_attack("label-flip")
class LabelFlipAttack(OfflineAttack):
    """Label flipping (module docstring); ``cfg`` a :class:`LabelFlipConfig`, ``data`` needs only
    ``num_classes`` (source and target must be below it)."""

    config_class = LabelFlipConfig

    def __init__(self, cfg: LabelFlipConfig, data: AttackData, seed: int):
        super().__init__(cfg, data, seed)
        for name in ("source", "target"):
            value = getattr(cfg, name)
            if value is not None and value >= data.num_classes:
                raise OptionError(name, f"expected a class index below num_classes={data.num_classes}, got {value}")

    def eligible(self, y: torch.Tensor) -> torch.Tensor | None:
        """Every row (untargeted), or the rows of class ``source`` (targeted)."""
        return None if self.cfg.source is None else y == self.cfg.source

    def replace(self, x, y, generator):
        """Pixels as they are; labels flipped (module docstring)."""
        if self.cfg.target is not None:
            return x, torch.full_like(y, self.cfg.target)
        c = self.data.num_classes
        shift = torch.randint(1, c, (y.shape[0],), generator=generator).to(y.device)
        return x, (y + shift) % c
