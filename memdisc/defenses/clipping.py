"""GC: ST with the gradient norm clipped before each optimizer step (the seed's baseline)."""
from __future__ import annotations

import math

from torch import nn

from memdisc.defenses.base import Defense


class GradientClipping(Defense):
    """GC: ST with the gradient norm clipped to ``bound`` before each step (seed: L-inf, 0.01)."""

    name = "GC"

    def __init__(self, norm: str = "inf", bound: float = 0.01):
        if norm not in ("inf", "2"):
            raise ValueError(f"norm: expected 'inf' or '2', got {norm!r}")
        if not bound > 0:
            raise ValueError(f"bound: expected > 0, got {bound}")
        self.norm_type, self.bound = (math.inf if norm == "inf" else 2.0), bound

    def clip_gradients(self, model: nn.Module) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), self.bound, norm_type=self.norm_type)

