"""memdisc.training.victim: what trains (trainable_parameters), the transfer victim (frozen backbone in eval
mode under a trainable head), history copies that share the backbone, and crafting on a transfer victim.

Small BatchNorm CNNs (memdisc.models "cnn", 1x8x8 inputs) keep every test far below a second.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memdisc.attacks import accumulative_direction, craft_alignment, crafting_state
from memdisc.models import build_model
from memdisc.training.victim import TransferVictim, frozen_copy, trainable_parameters, trained_module

pytestmark = pytest.mark.usefixtures("single_thread")


def make_cnn(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """A BatchNorm cnn with non-trivial running statistics (eval mode differs from train mode)."""
    torch.manual_seed(seed)
    model = build_model("cnn", in_channels=1, num_classes=num_classes, image_size=8, norm="bn")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model


def data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sgd_steps(model: nn.Module, steps: int = 3) -> None:
    """A few training steps as a setting takes them: model.train(), SGD on the trainable parameters."""
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1, momentum=0.9)
    model.train()
    for step in range(steps):
        x, y = data(seed=10 + step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_trainable_parameters_of_a_plain_model_are_all_its_parameters_in_order():
    model = make_cnn()
    params = trainable_parameters(model)
    assert len(params) == len(list(model.parameters())) and all(a is b for a, b in zip(params, model.parameters()))
    model.head.requires_grad_(False)
    assert len(trainable_parameters(model)) == len(params) - 2
    with pytest.raises(ValueError, match=r"^model: expected an nn.Module, got list$"):
        trainable_parameters([torch.zeros(1)])


def test_transfer_victim_freezes_the_backbone_and_trains_a_copied_head():
    model = make_cnn()
    victim = TransferVictim(model)
    assert victim.backbone is model  # kept, not copied
    assert all(not p.requires_grad for p in model.parameters())
    assert victim.head is not model.head and same(state(victim.head), state(model.head))
    assert [p for p in trainable_parameters(victim)] == list(victim.head.parameters())
    x, _ = data()
    victim.train()
    assert victim.head.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        z = victim.features(x)
        assert torch.equal(z, model.eval().features(x))
        assert torch.equal(victim(x), victim.head(z))
        assert torch.equal(victim(x), model(x))  # the copied head: the trained model's logits
    victim.requires_grad_(True)  # the backbone stays frozen
    assert all(not p.requires_grad for p in model.parameters()) and victim.head.weight.requires_grad
    victim.eval().train()
    assert not any(m.training for m in model.modules())


def test_transfer_victim_with_a_fresh_head_of_another_class_count():
    model = make_cnn()
    victim = TransferVictim(model, nn.Linear(model.head.in_features, 3))
    x, _ = data()
    assert victim(x).shape == (16, 3)
    again = TransferVictim(model)  # a second victim on the same (already frozen) backbone: its head trains
    assert again.backbone is victim.backbone and again.head.weight.requires_grad


def test_transfer_victim_errors_name_the_argument():
    model = make_cnn()
    with pytest.raises(ValueError, match=r"^backbone: expected a model with features\(x\) and a linear head"):
        TransferVictim(nn.Sequential(nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"^head: expected an nn.Linear on the backbone's 128 features, got Linear"):
        TransferVictim(model, nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"^head: expected an nn.Linear .* got Conv2d"):
        TransferVictim(model, nn.Conv2d(128, 10, 1))
    with pytest.raises(ValueError, match=r"^head: a layer of the backbone is frozen with it"):
        TransferVictim(model, model.head)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen by a refused call


@pytest.mark.parametrize("setting", ["transfer", "end-to-end"])
def test_batchnorm_statistics_drift_only_end_to_end(setting):
    """Training steps through ``model.train()``: a transfer victim's backbone (BatchNorm statistics included)
    is unchanged and its head moves; end-to-end every parameter and the running statistics move."""
    model = make_cnn()
    before = state(model)
    victim = TransferVictim(model) if setting == "transfer" else model
    head_before = state(victim.head)
    sgd_steps(victim)
    bn = [k for k in before if "running" in k]
    assert len(bn) == 4
    moved = {k for k, v in state(model).items() if not torch.equal(v, before[k])}
    assert not same(state(victim.head), head_before)
    if setting == "transfer":
        assert not moved and all(p.grad is None for p in model.parameters())
    else:
        assert set(bn) <= moved and {k for k, _ in model.named_parameters()} <= moved


def test_frozen_copy_shares_a_transfer_victims_backbone():
    victim = TransferVictim(make_cnn())
    victim.train()
    copy_ = frozen_copy(victim)
    assert copy_.backbone is victim.backbone and copy_.head is not victim.head
    assert not copy_.training and not copy_.head.weight.requires_grad and victim.head.weight.requires_grad
    assert victim.head.training  # the original keeps its mode
    x, _ = data()
    with torch.no_grad():
        assert torch.equal(copy_(x), victim.eval()(x))
    plain = make_cnn()
    plain_copy = frozen_copy(plain)
    assert all(a is not b for a, b in zip(plain_copy.parameters(), plain.parameters()))
    assert same(state(plain_copy), state(plain)) and not any(p.requires_grad for p in plain_copy.parameters())
    assert trained_module(victim) is victim.head and trained_module(plain) is plain


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_crafting_on_a_transfer_victim_differentiates_the_head_only(mode):
    """The attack's gradients are w.r.t. the head: a direction of the head's two tensors, a crafted batch
    that moves within eps through the frozen backbone, and nothing of the victim changed."""
    victim = TransferVictim(make_cnn())
    victim.train()
    before = state(victim)
    with crafting_state(victim, mode) as params:
        assert params == list(victim.head.parameters())
        assert victim.head.training == (mode == "train") and not victim.backbone.training
    assert victim.head.training and not victim.backbone.training
    x, y = data(8)
    xt, yt = data(8, seed=2)
    xv, yv = data(16, seed=3)
    direction = accumulative_direction(victim, x, y, xt, yt, xv, yv, mode=mode)
    assert [d.shape for d in direction] == [victim.head.weight.shape, victim.head.bias.shape]
    crafted = craft_alignment(victim, x, y, direction, eps=0.1, steps=3, step_size=0.05, ascent=True, mode=mode)
    assert (crafted - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(crafted, x)
    assert same(state(victim), before) and all(p.grad is None for p in victim.parameters())
    assert not any(p.requires_grad for p in victim.backbone.parameters())
    with pytest.raises(ValueError, match=r"^trainable_parameters\(model\)/direction: expected two non-empty "
                                         r"sequences of equal length, got 2 and 1"):
        craft_alignment(victim, x, y, direction[:1], eps=0.1, steps=1, step_size=0.05, ascent=True)
    victim.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^model: expected a module with trainable parameters"):
        craft_alignment(victim, x, y, direction, eps=0.1, steps=1, step_size=0.05, ascent=True)
