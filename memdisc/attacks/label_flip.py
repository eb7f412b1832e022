"""Label flipping ("label-flip"), offline: the chosen rows keep their pixels and get a wrong label.

* untargeted (the default): each chosen row gets a label drawn uniformly from the C - 1 classes
  other than its own, ``y' = (y + k) mod C`` with ``k`` uniform in ``{1, ..., C - 1}``, so a
  flipped row never keeps its true label;
* targeted (``source`` a and ``target`` b set): only rows of class a are chosen, and each gets b.

The rows: ``fraction`` of the whole set, drawn among the eligible rows (:mod:`memdisc.attacks.offline`);
or, with ``per_class``, the ASSET seed's rule: ``int(n_c * fraction)`` rows of each class c
(untargeted: every class; targeted: the source class only), drawn without replacement class by
class in class order, so ``fraction`` is of each class and the count is ``sum_c int(n_c * fraction)``.

The seed's label controls (ASSET, ``new_poi_util.py``) are label flipping with ``per_class``, each
registered under its own name with the seed's defaults (:class:`NoisyLabelConfig`, :class:`FlippingLabelConfig`):

* ``noisy_label`` = "noisy-label": untargeted, per class (the seed draws the new label with
  ``random.choice`` among the other classes: the same uniform law);
* ``flipping_label`` = "flipping-label": targeted ``source -> target`` (the seed's ``tar_lab`` pair), per
  class, i.e. ``int(n_source * fraction)`` rows of the source class.
"""
from __future__ import annotations

import dataclasses

import torch

from memdisc.attacks.base import AttackData, register_attack
from memdisc.attacks.offline import OfflineAttack
from memdisc.config import OptionError, check_int, check_number, field

__all__ = ["LabelFlipConfig", "LabelFlipAttack", "NoisyLabelConfig", "NoisyLabelAttack", "FlippingLabelConfig",
           "FlippingLabelAttack"]


@dataclasses.dataclass
class LabelFlipConfig:
    """Options of label flipping (untargeted unless ``source`` and ``target`` are set)."""

    fraction: float = field(0.1, "fraction of the training set whose labels are flipped (per_class: of each class)")
    source: int | None = field(None, "targeted: flip only rows of this class (with target)")
    target: int | None = field(None, "targeted: the label the source rows get (with source)")
    per_class: bool = field(False, "the ASSET seed's draw: int(n_c * fraction) rows of each class c (targeted: of "
                                   "the source class)")

    def __post_init__(self):
        """fraction in [0, 1]; source and target both set or both unset, class indices >= 0, different;
        per_class a bool."""
        check_number("fraction", self.fraction, 0.0, 1.0)
        for name, other in (("source", "target"), ("target", "source")):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, 0)
            elif getattr(self, other) is not None:
                raise OptionError(name, f"expected a class index with {other} set (targeted flip), got none")
        if self.source is not None and self.source == self.target:
            raise OptionError("target", f"expected a class other than source ({self.source}), got {self.target}")
        if not isinstance(self.per_class, bool):
            raise OptionError("per_class", f"expected true or false, got {self.per_class!r}")


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

    def eligible_rows(self) -> str:
        return "every row" if self.cfg.source is None else f"the rows of the source class {self.cfg.source}"

    def class_rows(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Per class drawn from (every class in order, or the source class), its rows ``[n_c]`` int64 (CPU)."""
        classes = range(self.data.num_classes) if self.cfg.source is None else [self.cfg.source]
        y = y.cpu()
        return [(y == c).nonzero().flatten() for c in classes]

    def count(self, y: torch.Tensor) -> int:
        """``round(fraction * N)``; per class ``sum_c int(n_c * fraction)`` (module docstring)."""
        if not self.cfg.per_class:
            return super().count(y)
        return sum(int(rows.numel() * self.cfg.fraction) for rows in self.class_rows(y))

    def choose(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """:meth:`OfflineAttack.choose`; per class, ``int(n_c * fraction)`` rows of each class, each drawn by
        ``torch.randperm`` on ``generator``, class by class."""
        if not self.cfg.per_class:
            return super().choose(y, generator)
        drawn = [rows[torch.randperm(rows.numel(), generator=generator)] for rows in self.class_rows(y)]
        return torch.cat([rows[:int(rows.numel() * self.cfg.fraction)] for rows in drawn])

    def replace(self, x, y, generator):
        """Pixels as they are; labels flipped (module docstring)."""
        if self.cfg.target is not None:
            return x, torch.full_like(y, self.cfg.target)
        c = self.data.num_classes
        shift = torch.randint(1, c, (y.shape[0],), generator=generator).to(y.device)
        return x, (y + shift) % c


@dataclasses.dataclass
class NoisyLabelConfig(LabelFlipConfig):
    """The seed's ``noisy_label``: untargeted label flipping, ``int(n_c * fraction)`` rows of every class
    (fraction 5 %, the seed notebook's poison rate)."""

    fraction: float = field(0.05, "fraction of each class whose labels are flipped (per_class) or of the set")
    per_class: bool = field(True, "the seed's draw: int(n_c * fraction) rows of each class c")


@register_attack("noisy-label")
class NoisyLabelAttack(LabelFlipAttack):
    """The seed's noisy labels: :class:`LabelFlipAttack` with a :class:`NoisyLabelConfig`."""

    config_class = NoisyLabelConfig


@dataclasses.dataclass
class FlippingLabelConfig(LabelFlipConfig):
    """The seed's ``flipping_label``: rows of class ``source`` relabelled ``target``, ``int(n_source * fraction)``
    of them.  The seed has no default pair; memdisc's, 0 -> 2, sends them to the backdoors' default target."""

    fraction: float = field(0.05, "fraction of the source class whose labels are flipped (per_class) or of the set")
    source: int | None = field(0, "the class whose rows are flipped")
    target: int | None = field(2, "the label they get (the backdoors' default target)")
    per_class: bool = field(True, "the seed's draw: int(n_source * fraction) rows of the source class")


@register_attack("flipping-label")
class FlippingLabelAttack(LabelFlipAttack):
    """The seed's flipped labels: :class:`LabelFlipAttack` with a :class:`FlippingLabelConfig`."""

    config_class = FlippingLabelConfig
