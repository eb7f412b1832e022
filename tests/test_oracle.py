"""memdisc.oracle.seed: the plain seed port behaves as ALGORITHM.md sections 2, 3 and 5 say."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memdisc.oracle import (madry_at_perturb, seed_at_correct, seed_batch_md, seed_dsc_correct,
                            seed_train_step)


def tiny_cnn() -> nn.Module:
    """conv3x3(1->4) - BatchNorm - ReLU - maxpool2 - linear(64 -> 10), for 1x8x8 inputs."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


@pytest.fixture
def setup():
    """(current model in train mode, a historical model that differs from it, x [8,1,8,8], y [8])."""
    torch.manual_seed(0)
    hist = tiny_cnn()
    model = copy.deepcopy(hist)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.train()
    hist.train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    return model, hist, x, y


def eval_ce(model, x, y) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = F.cross_entropy(model(x), y).item()
    model.train(was)
    return out


def assert_in_ball(xc, x, eps):
    assert (xc - x).abs().max().item() <= eps + 1e-6
    assert xc.min().item() >= 0.0 and xc.max().item() <= 1.0


def test_batch_md_is_mean_kl_hist_to_current_in_eval_mode(setup):
    model, hist, x, y = setup
    md = seed_batch_md(model, hist, x)
    model.eval(), hist.eval()
    with torch.no_grad():
        p_h = F.softmax(hist(x).double(), 1)
        p_t = F.softmax(model(x).double(), 1)
    expected = (p_h * (p_h.log() - p_t.log())).sum(1).mean().item()
    model.train(), hist.train()
    assert md == pytest.approx(expected, rel=1e-4)
    assert md > 0
    assert seed_batch_md(model, model, x) == pytest.approx(0.0, abs=1e-6)
    assert model.training and hist.training


def test_dsc_stops_at_once_when_tau_is_huge(setup):
    model, hist, x, y = setup
    xc, iters = seed_dsc_correct(model, hist, x, y, 0, tau0=1e9)
    assert iters == 0 and torch.equal(xc, x)


def test_dsc_runs_max_iters_when_tau_is_negative_and_descends(setup):
    model, hist, x, y = setup
    xc, iters = seed_dsc_correct(model, hist, x, y, 3, tau0=-1.0, tau_slope=0.0, max_iters=7)
    assert iters == 7
    assert_in_ball(xc, x, 0.2)
    assert eval_ce(model, xc, y) < eval_ce(model, x, y)
    assert model.training and hist.training
    assert all(p.grad is None for p in model.parameters())


def test_dsc_threshold_grows_with_the_step_index(setup):
    model, hist, x, y = setup
    d0 = seed_batch_md(model, hist, x)
    tau0, slope = d0 - 1e-3, 1e-2  # step 0: tau just below D, so it corrects; step 1: tau above D
    _, iters0 = seed_dsc_correct(model, hist, x, y, 0, tau0=tau0, tau_slope=slope)
    xc1, iters1 = seed_dsc_correct(model, hist, x, y, 1, tau0=tau0, tau_slope=slope)
    assert iters0 >= 1 and iters1 == 0 and torch.equal(xc1, x)


def test_at_correct_always_runs_all_iterations(setup):
    model, hist, x, y = setup
    # with no KL term the seed AT is DSC without the early stop
    at = seed_at_correct(model, x, y, iters=6, step_size=0.03, eps=0.1, kl_weight=0.0)
    dsc, iters = seed_dsc_correct(model, hist, x, y, 0, tau0=-1.0, max_iters=6, step_size=0.03, eps=0.1)
    assert iters == 6 and torch.equal(at, dsc)
    assert not torch.equal(seed_at_correct(model, x, y, iters=5, step_size=0.03, eps=0.1, kl_weight=0.0), at)


def test_at_correct_default_kl_weight_is_one_over_classes_and_descends(setup):
    model, _, x, y = setup
    default = seed_at_correct(model, x, y)
    torch.testing.assert_close(default, seed_at_correct(model, x, y, kl_weight=0.1), rtol=0, atol=0)
    assert not torch.equal(seed_at_correct(model, x, y, kl_weight=50.0), default)
    assert_in_ball(default, x, 0.2)
    assert eval_ce(model, default, y) < eval_ce(model, x, y)
    assert model.training


def test_madry_ascends_the_loss(setup):
    model, _, x, y = setup
    xa = madry_at_perturb(model, x, y, iters=5, step_size=0.02, eps=0.05)
    assert_in_ball(xa, x, 0.05)
    assert eval_ce(model, xa, y) > eval_ce(model, x, y)
    assert model.training


@pytest.mark.parametrize("clip_type", ["inf", "2"])
def test_train_step_clips_the_gradient_norm(setup, clip_type):
    model, _, x, y = setup
    model.eval()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = seed_train_step(model, opt, x, y, clip_norm=0.01, clip_type=clip_type)
    assert model.training
    assert loss > 0
    grads = [p.grad for p in model.parameters()]
    if clip_type == "inf":
        norm = max(g.abs().max().item() for g in grads)
    else:
        norm = torch.cat([g.flatten() for g in grads]).norm().item()
    assert norm <= 0.01 * (1 + 1e-5)
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)


def test_train_step_without_clipping_is_plain_sgd_on_mean_ce(setup):
    model, _, x, y = setup
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = seed_train_step(model, opt, x, y)
    reference.train()
    expected_loss = F.cross_entropy(reference(x), y)
    grads = torch.autograd.grad(expected_loss, list(reference.parameters()))
    assert loss == pytest.approx(expected_loss.item(), rel=1e-6)
    assert max(g.abs().max().item() for g in grads) > 0.01  # so the clipping test above really clipped
    for p, r, g in zip(model.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p.detach(), r.detach() - 0.1 * g)
    with pytest.raises(ValueError, match="^clip_type:"):
        seed_train_step(model, opt, x, y, clip_norm=1.0, clip_type="1")
