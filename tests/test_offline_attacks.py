"""The offline attacks (label-flip, badnets) and the attack success rate of a backdoor.

The contract every offline attack keeps (round(fraction * N) distinct rows, the others untouched,
determinism, bad arguments) is in tests/test_contracts.py; here, what each attack does to a row.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memdisc.attacks import (AttackData, BadNetsAttack, BadNetsConfig, LabelFlipAttack, LabelFlipConfig,
                             build_attack, poison_count)
from memdisc.eval.classification import attack_success_rate, error_rate

C = 10


def training_set(n: int = 400, side: int = 28, channels: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # pixels below 1, so a white patch pixel is always a change
    return 0.9 * torch.rand(n, channels, side, side, generator=g), torch.randint(0, C, (n,), generator=g)


def label_flip(seed: int = 0, **options) -> LabelFlipAttack:
    return LabelFlipAttack(LabelFlipConfig(**options), AttackData(C), seed)


def badnets(seed: int = 0, **options) -> BadNetsAttack:
    return BadNetsAttack(BadNetsConfig(**options), AttackData(C), seed)


# --------------------------------------------------------------------------- shared row choice
def test_poison_count_rounds_to_the_nearest_integer_ties_to_even():
    assert [poison_count(f, n) for f, n in ((0.05, 400), (0.1, 8), (0.05, 50), (0.05, 70), (0.0, 9), (1.0, 9))] \
        == [20, 1, 2, 4, 0, 9]


def test_offline_attacks_take_the_model_or_none_and_build_by_name():
    x, y = training_set()
    by_name = build_attack("label-flip", 4, LabelFlipConfig(fraction=0.3), num_classes=C).poison(None, x, y, 0)
    direct = label_flip(4, fraction=0.3).poison(nn.Linear(1, 1), x, y, 0)
    assert torch.equal(by_name.y, direct.y) and torch.equal(by_name.poisoned, direct.poisoned)


# --------------------------------------------------------------------------- label flip
def test_label_flip_never_keeps_the_true_label_and_leaves_pixels_alone():
    x, y = training_set(2000)
    out = label_flip(fraction=0.5).poison(None, x, y, 0)
    assert int(out.poisoned.sum()) == 1000
    assert bool((out.y[out.poisoned] != y[out.poisoned]).all())
    assert torch.equal(out.x, x)


def test_label_flip_draws_the_new_label_uniformly_from_the_other_classes():
    x, y = training_set(20000, side=2)
    out = label_flip(fraction=1.0).poison(None, x, y, 0)
    shift = (out.y - y) % C  # 1 .. C-1, each with probability 1/(C-1)
    counts = torch.bincount(shift, minlength=C).float()
    assert counts[0] == 0
    expected = 20000 / (C - 1)  # 2222; binomial sd ~ 44: a 5-sd band
    assert bool(((counts[1:] - expected).abs() < 5 * 44).all()), counts


def test_targeted_label_flip_moves_only_source_rows_to_the_target():
    x, y = training_set(1000)
    out = label_flip(fraction=0.05, source=3, target=7).poison(None, x, y, 0)
    assert int(out.poisoned.sum()) == 50
    assert bool((y[out.poisoned] == 3).all()) and bool((out.y[out.poisoned] == 7).all())
    with pytest.raises(ValueError, match=r"^fraction: 0.5 of 1000 rows is 500 rows, but only \d+ may be poisoned"):
        label_flip(fraction=0.5, source=3, target=7).poison(None, x, y, 0)


@pytest.mark.parametrize("options, option", [
    ({"fraction": -0.1}, "fraction"), ({"fraction": 1.01}, "fraction"), ({"source": 3}, "target"),
    ({"target": 3}, "source"), ({"source": 3, "target": 3}, "target"), ({"source": -1, "target": 2}, "source"),
    ({"source": 1.0, "target": 2}, "source")])
def test_label_flip_config_names_the_bad_option(options, option):
    with pytest.raises(ValueError, match=f"^{option}:"):
        LabelFlipConfig(**options)


def test_label_flip_classes_must_exist():
    with pytest.raises(ValueError, match=r"^target: expected a class index below num_classes=10, got 10"):
        label_flip(source=1, target=10)


# --------------------------------------------------------------------------- BadNets
@pytest.mark.parametrize("side, channels, corner, rows, cols", [
    (28, 1, "bottom-right", slice(24, 28), slice(24, 28)),  # the seed's 5x5 on 32x32, scaled: 4x4
    (32, 3, "bottom-right", slice(27, 32), slice(27, 32)),  # the seed's
    (32, 3, "top-left", slice(0, 5), slice(0, 5)),
    (28, 1, "top-right", slice(0, 4), slice(24, 28)),
    (28, 1, "bottom-left", slice(24, 28), slice(0, 4))])
def test_badnets_patch_pixels_are_exactly_white_in_the_corner_and_nothing_else_moves(side, channels, corner, rows,
                                                                                    cols):
    x, y = training_set(200, side, channels)
    out = badnets(corner=corner).poison(None, x, y, 0)
    assert int(out.poisoned.sum()) == 10  # 5 % of 200
    patch = torch.zeros(side, side, dtype=torch.bool)
    patch[rows, cols] = True
    xp, x0 = out.x[out.poisoned], x[out.poisoned]
    assert bool((xp[:, :, patch] == 1.0).all())
    assert torch.equal(xp[:, :, ~patch], x0[:, :, ~patch])
    assert torch.equal(out.x[~out.poisoned], x[~out.poisoned])


def test_badnets_patch_size_option_and_its_bound():
    x, y = training_set(100, side=8)
    for options, pixels in (({"patch_size": 3}, 9), ({}, 1)):  # the default on 8x8: max(1, round(1.25)) = 1
        out = badnets(fraction=0.1, **options).poison(None, x, y, 0)
        changed = (out.x[out.poisoned] != x[out.poisoned]).flatten(1).sum(1)
        assert changed.shape == (10,) and bool((changed == pixels).all())
    with pytest.raises(ValueError, match="^patch_size: expected at most the image side 8, got 9"):
        badnets(patch_size=9).poison(None, x, y, 0)


def test_badnets_all_to_one_poisons_other_classes_only_and_labels_them_the_target():
    x, y = training_set(400)
    out = badnets(target=2).poison(None, x, y, 0)
    assert int(out.poisoned.sum()) == 20
    assert bool((y[out.poisoned] != 2).all()) and bool((out.y[out.poisoned] == 2).all())
    with pytest.raises(ValueError, match=r"^fraction: 0.2 of 400 rows is 80 rows, but only 0 may be poisoned"):
        badnets(target=2, fraction=0.2).poison(None, x, torch.full_like(y, 2), 0)


def test_badnets_all_to_all_labels_are_the_next_class():
    x, y = training_set(400)
    out = badnets(mode="all-to-all").poison(None, x, y, 0)
    assert int(out.poisoned.sum()) == 20
    assert torch.equal(out.y[out.poisoned], (y[out.poisoned] + 1) % C)
    x_bd, target = badnets(mode="all-to-all").apply_backdoor(x, y)
    assert torch.equal(target, (y + 1) % C) and bool((x_bd[:, :, 24:, 24:] == 1).all())


@pytest.mark.parametrize("options, option", [
    ({"fraction": 2.0}, "fraction"), ({"mode": "one-to-one"}, "mode"), ({"target": -1}, "target"),
    ({"patch_size": 0}, "patch_size"), ({"corner": "middle"}, "corner")])
def test_badnets_config_names_the_bad_option(options, option):
    with pytest.raises(ValueError, match=f"^{option}:"):
        BadNetsConfig(**options)


def test_badnets_refuses_a_target_outside_the_classes_and_non_images():
    with pytest.raises(ValueError, match="^target: expected a class index below num_classes=10, got 10"):
        badnets(target=10)
    x, y = training_set(20)
    with pytest.raises(ValueError, match=r"^x: expected images \[N, C, H, W\]"):
        badnets().apply_backdoor(x.flatten(1), y)


# --------------------------------------------------------------------------- attack success rate
class LabelReader(nn.Module):
    """A hand-built classifier of ``training_set``-like images whose answer is known: pixel (0, 0)
    encodes the label, ``(label + 0.5) / 10``; an image with a white bottom-right pixel goes to
    ``backdoor(label)`` unless pixel (0, 1) is 0.5 (a row immune to the backdoor)."""

    def __init__(self, backdoor):
        super().__init__()
        self.backdoor = backdoor

    def forward(self, x):
        label = (x[:, 0, 0, 0] * C).floor().long()
        fooled = (x[:, 0, -1, -1] == 1.0) & (x[:, 0, 0, 1] != 0.5)
        return F.one_hot(torch.where(fooled, self.backdoor(label), label), C).float()


def encoded(labels: list[int], immune: list[int]):
    x = torch.zeros(len(labels), 1, 8, 8)
    y = torch.tensor(labels)
    x[:, 0, 0, 0] = (y + 0.5) / C
    x[immune, 0, 0, 1] = 0.5
    return x, y


def test_attack_success_rate_on_a_hand_built_model_all_to_one():
    labels = list(range(C)) * 3  # 30 rows, 3 of the target class 2: 27 count
    x, y = encoded(labels, immune=[0, 1, 2, 4, 13])  # rows 0, 1, 4, 13 are of other classes; row 2 is class 2
    model = LabelReader(lambda label: torch.full_like(label, 2))
    assert error_rate(model, x, y) == 0.0
    attack = badnets(target=2)
    assert attack_success_rate(model, attack, x, y) == pytest.approx((27 - 4) / 27)
    assert attack_success_rate(model, attack, x, y, batch_size=7) == pytest.approx((27 - 4) / 27)


def test_attack_success_rate_on_a_hand_built_model_all_to_all():
    x, y = encoded(list(range(C)) * 2, immune=[3, 5, 17])  # every row counts
    model = LabelReader(lambda label: (label + 1) % C)
    assert attack_success_rate(model, badnets(mode="all-to-all"), x, y) == pytest.approx(17 / 20)
    # a model that ignores the patch: no success; one that sends it elsewhere: none either
    assert attack_success_rate(LabelReader(lambda label: label), badnets(mode="all-to-all"), x, y) == 0.0
    assert attack_success_rate(LabelReader(lambda label: (label + 2) % C), badnets(mode="all-to-all"), x, y) == 0.0


def test_attack_success_rate_refuses_attacks_without_a_backdoor_and_test_sets_of_the_target_only():
    x, y = encoded([2, 2, 2], immune=[])
    model = LabelReader(lambda label: torch.full_like(label, 2))
    with pytest.raises(ValueError, match="^y: no test row has a label other than its backdoor target"):
        attack_success_rate(model, badnets(target=2), x, y)
    with pytest.raises(ValueError, match="^attack: LabelFlipAttack plants no backdoor"):
        attack_success_rate(model, label_flip(), x, y)
    with pytest.raises(ValueError, match="^y: expected an int64"):
        attack_success_rate(model, badnets(), x, y.int())


def test_attack_success_rate_restores_the_model_mode():
    x, y = encoded(list(range(C)), immune=[])
    model = LabelReader(lambda label: torch.full_like(label, 2)).train()
    attack_success_rate(model, badnets(), x, y)
    assert model.training


def test_attack_success_rate_refuses_a_non_attack_and_a_target_the_model_cannot_output():
    x, y = encoded(list(range(C)), immune=[])
    model = LabelReader(lambda label: torch.full_like(label, 2))
    with pytest.raises(ValueError, match="^attack: expected a memdisc Attack with a backdoor"):
        attack_success_rate(model, None, x, y)
    wide = BadNetsAttack(BadNetsConfig(target=50), AttackData(100), 0)
    with pytest.raises(ValueError, match="^attack: its backdoor targets class 50, but the model has 10 outputs"):
        attack_success_rate(model, wide, x, y)
