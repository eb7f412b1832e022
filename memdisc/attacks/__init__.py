"""Attacks on the training data.

    base.py          Attack (the interface), PoisonedBatch(x, y, poisoned), ATTACKS (name -> class)
    crafting.py      the gradient-alignment toolkit crafted poisons share
    accumulative.py  Pang et al.'s accumulative attack ("accumulative") and its options (AttackConfig)
"""
from memdisc.attacks.accumulative import AccumulativeAttack, AttackConfig
from memdisc.attacks.base import ATTACKS, Attack, PoisonedBatch, build_attack, register_attack
from memdisc.attacks.crafting import (NORM_EPS, accumulative_direction, craft_alignment, crafting_state,
                                      gradient_alignment)

__all__ = ["Attack", "PoisonedBatch", "ATTACKS", "register_attack", "build_attack", "AccumulativeAttack",
           "AttackConfig", "NORM_EPS", "gradient_alignment", "crafting_state", "craft_alignment",
           "accumulative_direction"]
