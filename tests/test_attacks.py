"""memdisc.attacks: the accumulative attack's fast path against its objectives and the seed port.

Tiny models on 1x8x8 inputs (10 classes, 8-16 samples) keep every test well under a second.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memdisc.attacks import (AccumulativeAttack, AttackConfig, AttackData, accumulative_direction, craft_alignment,
                             crafting_state, gradient_alignment)
from memdisc.oracle import seed_craft_accumulative, seed_craft_trigger
from tiny_nets import TinyCNN

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_mlp() -> nn.Module:
    """A smooth (tanh) MLP: 64 -> 16 -> 10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


MODELS = {"cnn": TinyCNN, "mlp": tiny_mlp}


def make_model(kind: str, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[kind]().to(device)
    if kind == "cnn":  # non-trivial running statistics, so eval-mode BatchNorm is not the identity
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.2, 0.2)
            model.bn.running_var.uniform_(0.5, 1.5)
    return model


def make_data(device: str = "cpu", batch: int = 8):
    g = torch.Generator().manual_seed(1)

    def draw(n):
        return torch.rand(n, 1, 8, 8, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)

    (x, y), (xt, yt), (xv, yv) = draw(batch), draw(8), draw(16)
    return x, y, xt, yt, xv, yv


def knows(xt, yt, xv, yv) -> AttackData:
    """The accumulative attacker's knowledge: the clean trigger batch and the validation batch (10 classes)."""
    return AttackData(10, x_val=xv, y_val=yv, x_trigger=xt, y_trigger=yt)


def loss_grads(model, x, y, create_graph=False):
    with crafting_state(model) as params:
        return list(torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=create_graph))


def alignment_with_val(model, x, y, xv, yv) -> float:
    """A(CE(x), CE(S_val)) in eval mode."""
    return gradient_alignment(loss_grads(model, x, y), loss_grads(model, xv, yv)).item()


def objective(model, x, y, direction) -> float:
    """J(x; D) = sum_l <n(grad CE(x)), D_l> in eval mode."""
    return sum(torch.dot(F.normalize(g.flatten(), dim=0), d.flatten()).item()
               for g, d in zip(loss_grads(model, x, y), direction))


def assert_signed_steps_close(fast, ref, *, eps, steps, step_size):
    """Fast path vs the seed port, float32.

    Both take sign(grad) of the same objective, but sum in another order (foreach norms,
    torch.dot vs F.normalize loops), so an element whose gradient is within rounding of 0
    may step the other way; each such flip moves it by at most 2 * step_size and the
    projection caps any difference at 2 * eps.  So: >= 99% of the elements equal (1e-6),
    and every element within 2 * min(eps, steps * step_size).
    """
    diff = (fast - ref).abs()
    assert (diff <= 1e-6).float().mean().item() >= 0.99
    assert diff.max().item() <= 2 * min(eps, steps * step_size) + 1e-6


# --------------------------------------------------------------------------- gradient_alignment
def test_gradient_alignment_equals_per_tensor_cosines_and_guards_zero():
    g = torch.Generator().manual_seed(2)
    a = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.zeros(2, 2)]
    b = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(2, 2, generator=g)]
    expected = sum(F.cosine_similarity(u.flatten(), v.flatten(), dim=0) for u, v in zip(a[:2], b[:2]))
    got = gradient_alignment(a, b)
    assert got.dim() == 0 and torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # the zero tensor contributes 0
    torch.testing.assert_close(gradient_alignment(a[:2], a[:2]), torch.tensor(2.0))
    with pytest.raises(ValueError, match="grads_a/grads_b"):
        gradient_alignment(a, b[:2])
    with pytest.raises(ValueError, match=r"grads_b\[1\]"):
        gradient_alignment(a, [b[0], torch.randn(6), b[2]])


def test_gradient_alignment_is_differentiable():
    a = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64,
                                                                                requires_grad=True)]
    b = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda u, v: gradient_alignment([u, v], b), tuple(a))


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value", [
    ("eps", -0.1), ("eps", float("nan")), ("steps", 0), ("steps", 1.5), ("step_size", 0.0),
    ("trigger_eps", -1.0), ("trigger_steps", 0), ("trigger_step_size", -0.1), ("gamma", float("inf")),
    ("terms", "third"), ("poison_scale", 1.5), ("poison_scale", -0.1), ("clean_rows", "random"),
    ("reset_clean_rows", 1), ("recraft_trigger", "yes"), ("crafting_mode", "test")])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        AttackConfig(**{field: value})


def test_config_trigger_schedule_defaults():
    assert AttackConfig().trigger_schedule() == (0.2, 2, 0.2)
    assert AttackConfig(eps=0.1, trigger_eps=0.05, trigger_steps=5).trigger_schedule() == (0.05, 5, 0.02)
    assert AttackConfig(trigger_step_size=0.01).trigger_schedule() == (0.2, 2, 0.01)


def test_config_poison_step_follows_eps_and_steps_unless_set():
    """The seed steps 2 * eps / steps: changing eps or steps alone keeps that rule."""
    assert AttackConfig().poison_schedule() == (0.2, 2, 0.2)
    assert AttackConfig(eps=0.1, steps=4).poison_schedule() == (0.1, 4, 0.05)
    assert AttackConfig(eps=0.1, steps=4, step_size=0.03).poison_schedule() == (0.1, 4, 0.03)


def test_attack_rejects_bad_inputs():
    x, y, xt, yt, xv, yv = make_data()
    with pytest.raises(ValueError, match="^y_trigger:"):
        knows(xt, yt[:3], xv, yv)
    with pytest.raises(ValueError, match="^x_val:"):
        knows(xt, yt, xv[:, :, :4], yv)
    with pytest.raises(ValueError, match="^y_val: expected class indices in \\[0, 10\\)"):
        knows(xt, yt, xv, yv + 10)
    with pytest.raises(ValueError, match="^data: the accumulative attack needs the clean trigger batch"):
        AccumulativeAttack(AttackConfig(), AttackData(10, x_val=xv, y_val=yv), seed=0)
    with pytest.raises(ValueError, match="^cfg:"):
        AccumulativeAttack(None, knows(xt, yt, xv, yv), seed=0)
    with pytest.raises(ValueError, match="^seed:"):
        AccumulativeAttack(AttackConfig(), knows(xt, yt, xv, yv), seed=-1)
    attack = AccumulativeAttack(AttackConfig(), knows(xt, yt, xv, yv), seed=0)
    model = make_model("mlp")
    with pytest.raises(RuntimeError, match="prepare"):
        attack.poison(model, x, y, 0)
    attack.prepare(model)
    with pytest.raises(ValueError, match="^step:"):
        attack.poison(model, x, y, -1)
    with pytest.raises(ValueError, match="^x:"):
        attack.poison(model, x.double(), y, 0)


# --------------------------------------------------------------------------- objectives move the right way
SMALL = dict(eps=0.05, steps=5, step_size=0.01)  # small signed steps: the first-order picture holds


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_trigger_crafting_lowers_alignment_with_validation(kind):
    model = make_model(kind)
    x, y, xt, yt, xv, yv = make_data()
    attack = AccumulativeAttack(AttackConfig(**SMALL), knows(xt, yt, xv, yv), seed=0)
    attack.prepare(model)
    xtp, ytp = attack.trigger_batch(model)
    assert torch.equal(ytp, yt)
    assert alignment_with_val(model, xtp, yt, xv, yv) < alignment_with_val(model, xt, yt, xv, yv) - 1e-3


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("terms", ["both", "second"])
def test_accumulative_crafting_raises_H(kind, terms):
    model = make_model(kind)
    x, y, xt, yt, xv, yv = make_data()
    attack = AccumulativeAttack(AttackConfig(terms=terms, **SMALL), knows(xt, yt, xv, yv), seed=0)
    attack.prepare(model)
    xtp, _ = attack.trigger_batch(model)
    direction = accumulative_direction(model, x, y, xtp, yt, xv, yv, terms=terms)
    received = attack.poison(model, x, y, step=0)
    xp, poisoned = received.x, received.poisoned
    assert poisoned.all()
    assert objective(model, xp, y, direction) > objective(model, x, y, direction) + 1e-3


def test_first_term_alone_is_stationary_at_the_clean_batch_and_ascends_elsewhere():
    """H_first(S_t) = gamma * L is its maximum (every cosine 1), so its x-gradient there is ~0
    (the seed's --only_normal then steps on rounding noise); from a shifted start the same
    signed ascent climbs back towards it."""
    model = make_model("mlp")
    x, y, xt, yt, xv, yv = make_data()
    d_first = accumulative_direction(model, x, y, xt, yt, xv, yv, terms="first", gamma=2.0)
    n_params = len(list(model.parameters()))
    assert objective(model, x, y, d_first) == pytest.approx(2.0 * n_params, rel=1e-5)

    def x_grad(direction):
        xr = x.clone().requires_grad_(True)
        with crafting_state(model) as params:
            grads = torch.autograd.grad(F.cross_entropy(model(xr), y), params, create_graph=True)
            h = sum(torch.dot(F.normalize(g.flatten(), dim=0), d.flatten()) for g, d in zip(grads, direction))
            return torch.autograd.grad(h, xr)[0]

    d_second = accumulative_direction(model, x, y, xt, yt, xv, yv, terms="second")
    assert x_grad(d_first).abs().max() < 1e-3 * x_grad(d_second).abs().max()
    shifted = (x + 0.1 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(5)))).clamp(0, 1)
    crafted = craft_alignment(model, shifted, y, d_first, ascent=True, **SMALL)
    assert objective(model, crafted, y, d_first) > objective(model, shifted, y, d_first) + 1e-3


def test_direction_terms_compose():
    model = make_model("cnn")
    x, y, xt, yt, xv, yv = make_data()
    parts = {t: accumulative_direction(model, x, y, xt, yt, xv, yv, terms=t, gamma=0.5)
             for t in ("both", "first", "second")}
    for both, first, second in zip(parts["both"], parts["first"], parts["second"]):
        torch.testing.assert_close(both, first + second)
    expected_first = [0.5 * F.normalize(g.flatten(), dim=0).view_as(g) for g in loss_grads(model, x, y)]
    for got, want in zip(parts["first"], expected_first):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- constraints
@pytest.mark.parametrize("device", DEVICES)
def test_perturbations_respect_eps_and_box(device):
    model = make_model("cnn", device)
    x, y, xt, yt, xv, yv = make_data(device)
    cfg = AttackConfig(eps=0.1, steps=3, step_size=0.08, trigger_eps=0.05)
    attack = AccumulativeAttack(cfg, knows(xt, yt, xv, yv), seed=0)
    attack.prepare(model)
    xtp, _ = attack.trigger_batch(model)
    xp = attack.poison(model, x, y, step=4).x
    for crafted, clean, eps in ((xtp, xt, 0.05), (xp, x, 0.1)):
        assert crafted.device == clean.device and crafted.dtype == clean.dtype
        assert (crafted - clean).abs().max().item() <= eps + 1e-6
        assert crafted.min().item() >= 0.0 and crafted.max().item() <= 1.0
        assert (crafted != clean).any()


@pytest.mark.parametrize("scale,batch,n_clean", [(0.7, 10, 3), (0.5, 9, 5), (0.0, 8, 8), (0.29, 100, 72),
                                                (0.99, 10, 1)])
def test_poison_scale_leaves_exactly_the_clean_rows_bit_identical(scale, batch, n_clean):
    # The seed's rule: B - int(poison_scale * B) rows stay clean (int truncates: 0.29 * 100 = 28.999...).
    model = make_model("mlp")
    x, y, xt, yt, xv, yv = make_data(batch=batch)
    attack = AccumulativeAttack(AttackConfig(poison_scale=scale), knows(xt, yt, xv, yv), seed=7)
    attack.prepare(model)
    received = attack.poison(model, x, y, step=3)
    xp, poisoned = received.x, received.poisoned
    assert poisoned.dtype == torch.bool and poisoned.shape == (batch,)
    assert int((~poisoned).sum()) == n_clean
    assert torch.equal(xp[~poisoned], x[~poisoned])
    if poisoned.any():
        assert (xp[poisoned] != x[poisoned]).any()
    xtp, _ = attack.trigger_batch(model)
    clean_t = ~attack.trigger_poisoned_mask
    assert int(clean_t.sum()) == 8 - int(scale * 8)
    assert torch.equal(xtp[clean_t], xt[clean_t])


def test_clean_rows_per_step_vary_and_fixed_do_not():
    _, _, xt, yt, xv, yv = make_data()
    per_step = AccumulativeAttack(AttackConfig(poison_scale=0.5), knows(xt, yt, xv, yv), seed=1)
    masks = [per_step.poison_mask(100, s) for s in range(4)]
    assert all(int(m.sum()) == 50 for m in masks)
    assert len({tuple(m.tolist()) for m in masks}) == 4
    assert torch.equal(per_step.poison_mask(100, 2), masks[2])  # a function of (seed, step)
    other_seed = AccumulativeAttack(AttackConfig(poison_scale=0.5), knows(xt, yt, xv, yv), seed=2)
    assert not torch.equal(other_seed.poison_mask(100, 2), masks[2])
    fixed = AccumulativeAttack(AttackConfig(poison_scale=0.5, clean_rows="fixed"), knows(xt, yt, xv, yv), seed=1)
    assert torch.equal(fixed.poison_mask(8, 0), fixed.poison_mask(8, 9))
    assert torch.equal(fixed.poison_mask(8, 0), fixed.trigger_poisoned_mask)


# --------------------------------------------------------------------------- determinism, resume, state
def test_same_seed_same_result_and_state_dict_resumes_exactly():
    x, y, xt, yt, xv, yv = make_data()
    cfg = AttackConfig(poison_scale=0.75)
    runs = []
    for _ in range(2):
        model = make_model("cnn")
        attack = AccumulativeAttack(cfg, knows(xt, yt, xv, yv), seed=11)
        attack.prepare(model)
        runs.append((attack.poison(model, x, y, 5), attack.trigger_batch(model)[0], attack.state_dict()))
    (a0, t0, state), (a1, t1, _) = runs
    assert torch.equal(a0.x, a1.x) and torch.equal(a0.y, a1.y) and torch.equal(a0.poisoned, a1.poisoned)
    assert torch.equal(t0, t1)

    model = make_model("cnn")
    resumed = AccumulativeAttack(cfg, knows(xt, yt, xv, yv), seed=11)
    resumed.load_state_dict(state)  # no prepare(): the trigger comes from the state
    assert torch.equal(resumed.trigger_batch(model)[0], t0)
    received = resumed.poison(model, x, y, 5)
    assert torch.equal(received.x, a0.x) and torch.equal(received.poisoned, a0.poisoned)
    with pytest.raises(ValueError, match="^state: its seed"):
        AccumulativeAttack(cfg, knows(xt, yt, xv, yv), seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="^state: its config"):
        AccumulativeAttack(dataclasses.replace(cfg, gamma=2.0), knows(xt, yt, xv, yv), seed=11).load_state_dict(state)


def test_recraft_trigger_follows_the_model():
    x, y, xt, yt, xv, yv = make_data()
    model = make_model("mlp")
    attack = AccumulativeAttack(AttackConfig(recraft_trigger=True), knows(xt, yt, xv, yv), seed=0)
    attack.prepare(model)
    first, _ = attack.trigger_batch(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    attack.poison(model, x, y, 0)  # re-crafts before G_t
    after_poison = attack.state_dict()["x_trigger_poisoned"]
    again, _ = attack.trigger_batch(model)
    eps, steps, step_size = attack.cfg.trigger_schedule()
    expected = seed_craft_trigger(model, xt, yt, xv, yv, eps=eps, steps=steps, step_size=step_size)
    assert not torch.equal(first, again)
    assert torch.equal(after_poison, again)
    assert_signed_steps_close(again, expected, eps=eps, steps=steps, step_size=step_size)


@pytest.mark.parametrize("crafting_mode", ["eval", "train"])
def test_model_mode_flags_buffers_and_grads_are_restored(crafting_mode):
    x, y, xt, yt, xv, yv = make_data()
    model = make_model("cnn")
    model.train()
    model.bn.eval()  # a mixed state must come back as it was
    model.conv.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    attack = AccumulativeAttack(AttackConfig(crafting_mode=crafting_mode, recraft_trigger=True),
                                knows(xt, yt, xv, yv), seed=0)
    attack.prepare(model)
    attack.poison(model, x, y, 0)
    attack.trigger_batch(model)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- parity with the seed port
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("terms,scale", [("both", 1.0), ("second", 1.0), ("both", 0.75)])
def test_fast_path_equals_seed_port(device, kind, terms, scale):
    """Seed defaults (eps 0.2, C 2, alpha 0.2); trigger and accumulative batch against the port.

    terms="first" is left out: its first step follows rounding noise (see the stationarity test).
    """
    model = make_model(kind, device)
    x, y, xt, yt, xv, yv = make_data(device)
    cfg = AttackConfig(terms=terms, poison_scale=scale)
    attack = AccumulativeAttack(cfg, knows(xt, yt, xv, yv), seed=4)
    attack.prepare(model)
    xtp, _ = attack.trigger_batch(model)
    eps, steps, step_size = cfg.trigger_schedule()
    ref_t = seed_craft_trigger(model, xt, yt, xv, yv, eps=eps, steps=steps, step_size=step_size,
                               poison_mask=attack.trigger_poisoned_mask)
    assert_signed_steps_close(xtp, ref_t, eps=eps, steps=steps, step_size=step_size)
    received = attack.poison(model, x, y, 0)
    xp, poisoned = received.x, received.poisoned
    eps, steps, step_size = cfg.poison_schedule()
    ref = seed_craft_accumulative(model, x, y, xtp, yt, xv, yv, eps=eps, steps=steps, step_size=step_size,
                                  gamma=cfg.gamma, terms=terms, poison_mask=poisoned)
    assert_signed_steps_close(xp, ref, eps=eps, steps=steps, step_size=step_size)


def test_reset_clean_rows_is_the_seed_order_of_crafting_then_resetting():
    model = make_model("mlp")
    x, y, xt, yt, xv, yv = make_data()
    cfg = AttackConfig(poison_scale=0.5, reset_clean_rows=True)
    attack = AccumulativeAttack(cfg, knows(xt, yt, xv, yv), seed=3)
    attack.prepare(model)
    xtp, _ = attack.trigger_batch(model)
    eps, steps, step_size = cfg.trigger_schedule()
    keep_t = attack.trigger_poisoned_mask.view(-1, 1, 1, 1)
    ref_t = torch.where(keep_t, seed_craft_trigger(model, xt, yt, xv, yv, eps=eps, steps=steps, step_size=step_size),
                        xt)
    assert_signed_steps_close(xtp, ref_t, eps=eps, steps=steps, step_size=step_size)
    received = attack.poison(model, x, y, 2)
    xp, poisoned = received.x, received.poisoned
    assert torch.equal(xp[~poisoned], x[~poisoned])
    eps, steps, step_size = cfg.poison_schedule()
    ref = seed_craft_accumulative(model, x, y, xtp, yt, xv, yv, eps=eps, steps=steps, step_size=step_size,
                                  gamma=cfg.gamma)
    assert_signed_steps_close(xp, torch.where(poisoned.view(-1, 1, 1, 1), ref, x), eps=eps, steps=steps,
                              step_size=step_size)
    held = AccumulativeAttack(dataclasses.replace(cfg, reset_clean_rows=False), knows(xt, yt, xv, yv), seed=3)
    held.prepare(model)
    assert not torch.equal(held.poison(model, x, y, 2).x, xp)  # C = 2: the two orders differ
