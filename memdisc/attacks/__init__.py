"""Attacks on the training data.

    base.py          Attack (the interface), PoisonedBatch(x, y, poisoned), AttackData (what the attacker
                     knows), ATTACKS (name -> class), build_attack
    crafting.py      the gradient-alignment toolkit crafted poisons share
    accumulative.py  Pang et al.'s accumulative attack ("accumulative", online) and its options (AttackConfig)
    offline.py       OfflineAttack: a fraction of a training set replaced once, rows drawn without replacement
    label_flip.py    label flipping ("label-flip", offline; untargeted or source -> target; per class as the ASSET
                     seed), and the seed's label controls "noisy-label" and "flipping-label" (its defaults)
    noise.py         random noise ("noise", offline: Gaussian pixel noise, clamped to [0, 1], labels kept)
    loss_based.py    the loss-based attack ("loss", offline: copies of the highest-loss rows over other rows)
    backdoor.py      BackdoorAttack: what the backdoors share (target modes, rows, labels, apply_backdoor)
    badnets.py       BadNets ("badnets", offline backdoor: a white corner patch, all-to-one or all-to-all)
    blended.py       Blended ("blended", offline backdoor: a fixed uniform pattern blended in with weight alpha)
    clean_label.py   the clean-label backdoor ("clean-label", offline: target-class rows made hard by L-inf PGD on a
                     clean model, then stamped; labels kept)
    gradient.py      Yang et al.'s direct gradient poisons ("gradient", offline; autograd through unrolled steps)
    generative.py    Yang et al.'s generative poisons ("generative", offline; an auto-encoder generator)
"""
from memdisc.attacks.accumulative import AccumulativeAttack, AttackConfig
from memdisc.attacks.backdoor import TARGET_MODES, BackdoorAttack, BackdoorConfig
from memdisc.attacks.badnets import BadNetsAttack, BadNetsConfig
from memdisc.attacks.base import ATTACKS, KINDS, Attack, AttackData, PoisonedBatch, build_attack, register_attack
from memdisc.attacks.blended import BlendedAttack, BlendedConfig
from memdisc.attacks.clean_label import CleanLabelAttack, CleanLabelConfig
from memdisc.attacks.crafting import (NORM_EPS, accumulative_direction, craft_alignment, crafting_state,
                                      gradient_alignment)
from memdisc.attacks.generative import GenerativeAttack, GenerativeConfig
from memdisc.attacks.gradient import GradientAttack, GradientConfig
from memdisc.attacks.label_flip import (FlippingLabelAttack, FlippingLabelConfig, LabelFlipAttack, LabelFlipConfig,
                                        NoisyLabelAttack, NoisyLabelConfig)
from memdisc.attacks.loss_based import LossAttack, LossConfig
from memdisc.attacks.noise import NoiseAttack, NoiseConfig
from memdisc.attacks.offline import OfflineAttack, poison_count

__all__ = ["Attack", "PoisonedBatch", "AttackData", "KINDS", "ATTACKS", "register_attack", "build_attack",
           "AccumulativeAttack", "AttackConfig", "OfflineAttack", "poison_count", "LabelFlipAttack",
           "LabelFlipConfig", "NoiseAttack", "NoiseConfig", "LossAttack", "LossConfig", "BadNetsAttack",
           "BadNetsConfig", "BackdoorAttack", "BackdoorConfig", "TARGET_MODES", "BlendedAttack", "BlendedConfig",
           "CleanLabelAttack", "CleanLabelConfig", "NoisyLabelAttack", "NoisyLabelConfig", "FlippingLabelAttack",
           "FlippingLabelConfig", "GradientAttack", "GradientConfig", "GenerativeAttack", "GenerativeConfig",
           "NORM_EPS", "gradient_alignment", "crafting_state", "craft_alignment", "accumulative_direction"]
