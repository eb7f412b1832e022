"""The backdoor attacks of issue 14 (blended, clean-label, on the shared BackdoorAttack) and the ASSET seed's
label controls (noisy-label, flipping-label: label flipping with per-class draws).

What every attack keeps (shapes, determinism, round(fraction * N) rows, bad arguments) is in
tests/test_contracts.py, and BadNets' patch and the ASR in tests/test_offline_attacks.py; here, what
each new attack does to a row, against values computed here by other means.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memdisc.attacks import (ATTACKS, AttackData, BackdoorAttack, BlendedAttack, BlendedConfig, CleanLabelAttack,
                             CleanLabelConfig, LabelFlipAttack, LabelFlipConfig, build_attack)
from memdisc.attacks.clean_label import loss_ascent

pytestmark = pytest.mark.usefixtures("single_thread")
C = 10


def images(n: int = 300, side: int = 8, channels: int = 1, seed: int = 0, low: float = 0.0, high: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(n, channels, side, side, generator=g)
    return x, torch.randint(0, C, (n,), generator=g)


def blended(seed: int = 0, **options) -> BlendedAttack:
    return BlendedAttack(BlendedConfig(**options), AttackData(C), seed)


def clean_label(seed: int = 0, **options) -> CleanLabelAttack:
    return CleanLabelAttack(CleanLabelConfig(**options), AttackData(C), seed)


class Linear(nn.Module):
    """A linear classifier of flattened images (its CE is convex in the input, so every signed ascent step
    that moves a pixel raises it)."""

    def __init__(self, side: int = 8, channels: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(channels * side * side, C)

    def forward(self, x):
        return self.head(x.flatten(1))


class SmallConv(nn.Module):
    """A small non-linear classifier with dropout (so its mode matters)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4 * 8 * 8, C)

    def forward(self, x):
        return self.head(self.drop(F.relu(self.conv(x))).flatten(1))


def test_the_backdoors_share_one_base_and_are_registered():
    for name in ("badnets", "blended", "clean-label"):
        assert issubclass(ATTACKS[name], BackdoorAttack)
    for name in ("noisy-label", "flipping-label"):  # label flipping with other defaults, not a copy
        assert ATTACKS[name].__mro__[1] is LabelFlipAttack


# --------------------------------------------------------------------------- blended
def pattern_from(x_clean, x_blend, alpha):
    """The pattern P a blend x' = (1 - alpha) x + alpha P used, solved for P row by row."""
    return (x_blend - (1 - alpha) * x_clean) / alpha


def test_blended_stamp_is_the_convex_blend_with_a_uniform_pattern_of_the_image_shape():
    alpha = 0.2
    attack = blended(alpha=alpha)
    zeros, ones = torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32)
    p = attack.stamp(zeros) / alpha  # x = 0: x' = alpha P
    assert p.shape == (2, 3, 32, 32) and torch.equal(p[0], p[1])  # one pattern for every image
    torch.testing.assert_close(attack.stamp(ones), 1 - alpha + alpha * p)  # x = 1: x' = 1 - alpha + alpha P
    assert 0 <= float(p.min()) and float(p.max()) < 1 and abs(float(p.mean()) - 0.5) < 0.02  # uniform [0, 1)
    assert p[0].std(dim=(1, 2)).min() > 0.25  # not constant along any channel (uniform: std 0.289)
    # the pattern is torch.rand of the image shape on a CPU generator seeded with pattern_seed
    torch.testing.assert_close(p[0], torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)))
    x, _ = images(5, side=32, channels=3)
    torch.testing.assert_close(attack.stamp(x), 0.8 * x + 0.2 * p[:1])
    assert attack.stamp(x.double()).dtype == torch.float64


def test_blended_pattern_is_fixed_across_attack_seeds_and_the_same_in_training_and_at_test_time():
    x, y = images(400)
    alpha = 0.15
    patterns = []
    for seed in (0, 3):
        attack = blended(seed)
        out = attack.poison(None, x, y, 0)
        rows = out.poisoned
        train_p = pattern_from(x[rows], out.x[rows], alpha)
        torch.testing.assert_close(train_p, train_p[:1].expand_as(train_p))  # one pattern on every poisoned row
        x_test, _ = attack.apply_backdoor(x[:7], y[:7])
        torch.testing.assert_close(pattern_from(x[:7], x_test, alpha), train_p[:7])
        patterns.append(train_p[0])
    torch.testing.assert_close(patterns[0], patterns[1])
    other = pattern_from(x[:1], blended(pattern_seed=1).apply_backdoor(x[:1], y[:1])[0], alpha)
    assert (other[0] - patterns[0]).abs().max() > 0.5


def test_blended_labels_and_rows_follow_the_target_mode():
    x, y = images(400)
    one = blended(target=4).poison(None, x, y, 0)
    assert int(one.poisoned.sum()) == 20  # round(0.05 * 400)
    assert bool((y[one.poisoned] != 4).all()) and bool((one.y[one.poisoned] == 4).all())
    assert torch.equal(one.y[~one.poisoned], y[~one.poisoned]) and torch.equal(one.x[~one.poisoned], x[~one.poisoned])
    every = blended(mode="all-to-all", fraction=0.5).poison(None, x, y, 0)
    assert torch.equal(every.y[every.poisoned], (y[every.poisoned] + 1) % C)
    assert bool((y[every.poisoned] == 2).any())  # all-to-all poisons the default target class too
    _, t = blended(mode="all-to-all").apply_backdoor(x, y)
    assert torch.equal(t, (y + 1) % C)


@pytest.mark.parametrize("options, option", [({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"),
                                             ({"alpha": float("nan")}, "alpha"), ({"alpha": True}, "alpha"),
                                             ({"pattern_seed": -1}, "pattern_seed"), ({"mode": "one"}, "mode"),
                                             ({"target": -1}, "target"), ({"fraction": 2.0}, "fraction")])
def test_blended_config_names_the_bad_option(options, option):
    with pytest.raises(ValueError, match=f"^{option}:"):
        BlendedConfig(**options)


def test_blended_refuses_a_target_outside_the_classes_and_a_fraction_above_the_eligible_rows():
    with pytest.raises(ValueError, match="^target: expected a class index below num_classes=10, got 10"):
        blended(target=10)
    x, y = images(40)
    y[:] = 2
    y[:3] = 0  # 3 rows of other classes may be poisoned, 0.1 * 40 = 4 are asked for
    with pytest.raises(ValueError, match=r"^fraction: 0.1 of 40 rows is 4 rows, but only 3 may be poisoned by blended "
                                         r"\(the rows not of the target class 2\); expected a fraction <= 0.075"):
        blended(fraction=0.1).poison(None, x, y, 0)


# --------------------------------------------------------------------------- the seed's label controls
def uneven_labels() -> torch.Tensor:
    """Classes of 0, 3, 7, 10, 19, 20, 21, 40, 41 and 59 rows, shuffled."""
    sizes = [0, 3, 7, 10, 19, 20, 21, 40, 41, 59]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(5))], sizes


def test_noisy_label_draws_the_seeds_per_class_counts_and_never_keeps_a_label():
    y, sizes = uneven_labels()
    x = torch.rand(y.numel(), 1, 2, 2)
    attack = build_attack("noisy-label", 0, num_classes=C)
    assert attack.cfg.fraction == 0.05 and attack.cfg.per_class
    out = attack.poison(None, x, y, 0)
    expected = [n // 20 for n in sizes]  # int(n_c * 0.05), in integers
    assert torch.bincount(y[out.poisoned], minlength=C).tolist() == expected == [0, 0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert attack.count(y) == sum(expected) == 8  # not round(0.05 * 219) = 11
    assert bool((out.y[out.poisoned] != y[out.poisoned]).all()) and torch.equal(out.x, x)
    quarter = build_attack("noisy-label", 0, type(attack.cfg)(fraction=0.25), num_classes=C).poison(None, x, y, 0)
    assert torch.bincount(y[quarter.poisoned], minlength=C).tolist() == [n // 4 for n in sizes]


def test_noisy_label_is_label_flip_with_per_class_not_a_copy():
    y, _ = uneven_labels()
    x = torch.rand(y.numel(), 1, 2, 2)
    for seed in (0, 7):
        noisy = build_attack("noisy-label", seed, num_classes=C).poison(None, x, y, 0)
        flip = LabelFlipAttack(LabelFlipConfig(fraction=0.05, per_class=True), AttackData(C), seed)
        flip = flip.poison(None, x, y, 0)
        assert torch.equal(noisy.y, flip.y) and torch.equal(noisy.poisoned, flip.poisoned)


def test_flipping_label_moves_int_n_source_times_fraction_source_rows_to_the_target():
    y, sizes = uneven_labels()
    x = torch.rand(y.numel(), 1, 2, 2)
    cls = ATTACKS["flipping-label"].config_class
    attack = build_attack("flipping-label", 1, cls(source=8, target=3, fraction=0.1), num_classes=C)
    out = attack.poison(None, x, y, 0)
    assert int(out.poisoned.sum()) == sizes[8] // 10 == 4  # int(41 * 0.1) rows, all of the source class
    assert bool((y[out.poisoned] == 8).all()) and bool((out.y[out.poisoned] == 3).all())
    default = build_attack("flipping-label", 1, num_classes=C)
    assert (default.cfg.source, default.cfg.target, default.cfg.fraction, default.cfg.per_class) == (0, 2, 0.05, True)
    assert int(default.poison(None, x, y, 0).poisoned.sum()) == 0  # class 0 has no row: int(0 * 0.05)
    # without per_class, label-flip's targeted rule: round(fraction * N) source rows
    whole = LabelFlipAttack(LabelFlipConfig(source=9, target=3, fraction=0.1), AttackData(C), 1).poison(None, x, y, 0)
    assert int(whole.poisoned.sum()) == round(0.1 * 219) == 22


def test_per_class_must_be_a_bool_and_the_presets_take_only_their_config():
    with pytest.raises(ValueError, match="^per_class: expected true or false, got 'yes'"):
        LabelFlipConfig(per_class="yes")
    with pytest.raises(ValueError, match="^cfg: expected a NoisyLabelConfig, got LabelFlipConfig"):
        build_attack("noisy-label", 0, LabelFlipConfig(), num_classes=C)
    with pytest.raises(ValueError, match="^source: expected a class index below num_classes=3, got 9"):
        build_attack("flipping-label", 0, ATTACKS["flipping-label"].config_class(source=9), num_classes=3)


# --------------------------------------------------------------------------- clean label
def reference_ascent(model, x, y, eps, steps, step):
    """The PGD ascent written out with plain tensor ops (not memdisc.ops.pgd_step_), model in eval mode."""
    model.eval()
    xa = x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="sum"), xa)
        xa = torch.clamp(torch.minimum(torch.maximum(xa.detach() + step * g.sign(), x - eps), x + eps), 0, 1)
    return xa


def test_loss_ascent_is_the_bounded_signed_ascent_and_raises_the_loss_of_every_row():
    x, y = images(40)
    model = Linear()
    x_adv = loss_ascent(model, x, y, eps=8 / 255, steps=5, step_size=2 / 255)
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6 and bool(((x_adv >= 0) & (x_adv <= 1)).all())
    with torch.no_grad():
        before = F.cross_entropy(model(x), y, reduction="none")
        after = F.cross_entropy(model(x_adv), y, reduction="none")
    assert bool((after > before).all())  # convex in x: every signed step raises it
    torch.testing.assert_close(x_adv, reference_ascent(model, x, y, 8 / 255, 5, 2 / 255))
    conv = SmallConv().train()
    expected = reference_ascent(SmallConv(), x, y, 0.1, 4, 0.03)
    torch.testing.assert_close(loss_ascent(conv, x, y, eps=0.1, steps=4, step_size=0.03), expected)
    torch.testing.assert_close(loss_ascent(conv, x, y, eps=0.1, steps=4, step_size=0.03, batch_size=3), expected)
    assert conv.training and conv.drop.training  # every module's mode restored
    assert torch.equal(loss_ascent(conv, x, y, eps=0.1, steps=0, step_size=0.03), x)


def test_clean_label_poisons_target_rows_only_keeps_their_labels_perturbs_within_eps_and_stamps_the_patch():
    x, y = images(400, low=0.1, high=0.9)
    model = Linear()
    attack = clean_label(eps=16 / 255, steps=5, step_size=4 / 255)
    out = attack.poison(model, x, y, 0)
    rows = out.poisoned
    assert int(rows.sum()) == 20 and bool((y[rows] == 2).all()) and torch.equal(out.y, y)
    patch = torch.zeros(8, 8, dtype=torch.bool)
    patch[-1, -1] = True  # the default side on 8x8: max(1, round(5 * 8 / 32)) = 1, bottom-right
    assert bool((out.x[rows][:, :, patch] == 1).all())
    moved = (out.x[rows] - x[rows])[:, :, ~patch]
    assert float(moved.abs().max()) <= 16 / 255 + 1e-6 and float(moved.abs().max()) > 15 / 255
    expected = reference_ascent(model, x[rows], y[rows], 16 / 255, 5, 4 / 255)
    torch.testing.assert_close(out.x[rows][:, :, ~patch], expected[:, :, ~patch])
    with torch.no_grad():  # the perturbation raised the clean model's loss on every poison (before the stamp)
        assert bool((F.cross_entropy(model(expected), y[rows], reduction="none")
                     > F.cross_entropy(model(x[rows]), y[rows], reduction="none")).all())


def test_clean_label_with_the_blended_trigger_and_its_test_time_backdoor():
    x, y = images(400, low=0.1, high=0.9)
    model = Linear()
    attack = clean_label(trigger="blended", alpha=0.2, eps=8 / 255, steps=3, step_size=4 / 255)
    out = attack.poison(model, x, y, 0)
    rows = out.poisoned
    pattern = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))  # pattern_seed 0
    x_hard = (out.x[rows] - 0.2 * pattern) / 0.8  # x' = 0.8 x_hard + 0.2 P
    assert float((x_hard - x[rows]).abs().max()) <= 8 / 255 + 1e-5
    # at test time: the trigger alone, no perturbation, every image to the target
    x_test, t = attack.apply_backdoor(x[:9], y[:9])
    torch.testing.assert_close(x_test, blended(alpha=0.2).apply_backdoor(x[:9], y[:9])[0])
    assert torch.equal(t, torch.full_like(y[:9], 2))
    x_patch, _ = clean_label().apply_backdoor(x[:9], y[:9])
    assert torch.equal(x_patch, ATTACKS["badnets"](ATTACKS["badnets"].config_class(), AttackData(C), 0)
                       .apply_backdoor(x[:9], y[:9])[0])


def test_clean_label_leaves_the_model_as_it_was_and_works_under_no_grad():
    x, y = images(200)
    model = SmallConv().train()
    model.conv.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = clean_label(steps=2).poison(model, x, y, 0)
    assert int(out.poisoned.sum()) == 10
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model.drop.training and not model.conv.weight.requires_grad
    assert model.head.weight.requires_grad and all(p.grad is None for p in model.parameters())


def test_clean_label_refuses_no_model_and_a_fraction_above_the_target_share():
    x, y = images(100)
    with pytest.raises(ValueError, match="^model: the clean-label attack perturbs its poisons against a clean model"):
        clean_label().poison(None, x, y, 0)
    share = int((y == 2).sum())
    with pytest.raises(ValueError, match=rf"^fraction: 0.5 of 100 rows is 50 rows, but only {share} may be poisoned "
                                         rf"by clean-label \(the rows of the target class 2\); expected a fraction "
                                         rf"<= {share / 100:.4g}"):
        clean_label(fraction=0.5).poison(Linear(), x, y, 0)


@pytest.mark.parametrize("options, option", [({"eps": -0.1}, "eps"), ({"eps": 2.0}, "eps"), ({"steps": -1}, "steps"),
                                             ({"step_size": 0.0}, "step_size"), ({"trigger": "star"}, "trigger"),
                                             ({"batch_size": 0}, "batch_size"), ({"target": -1}, "target"),
                                             ({"fraction": -0.1}, "fraction"), ({"alpha": 0.0}, "alpha"),
                                             ({"patch_size": 0}, "patch_size"), ({"corner": "middle"}, "corner")])
def test_clean_label_config_names_the_bad_option(options, option):
    with pytest.raises(ValueError, match=f"^{option}:"):
        CleanLabelConfig(**options)


def test_clean_label_refuses_a_target_outside_the_classes():
    with pytest.raises(ValueError, match="^target: expected a class index below num_classes=10, got 12"):
        clean_label(target=12)
