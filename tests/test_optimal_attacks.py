"""The "optimal" poisons of Yang et al.: the direct gradient attack (memdisc.attacks.gradient) against
central finite differences and a per-point loop, and the generative attack (memdisc.attacks.generative)
on hand-made cases whose update direction is known.

Tiny models on 1x8x8 inputs keep every test around a second.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memdisc.attacks import ATTACKS, build_attack
from memdisc.attacks.generative import (ConvAutoencoder, GenerativeConfig, craft_generative_poisons,
                                        generative_round, generator_output_gradient, train_generator)
from memdisc.attacks.gradient import (GradientConfig, craft_gradient_poisons, poison_gradient, poison_objective,
                                      victim_parameters)
from memdisc.config import OptionError
from tiny_nets import TinyCNN

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_mlp() -> nn.Module:
    """A smooth (tanh) MLP 64 -> 16 -> 10, so central differences are accurate."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def make_model(kind: str, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = {"mlp": tiny_mlp, "cnn": TinyCNN}[kind]().to(dtype)
    if kind == "cnn":  # non-trivial running statistics, so eval-mode BatchNorm is not the identity
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.2, 0.2)
            model.bn.running_var.uniform_(0.5, 1.5)
    return model


def make_data(points: int = 4, val: int = 12, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)

    def draw(n):
        return torch.rand(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)

    return (*draw(points), *draw(val))


def module_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- direct gradient attack ----------------------------------------------------------------------

@pytest.mark.parametrize("kind, unroll_steps, bias_lr_scale", [("mlp", 1, 1.0), ("mlp", 2, 2.0), ("cnn", 1, 2.0)])
def test_gradient_matches_central_differences(kind, unroll_steps, bias_lr_scale):
    model = make_model(kind)
    x_p, y_p, x_val, y_val = make_data()
    kw = dict(victim_lr=0.5, unroll_steps=unroll_steps, bias_lr_scale=bias_lr_scale)
    g, value = poison_gradient(model, x_p, y_p, x_val, y_val, **kw)
    assert torch.allclose(value, poison_objective(model, x_p, y_p, x_val, y_val, **kw), rtol=1e-12, atol=0)
    h = 1e-6
    for point, pixel in ((0, (0, 3, 4)), (1, (0, 0, 0)), (3, (0, 7, 2)), (2, (0, 5, 5))):
        plus, minus = x_p.clone(), x_p.clone()
        plus[(point, *pixel)] += h
        minus[(point, *pixel)] -= h
        fd = (poison_objective(model, plus, y_p, x_val, y_val, **kw)[point]
              - poison_objective(model, minus, y_p, x_val, y_val, **kw)[point]) / (2 * h)
        assert abs(fd.item()) > 1e-6  # a pixel that matters, so the comparison can fail
        assert g[(point, *pixel)].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9)


def test_the_unrolled_step_matters():
    """The objective is the loss *after* training on the point: a different lr gives another gradient,
    and a victim that does not train (lr -> 0) gives a vanishing one."""
    model = make_model("mlp")
    x_p, y_p, x_val, y_val = make_data()
    g1, _ = poison_gradient(model, x_p, y_p, x_val, y_val, victim_lr=0.5)
    g2, _ = poison_gradient(model, x_p, y_p, x_val, y_val, victim_lr=1.0)
    g0, _ = poison_gradient(model, x_p, y_p, x_val, y_val, victim_lr=1e-9)
    assert not torch.allclose(g1, g2)
    assert g0.abs().max() < 1e-8 < g1.abs().max()


@pytest.mark.parametrize("chunk", [None, 3])
def test_batched_points_equal_a_loop_over_points(chunk):
    model = make_model("cnn")
    x_p, y_p, x_val, y_val = make_data(points=7)
    g, value = poison_gradient(model, x_p, y_p, x_val, y_val, victim_lr=0.5, unroll_steps=2, chunk=chunk)
    for i in range(x_p.shape[0]):
        gi, vi = poison_gradient(model, x_p[i:i + 1], y_p[i:i + 1], x_val, y_val, victim_lr=0.5, unroll_steps=2)
        assert torch.allclose(g[i], gi[0], rtol=1e-10, atol=1e-14) and torch.allclose(value[i], vi[0], rtol=1e-12)


def test_one_point_changes_only_its_own_gradient():
    """Each point trains its own victim: moving point 0 leaves point 1's objective and gradient as they were."""
    model = make_model("mlp")
    x_p, y_p, x_val, y_val = make_data()
    g, value = poison_gradient(model, x_p, y_p, x_val, y_val, victim_lr=0.5)
    moved = x_p.clone()
    moved[0] = 1 - moved[0]
    g_m, value_m = poison_gradient(model, moved, y_p, x_val, y_val, victim_lr=0.5)
    assert not torch.allclose(value_m[0], value[0])
    assert torch.allclose(value_m[1:], value[1:], rtol=1e-12) and torch.allclose(g_m[1:], g[1:], rtol=1e-10)


def test_a_frozen_backbone_victim_trains_only_its_head():
    model = make_model("cnn")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    model.train()
    before = module_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x_p, y_p, x_val, y_val = make_data()
    assert sorted(victim_parameters(model)) == ["fc.bias", "fc.weight"]
    g, _ = poison_gradient(model, x_p, y_p, x_val, y_val, victim_lr=0.5)
    h, pixel = 1e-6, (2, 0, 4, 4)
    plus, minus = x_p.clone(), x_p.clone()
    plus[pixel] += h
    minus[pixel] -= h
    fd = (poison_objective(model, plus, y_p, x_val, y_val, victim_lr=0.5)[2]
          - poison_objective(model, minus, y_p, x_val, y_val, victim_lr=0.5)[2]) / (2 * h)
    assert g[pixel].item() == pytest.approx(fd.item(), rel=1e-5)
    everything = make_model("cnn")
    g_all, _ = poison_gradient(everything, x_p, y_p, x_val, y_val, victim_lr=0.5)
    assert not torch.allclose(g, g_all)  # the frozen layers did not take a step
    after = module_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_more_rounds_raise_the_objective_and_stay_in_the_box():
    model = make_model("cnn", torch.float32)
    x_p, y_p, x_val, y_val = make_data(points=6, val=32, dtype=torch.float32)
    before = module_state(model)
    objectives = []
    for rounds in (1, 4, 12):
        cfg = GradientConfig(rounds=rounds, step_size=0.02, victim_lr=0.5, val_size=32)
        x = craft_gradient_poisons(model, x_p, y_p, x_val, y_val, cfg)
        assert x.shape == x_p.shape and bool((x >= 0).all() and (x <= 1).all())
        objectives.append(poison_objective(model, x, y_p, x_val, y_val, victim_lr=0.5).mean().item())
    start = poison_objective(model, x_p, y_p, x_val, y_val, victim_lr=0.5).mean().item()
    assert start < objectives[0] < objectives[1] < objectives[2]
    after = module_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_crafting_uses_the_first_val_size_rows_only():
    model = make_model("mlp", torch.float32)
    x_p, y_p, x_val, y_val = make_data(val=20, dtype=torch.float32)
    cfg = GradientConfig(rounds=2, step_size=0.05, victim_lr=0.5, val_size=8)
    a = craft_gradient_poisons(model, x_p, y_p, x_val, y_val, cfg)
    b = craft_gradient_poisons(model, x_p, y_p, x_val[:8], y_val[:8], cfg)
    c = craft_gradient_poisons(model, x_p, y_p, x_val, y_val, dataclasses.replace(cfg, val_size=20))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_attack_refuses_bad_arguments_by_name():
    model = make_model("mlp")
    x_p, y_p, x_val, y_val = make_data()
    kw = dict(victim_lr=0.5)
    cases = [("^x_p", (x_p.long(), y_p, x_val, y_val), kw), ("^y_p", (x_p, y_p[:2], x_val, y_val), kw),
             ("^y_p: expected an int64", (x_p, y_p.int(), x_val, y_val), kw),
             ("^x_val", (x_p, y_p, x_val.float(), y_val), kw), ("^x_val", (x_p, y_p, x_val[..., :4], y_val), kw),
             ("^victim_lr", (x_p, y_p, x_val, y_val), dict(victim_lr=0.0)),
             ("^unroll_steps", (x_p, y_p, x_val, y_val), dict(victim_lr=0.5, unroll_steps=0)),
             ("^bias_lr_scale", (x_p, y_p, x_val, y_val), dict(victim_lr=0.5, bias_lr_scale=-1.0))]
    for pattern, args, kwargs in cases:
        with pytest.raises(ValueError, match=pattern):
            poison_gradient(model, *args, **kwargs)
    frozen = make_model("mlp").requires_grad_(False)
    with pytest.raises(ValueError, match="^model: expected a module with at least one parameter"):
        poison_objective(frozen, x_p, y_p, x_val, y_val, **kw)
    with pytest.raises(ValueError, match="^cfg: expected a GradientConfig"):
        craft_gradient_poisons(model, x_p, y_p, x_val, y_val, GenerativeConfig())


@pytest.mark.parametrize("option, value", [("rounds", 0), ("step_size", 0.0), ("victim_lr", float("nan")),
                                           ("unroll_steps", 1.5), ("bias_lr_scale", -0.1), ("val_size", 0),
                                           ("chunk", True)])
def test_gradient_config_names_the_bad_option(option, value):
    with pytest.raises(OptionError, match=f"^{option}: expected"):
        GradientConfig(**{option: value})


# ---- generative attack ---------------------------------------------------------------------------

class Shift(nn.Module):
    """G(x) = x + b: each output pixel moves with its own parameter, so a step's direction reads directly."""

    def __init__(self, shape):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(shape, dtype=torch.float64))

    def forward(self, x):
        return x + self.b


def test_output_gradient_is_minus_sign_of_g_times_sign_of_the_loss_change():
    g = torch.tensor([2.0, -0.5, 0.0])
    assert torch.equal(generator_output_gradient(g, 3.0, 1.0), torch.tensor([-1.0, 1.0, 0.0]))
    assert torch.equal(generator_output_gradient(g, 1.0, 3.0), torch.tensor([1.0, -1.0, 0.0]))
    assert torch.equal(generator_output_gradient(g, 2.0, 2.0), torch.zeros(3))


@pytest.mark.parametrize("loss_rose", [True, False])
def test_a_round_moves_the_poisons_along_the_known_sign(loss_rose):
    """Victim: logits = W x + c with W = [w; -w] frozen, only c trains; every validation label is 0.
    Then dCE/dx = W^T (p - e_0) = -2 p_1 w, so sign(g) = -sign(w) wherever w != 0, and the seed's rule
    moves every poison pixel by generator_lr * sign(g) * sign(L - L_prev) = -/+ generator_lr * sign(w)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, generator=g, dtype=torch.float64)
    victim = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).to(torch.float64)
    with torch.no_grad():
        victim[1].weight.copy_(torch.stack([w, -w]))
    victim[1].weight.requires_grad_(False)
    x_seed = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    x_val = torch.rand(5, 1, 8, 8, generator=g, dtype=torch.float64)
    y_val = torch.zeros(5, dtype=torch.int64)
    shift = Shift((1, 8, 8))
    before = shift(x_seed).detach()
    prev_loss = 0.0 if loss_rose else 100.0
    loss = generative_round(shift, victim, x_seed, torch.ones(3, dtype=torch.int64), x_val, y_val, prev_loss,
                            victim_lr=0.1, generator_lr=0.01)
    expected = -torch.sign(w).view(1, 8, 8) * (1.0 if loss_rose else -1.0) * 0.01
    assert torch.allclose(shift(x_seed).detach() - before, expected.expand(3, 1, 8, 8), rtol=0, atol=1e-15)
    # the loss returned is the clean loss after the victim's step on the poisons (here: c moved toward class 1)
    c = victim[1].bias.detach() - 0.1 * torch.autograd.functional.jacobian(
        lambda b: F.cross_entropy(F.linear(before.flatten(1), victim[1].weight, b), torch.ones(3, dtype=torch.int64)),
        victim[1].bias.detach())
    assert loss == pytest.approx(F.cross_entropy(F.linear(x_val.flatten(1), victim[1].weight, c), y_val).item(),
                                 rel=1e-12)


def generative_setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyCNN().to(dtype)
    g = torch.Generator().manual_seed(3)
    x_fit = torch.rand(40, 1, 8, 8, generator=g, dtype=dtype)
    x_seed = torch.rand(10, 1, 8, 8, generator=g, dtype=dtype)
    y_seed = torch.randint(0, 10, (10,), generator=g)
    x_val = torch.rand(12, 1, 8, 8, generator=g, dtype=dtype)
    y_val = torch.randint(0, 10, (12,), generator=g)
    return model, x_fit, x_seed, y_seed, x_val, y_val


SMALL = GenerativeConfig(ae_epochs=2, ae_batch_size=16, rounds=4, seed_batch=4, generator_lr=0.05, val_size=12)


def test_generative_poisons_are_deterministic_under_the_seed_and_in_the_box():
    model, x_fit, x_seed, y_seed, x_val, y_val = generative_setup()
    model.train()
    before = module_state(model)
    a = craft_generative_poisons(model, x_fit, x_seed, y_seed, x_val, y_val, 10, SMALL, seed=5)
    b = craft_generative_poisons(model, x_fit, x_seed, y_seed, x_val, y_val, 10, SMALL, seed=5)
    c = craft_generative_poisons(model, x_fit, x_seed, y_seed, x_val, y_val, 10, SMALL, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert a[0].shape == x_seed.shape and a[0].dtype == x_seed.dtype
    assert bool((a[0] >= 0).all() and (a[0] <= 1).all())
    assert torch.equal(a[1], (y_seed + 1) % 10)
    after = module_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training


def test_the_generator_is_fitted_as_an_auto_encoder_then_moved_by_the_rounds():
    model, x_fit, x_seed, y_seed, x_val, y_val = generative_setup()
    fitted, history = train_generator(model, x_fit, x_seed, y_seed, x_val, y_val, 10,
                                      dataclasses.replace(SMALL, ae_epochs=6, rounds=1, generator_lr=1e-12), 0)
    assert history["ae_mse"][-1] < history["ae_mse"][0] and len(history["loss"]) == 1
    moved, history = train_generator(model, x_fit, x_seed, y_seed, x_val, y_val, 10,
                                     dataclasses.replace(SMALL, ae_epochs=6), 0)
    assert len(history["loss"]) == SMALL.rounds
    with torch.no_grad():
        assert (moved(x_seed) - fitted(x_seed)).abs().max() > 1e-3


def test_conv_autoencoder_shapes():
    for channels, side in ((1, 28), (3, 32)):
        g = ConvAutoencoder(channels, side)
        assert g(torch.rand(2, channels, side, side)).shape == (2, channels, side, side)
    with pytest.raises(ValueError, match="^image_size: expected a positive multiple of 4"):
        ConvAutoencoder(1, 30)


def test_generative_attack_refuses_bad_arguments_by_name():
    model, x_fit, x_seed, y_seed, x_val, y_val = generative_setup()
    good = (model, x_fit, x_seed, y_seed, x_val, y_val, 10, SMALL, 0)
    for i, bad, pattern in ((1, x_fit[:, :, :4], "^x_fit"), (2, x_seed[:, 0], "^x_seed"), (3, y_seed[:3], "^y_seed"),
                            (4, x_val.double(), "^x_val"), (6, 1, "^num_classes"),
                            (7, GradientConfig(), "^cfg: expected a GenerativeConfig"), (8, -1, "^seed")):
        args = list(good)
        args[i] = bad
        with pytest.raises(ValueError, match=pattern):
            craft_generative_poisons(*args)


@pytest.mark.parametrize("option, value", [("ae_epochs", 0), ("ae_lr", 0.0), ("rounds", -1), ("seed_batch", 0),
                                           ("generator_lr", float("inf")), ("victim_lr", -1.0),
                                           ("bias_lr_scale", -1.0), ("val_size", 0), ("ae_batch_size", "8")])
def test_generative_config_names_the_bad_option(option, value):
    with pytest.raises(OptionError, match=f"^{option}: expected"):
        GenerativeConfig(**{option: value})


# ---- the registered offline attacks "gradient" and "generative" ------------------------------------

def offline_setup():
    model, x_fit, x_seed, y_seed, x_val, y_val = generative_setup()
    x_train, y_train = torch.cat([x_seed, x_fit]), torch.cat([y_seed, torch.randint(0, 10, (40,))])
    return model, x_train, y_train, x_val, y_val


@pytest.mark.parametrize("name, cfg", [("gradient", GradientConfig(fraction=0.2, rounds=3, val_size=12)),
                                       ("generative", dataclasses.replace(SMALL, fraction=0.2, ae_fit_size=30))])
def test_the_registered_attack_replaces_its_rows_by_the_plain_functions_poisons(name, cfg):
    model, x, y, x_val, y_val = offline_setup()
    out = build_attack(name, 4, cfg, num_classes=10, x_val=x_val, y_val=y_val).poison(model, x, y, 0)
    g = torch.Generator().manual_seed(4)  # memdisc.attacks.offline: the seed's generator draws the rows, in order
    rows = torch.randperm(x.shape[0], generator=g)[:10]
    assert torch.equal(out.poisoned.nonzero().flatten(), rows.sort().values)
    assert torch.equal(out.y[rows], (y[rows] + 1) % 10)
    if name == "gradient":
        expected = craft_gradient_poisons(model, x[rows], (y[rows] + 1) % 10, x_val, y_val, cfg)
    else:  # then the same generator draws the auto-encoder's fit rows
        fit = torch.randperm(x.shape[0], generator=g)[:cfg.ae_fit_size]
        expected, _ = craft_generative_poisons(model, x[fit], x[rows], y[rows], x_val, y_val, 10, cfg, 4)
    assert torch.equal(out.x[rows], expected)


@pytest.mark.parametrize("name", ["gradient", "generative"])
def test_the_registered_attack_needs_the_victim_and_validation_data(name):
    model, x, y, x_val, y_val = offline_setup()
    with pytest.raises(ValueError, match=f"^x_val: the {name} attack needs clean validation data"):
        build_attack(name, 0, num_classes=10)
    attack = build_attack(name, 0, num_classes=10, x_val=x_val, y_val=y_val)
    with pytest.raises(ValueError, match=f"^model: the {name} attack crafts its poisons against the victim"):
        attack.poison(None, x, y, 0)
    assert attack.victim is None and attack.clean is None  # nothing held after a call
    cfg = ATTACKS[name].config_class(fraction=0.0)
    out = build_attack(name, 0, cfg, num_classes=10, x_val=x_val, y_val=y_val).poison(model, x, y, 0)
    assert not out.poisoned.any() and torch.equal(out.x, x) and torch.equal(out.y, y)


def test_optimal_attacks_refuse_a_victim_with_another_number_of_classes():
    """Labels y + 1 mod C past the victim's outputs would fail inside torch: refused naming model."""
    from memdisc.attacks import build_attack
    from memdisc.models import build_model
    torch.manual_seed(0)
    model = build_model("seed-mlp", 1, 10, 28)
    x, y = torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,))
    for name in ("gradient", "generative"):
        attack = build_attack(name, seed=0, num_classes=13, x_val=x[:5], y_val=y[:5])
        with pytest.raises(ValueError, match="^model: its head has 10 outputs, but the attack's data has num_classes 13"):
            attack.poison(model, x, y, 0)
