"""The seed's availability attacks "noise" and "loss" (memdisc.attacks.noise, .loss_based): the noise's
statistics and clamping, the loss attack's choice of rows on hand-built cases, determinism and
options refused by name.  (Shapes, untouched rows and the victim left as it was: tests/test_contracts.py.)"""
from __future__ import annotations

import re
from statistics import NormalDist

import pytest
import torch
from torch import nn

from memdisc.attacks import ATTACKS, LossAttack, LossConfig, NoiseAttack, NoiseConfig, build_attack
from memdisc.config import OptionError
from memdisc.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


def grey(n: int, value: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """n images 1x16x16 of one grey level, labels 0..9 in turn."""
    return torch.full((n, 1, 16, 16), value), torch.arange(n) % 10


def noised(cfg: NoiseConfig, x: torch.Tensor, y: torch.Tensor, seed: int = 0):
    return build_attack("noise", seed, cfg, num_classes=10).poison(None, x, y, 0)


# ---- noise ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.02, 0.05])
def test_noise_is_gaussian_with_mean_zero_and_std_sigma(sigma):
    """On mid-grey images the clamp never binds at these sigmas (0.5 is 10 sigma away from 0 and 1), so
    the added noise is seen whole: over 100 rows x 256 pixels its mean lies within 4 standard errors
    (4 sigma / 160) of 0 and its standard deviation within 3 % of sigma (the estimate's relative
    standard error is 1 / sqrt(2 * 25600) = 0.44 %)."""
    x, y = grey(200)
    out = noised(NoiseConfig(fraction=0.5, sigma=sigma), x, y)
    noise = (out.x[out.poisoned] - 0.5).flatten()
    assert noise.numel() == 100 * 256 and bool((out.x > 0).all() and (out.x < 1).all())
    assert abs(noise.mean().item()) < 4 * sigma / 160
    assert noise.std().item() == pytest.approx(sigma, rel=0.03)
    assert torch.equal(out.y, y)  # labels kept


@pytest.mark.parametrize("level", [0.5, 0.0])
def test_noise_is_clamped_to_the_pixel_range(level):
    """sigma 1 (the seed's): every pixel in [0, 1], and as many at the bounds as N(level, 1) puts outside:
    P(z < -level) at 0 and P(z > 1 - level) at 1 (0.309 each at mid-grey; 0.5 and 0.159 on black)."""
    x, y = grey(200, level)
    out = noised(NoiseConfig(fraction=0.5, sigma=1.0), x, y)
    pixels = out.x[out.poisoned].flatten()
    assert bool((pixels >= 0).all() and (pixels <= 1).all())
    normal = NormalDist()
    assert (pixels == 0).double().mean().item() == pytest.approx(normal.cdf(-level), abs=0.015)
    assert (pixels == 1).double().mean().item() == pytest.approx(1 - normal.cdf(1 - level), abs=0.015)


def test_noise_is_a_function_of_the_seed_and_noises_the_rows_label_flip_would_pick():
    x, y = grey(100)
    a, b, other = (noised(NoiseConfig(), x, y, seed) for seed in (4, 4, 5))
    assert torch.equal(a.x, b.x) and torch.equal(a.poisoned, b.poisoned)
    assert not torch.equal(a.poisoned, other.poisoned)
    flip = build_attack("label-flip", 4, num_classes=10).poison(None, x, y, 0)
    assert torch.equal(flip.poisoned, a.poisoned)  # rows drawn by memdisc.attacks.offline, one rule for all


@pytest.mark.parametrize("kwargs, option", [
    (dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"), (dict(sigma=float("inf")), "sigma"),
    (dict(sigma="1"), "sigma"), (dict(fraction=1.5), "fraction"), (dict(fraction=-0.1), "fraction"),
])
def test_noise_refuses_bad_options_by_name(kwargs, option):
    with pytest.raises(OptionError, match=f"^{option}: expected a finite number"):
        NoiseConfig(**kwargs)


# ---- loss ----------------------------------------------------------------------------------------

def logits_as_pixels(rows: list[list[float]]) -> torch.Tensor:
    """Images [N, 1, 1, C] whose pixels are the logits of an ``nn.Flatten()`` model."""
    return torch.tensor(rows).view(len(rows), 1, 1, -1)


def test_loss_attack_copies_exactly_the_highest_loss_rows_over_other_rows():
    """Ten rows of known logits, all labelled 0: the loss CE = logsumexp(z) - z_0 ranks them by
    z_1 - z_0 here.  fraction 0.3: the 3 highest (rows 7, 2, then 4 and 6 tie: the lower index, 4)
    are copied over 3 rows drawn among the other 7, in decreasing order of loss."""
    gaps = [0.0, -1.0, 3.0, 0.5, 2.0, -2.0, 2.0, 5.0, 1.0, -3.0]  # z_1 - z_0 of each row
    x = logits_as_pixels([[0.0, g, -5.0] for g in gaps])
    y = torch.zeros(10, dtype=torch.long)
    y[3] = 2  # row 3's loss: logsumexp(0, 0.5, -5) + 5, the highest of all
    attack = build_attack("loss", 7, LossConfig(fraction=0.3, fit_epochs=0), num_classes=3)
    out = attack.poison(nn.Flatten(), x, y, 0)
    top = [3, 7, 2]
    rest = torch.tensor([i for i in range(10) if i not in top])
    rows = rest[torch.randperm(7, generator=torch.Generator().manual_seed(7))[:3]]  # offline.py's draw
    assert torch.equal(out.poisoned.nonzero().flatten().sort().values, rows.sort().values)
    assert torch.equal(out.x[rows], x[top]) and torch.equal(out.y[rows], y[top])  # copies, true labels
    assert torch.equal(out.x[top], x[top]) and not out.poisoned[top].any()  # the originals stay

    tie = build_attack("loss", 7, LossConfig(fraction=0.4, fit_epochs=0), num_classes=3).poison(nn.Flatten(), x, y, 0)
    copied = {int((x.flatten(1) == row).all(1).nonzero()[0]) for row in tie.x[tie.poisoned].flatten(1)}
    assert copied == {3, 7, 2, 4}  # rows 4 and 6 tie for the 4th place: the lower index


def mislabelled_set(n: int = 600, wrong: int | None = None):
    """A learnable 10-class set of 1x8x8 images (class k brightens a fixed random quarter of the pixels)
    with ``wrong`` labels (default 5 %) changed to another class; the clean validation set; the changed rows."""
    wrong = n // 20 if wrong is None else wrong
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(10, 1, 8, 8, generator=g) < 0.25
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.5 * torch.rand(n, 1, 8, 8, generator=g) + 0.5 * masks[y]
    changed = torch.randperm(n, generator=g)[:wrong]
    y[changed] = (y[changed] + torch.randint(1, 10, (wrong,), generator=g)) % 10
    y_val = torch.randint(0, 10, (100,), generator=g)
    x_val = 0.5 * torch.rand(100, 1, 8, 8, generator=g) + 0.5 * masks[y_val]
    return x, y, x_val, y_val, changed


def chosen_rows(out, x: torch.Tensor) -> set[int]:
    """The rows whose copies the poisoned rows hold."""
    return {int((x.flatten(1) == row).all(1).nonzero()[0]) for row in out.x[out.poisoned].flatten(1)}


def test_loss_attack_fits_a_copy_then_picks_the_mislabelled_rows():
    """After 5 epochs of fitting (the seed's) the 30 highest-loss rows of a set with 30 wrong labels are
    those 30; ranked by the untrained model (fit_epochs 0) hardly any are.  The model given is not
    changed, and the result is a function of the seed."""
    x, y, x_val, y_val, changed = mislabelled_set()
    torch.manual_seed(0)
    model = build_model("seed-mlp", 1, 10, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def attack(fit_epochs: int, seed: int = 0):
        cfg = LossConfig(fraction=0.05, fit_epochs=fit_epochs)
        return build_attack("loss", seed, cfg, num_classes=10, x_val=x_val, y_val=y_val).poison(model, x, y, 0)

    fitted = attack(5)
    assert chosen_rows(fitted, x) == set(changed.tolist())
    assert len(chosen_rows(attack(0), x) & set(changed.tolist())) < 10
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    again, other = attack(5), attack(5, seed=1)
    assert torch.equal(again.x, fitted.x) and torch.equal(again.poisoned, fitted.poisoned)
    assert not torch.equal(other.poisoned, fitted.poisoned)


def test_loss_attack_with_fraction_zero_changes_nothing():
    x, y, x_val, y_val, _ = mislabelled_set(50)
    out = build_attack("loss", 0, LossConfig(fraction=0.0), num_classes=10, x_val=x_val, y_val=y_val).poison(
        nn.Flatten(), x, y, 0)  # no fit: a model without a head is not even read
    assert torch.equal(out.x, x) and torch.equal(out.y, y) and not out.poisoned.any()


def test_loss_attack_refuses_bad_options_and_arguments_by_name():
    with pytest.raises(OptionError, match=r"^fraction: expected a finite number >= 0.0 and <= 0.5, got 0.6"):
        LossConfig(fraction=0.6)
    with pytest.raises(OptionError, match="^fit_epochs: expected an integer >= 0, got -1"):
        LossConfig(fit_epochs=-1)
    with pytest.raises(ValueError, match=r"^x_val: the loss attack keeps the best of its fit_epochs epochs on clean "
                                         r"validation data \(x_val, y_val\), got none"):
        build_attack("loss", 0, num_classes=10)
    x, y, x_val, y_val, _ = mislabelled_set(7)
    attack = build_attack("loss", 0, LossConfig(fraction=0.5), num_classes=10, x_val=x_val, y_val=y_val)
    with pytest.raises(ValueError, match="^" + re.escape("fraction: 0.5 of 7 rows is 4 highest-loss rows copied "
                                                         "over 4 other rows, 8 > 7")):
        attack.poison(build_model("seed-mlp", 1, 10, 8), x, y, 0)
    with pytest.raises(ValueError, match="^model: the loss attack ranks the training rows by a copy of the victim; "
                                         "expected an nn.Module, got NoneType"):
        attack.poison(None, x, y, 0)
    x, y, x_val, y_val, _ = mislabelled_set(20)
    with pytest.raises(ValueError, match="^model: expected a memdisc model with a linear head"):
        attack.poison(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x, y, 0)  # training needs the head


def test_both_attacks_are_registered_offline_attacks():
    assert ATTACKS["noise"] is NoiseAttack and ATTACKS["loss"] is LossAttack
    assert NoiseAttack.kind == LossAttack.kind == "offline"
