"""Defences: what the online model trains on, given each incoming batch.

    base.py         Defense (the interface, and ST), BatchReport, the shared PGD defaults
    clipping.py     GC, gradient-norm clipping
    adversarial.py  AT-seed and AT-madry, PGD on the batch before the step
    dsc.py          DSC, its ThresholdSchedule and its options (DSCConfig)
    filtering.py    DetectorDefense: any detector drops or down-weights the rows it flags (FilterConfig)
    registry.py     DEFENSES (name -> builder), build_defense, BaselineConfig (GC/AT options)

``Precision`` (memdisc.runtime) is the ``precision`` argument of DSC, SeedAT and MadryAT,
exported here with them.
"""
from memdisc.defenses.adversarial import MadryAT, SeedAT
from memdisc.defenses.base import PGD_EPS, PGD_ITERS, PGD_STEP_SIZE, BatchReport, Defense
from memdisc.defenses.clipping import GradientClipping
from memdisc.defenses.dsc import DSC, DSCConfig, ThresholdSchedule
from memdisc.defenses.filtering import DetectorDefense, FilterConfig
from memdisc.defenses.registry import DEFENSES, BaselineConfig, DefenseContext, build_defense
from memdisc.runtime import Precision

__all__ = ["Defense", "BatchReport", "GradientClipping", "SeedAT", "MadryAT", "DSC", "DSCConfig", "ThresholdSchedule",
           "DetectorDefense", "FilterConfig", "BaselineConfig", "DefenseContext", "DEFENSES", "build_defense",
           "Precision", "PGD_ITERS", "PGD_STEP_SIZE", "PGD_EPS"]
