"""The defences by name, and the one function that builds any of them from its options.

``DEFENSES`` maps each name (``--online-defense``, ``compare --defenses``) to a builder;
:func:`build_defense` takes the component sections (``DSCConfig``, ``BaselineConfig``,
``FilterConfig``), never a run's whole configuration, so no run module is imported here.  A defence added
to ``DEFENSES`` is picked up by the CLI's choices and by the contract tests
(tests/test_contracts.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from memdisc.config import check_choice, check_int, check_number, field
from memdisc.defenses.adversarial import MadryAT, SeedAT
from memdisc.defenses.base import PGD_EPS, PGD_ITERS, PGD_STEP_SIZE, Defense
from memdisc.defenses.clipping import GradientClipping
from memdisc.defenses.dsc import DSC, DSCConfig, ThresholdSchedule
from memdisc.defenses.filtering import DetectorDefense, FilterConfig
from memdisc.detectors import DETECTORS
from memdisc.runtime import Precision
from memdisc.runtime.distributed import LOCAL, Comm
from memdisc.snapshots import SnapshotSet


@dataclasses.dataclass
class BaselineConfig:
    """The options of the baselines GC and AT (the ``[online.baselines]`` section)."""

    gc_norm: str = field("inf", "GC: gradient norm, inf or 2")
    gc_bound: float = field(0.01, "GC: gradient norm bound")
    at_iters: int = field(PGD_ITERS, "AT: PGD steps")
    at_step_size: float = field(PGD_STEP_SIZE, "AT: step size")
    at_eps: float = field(PGD_EPS, "AT: L-inf radius")
    at_kl_weight: float | None = field(None, "AT-seed: weight of the KL-to-natural-output term (none: 1/C, "
                                             "as the seed's nn.KLDivLoss mean)")

    def __post_init__(self):
        """GC norm inf or 2 and bound > 0; AT steps >= 0, step size > 0, eps in [0, 1], KL weight >= 0."""
        check_choice("gc_norm", self.gc_norm, ("inf", "2"))
        check_number("gc_bound", self.gc_bound, 0.0, strict=True)
        check_int("at_iters", self.at_iters, 0)
        check_number("at_step_size", self.at_step_size, 0.0, strict=True)
        check_number("at_eps", self.at_eps, 0.0, 1.0)
        if self.at_kl_weight is not None:
            check_number("at_kl_weight", self.at_kl_weight, 0.0)



@dataclasses.dataclass(frozen=True)
class DefenseContext:
    """What a defence may use besides its options: the historical models, the defender's clean
    held-out batch ``(x [N, ...], y [N])`` (DSC's calibration), a seed and the precision of the
    correction loops, and the communication object of a run over several processes (DSC's global values)."""
    snapshots: SnapshotSet
    heldout: tuple[torch.Tensor, torch.Tensor] | None
    seed: int = 0
    precision: Precision = Precision()
    comm: Comm = LOCAL


Builder = Callable[[DSCConfig, BaselineConfig, FilterConfig, DefenseContext], Defense]
"""How ``DEFENSES`` builds a defence from the option sections and the context."""


def _dsc(mode: str) -> Builder:
    def build(d: DSCConfig, b: BaselineConfig, f: FilterConfig, ctx: DefenseContext) -> Defense:
        schedule = ThresholdSchedule(d.threshold, d.tau0, d.slope, d.quantile, d.recalibrate_every)
        return DSC(ctx.snapshots, mode=mode, schedule=schedule, iters=d.iters, step_size=d.step_size, eps=d.eps,
                   reduce=d.reduce, heldout=ctx.heldout, seed=ctx.seed, precision=ctx.precision,
                   comm=ctx.comm)
    return build


def _filter(detector: str, action: str) -> Builder:
    """The registered ``detector`` (with the ``reduce`` option) as a defence that does ``action`` to the rows
    it flags, its threshold calibrated on the held-out batch."""
    def build(d: DSCConfig, b: BaselineConfig, f: FilterConfig, ctx: DefenseContext) -> Defense:
        if ctx.heldout is None:
            raise ValueError(f"heldout: {detector}-{action} needs the defender's clean held-out batch (x, y)")
        schedule = ThresholdSchedule("calibrated", quantile=f.quantile, every=f.recalibrate_every)
        return DetectorDefense(DETECTORS[detector](ctx.snapshots, reduce=f.reduce), action, ctx.heldout, schedule,
                               f.flagged_weight, ctx.comm)
    return build


DEFENSES: dict[str, Builder] = {
    "ST": lambda d, b, f, ctx: Defense(),
    "GC": lambda d, b, f, ctx: GradientClipping(b.gc_norm, b.gc_bound),
    "AT-seed": lambda d, b, f, ctx: SeedAT(b.at_iters, b.at_step_size, b.at_eps, b.at_kl_weight, ctx.precision),
    "AT-madry": lambda d, b, f, ctx: MadryAT(b.at_iters, b.at_step_size, b.at_eps, ctx.precision),
    "DSC-batch": _dsc("batch"),
    "DSC-sample": _dsc("sample"),
    "MD-drop": _filter("MD", "drop"),
    "MD-reweight": _filter("MD", "reweight"),
}
"""Every defence by name (``compare`` runs the ones its ``defenses`` option lists, in this order)."""


def build_defense(name: str, ctx: DefenseContext, dsc: DSCConfig | None = None,
                  baselines: BaselineConfig | None = None, filtering: FilterConfig | None = None) -> Defense:
    """The defence ``name`` (a key of ``DEFENSES``) with its options (defaults where None)."""
    if name not in DEFENSES:
        raise ValueError(f"name: expected one of {', '.join(DEFENSES)}, got {name!r}")
    return DEFENSES[name](dsc or DSCConfig(), baselines or BaselineConfig(), filtering or FilterConfig(), ctx)
