"""The study's measurements: loss and accuracy, per-class accuracy, the linear probe of the penultimate
features and saliency maps (memdisc.eval.classification, .probe, .saliency), on hand-built cases
whose answers are known."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memdisc.eval.classification import error_rate, eval_outputs, loss_and_accuracy, per_class_accuracy
from memdisc.eval.probe import linear_probe_accuracy, penultimate_features
from memdisc.eval.saliency import saliency_maps
from memdisc.models import build_model
from tiny_nets import TinyCNN

pytestmark = pytest.mark.usefixtures("single_thread")


def logits_as_pixels(rows: list[list[float]]) -> torch.Tensor:
    """Images [N, 1, 1, C] whose pixels are the logits an ``nn.Flatten()`` model returns."""
    return torch.tensor(rows).view(len(rows), 1, 1, -1)


# Four samples, three classes: logits, labels, and each sample's CE = logsumexp(z) - z_y.
ROWS = [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 4.0]]
LABELS = [0, 0, 0, 2]  # correct: rows 1 and 3 (row 0 a tie, argmax 0: counted correct, as torch's argmax)


def expected_losses() -> list[float]:
    return [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(ROWS, LABELS)]


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_loss_and_accuracy_on_known_logits(batch_size):
    x, y = logits_as_pixels(ROWS), torch.tensor(LABELS)
    loss, accuracy = loss_and_accuracy(nn.Flatten(), x, y, batch_size=batch_size)
    assert loss == pytest.approx(sum(expected_losses()) / 4, rel=1e-6)
    assert accuracy == 3 / 4  # rows 0 (tie -> class 0), 1 and 3
    assert error_rate(nn.Flatten(), x, y, batch_size=batch_size) == 1 - accuracy


def test_per_class_accuracy_on_known_logits_with_an_absent_class():
    rows = ROWS + [[0.0, 5.0, 0.0], [0.0, 0.0, 1.0]]
    labels = LABELS + [1, 1]  # class 0: 2 of 3 right; class 1: 1 of 2; class 2: 1 of 1; class 3: absent
    x, y = logits_as_pixels([r + [-9.0] for r in rows]), torch.tensor(labels)
    for batch_size in (2, 1000):
        acc = per_class_accuracy(nn.Flatten(), x, y, num_classes=4, batch_size=batch_size)
        assert acc[:3] == [2 / 3, 1 / 2, 1.0] and math.isnan(acc[3]) and len(acc) == 4


def test_measurements_run_in_eval_mode_without_gradients_and_restore_the_mode():
    """BatchNorm in train mode would normalise with the batch's statistics: the measurements use the
    running ones (the same numbers for any batch size), and the model stays in train mode."""
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,))
    model.train()
    with torch.no_grad():
        reference = model.eval()(x)
    model.train()
    logits = eval_outputs(model, x, batch_size=5)
    assert model.training and not logits.requires_grad
    torch.testing.assert_close(logits, reference)
    loss, accuracy = loss_and_accuracy(model, x, y, batch_size=5)
    assert loss == pytest.approx(F.cross_entropy(reference, y).item(), rel=1e-5)
    assert accuracy == (reference.argmax(1) == y).sum().item() / 12 and model.training
    per_class = per_class_accuracy(model, x, y, 10, batch_size=7)
    for k in range(10):
        rows = y == k
        if rows.any():
            assert per_class[k] == pytest.approx((reference.argmax(1)[rows] == k).double().mean().item())
        else:
            assert math.isnan(per_class[k])
    assert model.training


@pytest.mark.parametrize("call, message", [
    (lambda x, y: loss_and_accuracy(nn.Flatten(), x, y, batch_size=0), "batch_size: expected an integer >= 1, got 0"),
    (lambda x, y: loss_and_accuracy(nn.Flatten(), x[:0], y[:0]), "x: expected at least one sample"),
    (lambda x, y: loss_and_accuracy(nn.Flatten(), x, y + 1), "y: expected class indices in [0, 3), got values in [1, 3]"),
    (lambda x, y: loss_and_accuracy(nn.Flatten(), x, y.float()), "y: expected an int64 [4] tensor"),
    (lambda x, y: per_class_accuracy(nn.Flatten(), x, y, 0), "num_classes: expected an integer >= 1, got 0"),
    (lambda x, y: per_class_accuracy(nn.Flatten(), x, y, 2), "y: expected class indices in [0, 2), got values in [0, 2]"),
    (lambda x, y: per_class_accuracy(nn.Flatten(), x.long(), y, 3), "x: expected a floating [N, ...] tensor"),
])
def test_measurements_refuse_bad_arguments_by_name(call, message):
    x, y = logits_as_pixels(ROWS), torch.tensor([0, 1, 2, 2])
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        call(x, y)


# ---- the linear probe ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["seed-mlp", "seed-cnn", "cnn"])
def test_penultimate_features_are_the_eval_mode_features_on_the_cpu(name):
    torch.manual_seed(0)
    model = build_model(name, 1, 10, 28).train()
    x = torch.rand(7, 1, 28, 28)
    z = penultimate_features(model, x, batch_size=3)
    with torch.no_grad():
        reference = model.eval().features(x)
    assert z.shape == (7, model.head.in_features) and z.device.type == "cpu" and not z.requires_grad
    torch.testing.assert_close(z, reference)
    with pytest.raises(ValueError, match=r"^model: expected a memdisc model with features\(x\)"):
        penultimate_features(nn.Flatten(), x)
    with pytest.raises(ValueError, match="^batch_size"):
        penultimate_features(model, x, batch_size=0)


def blobs(n: int, d: int, seed: int, scale: float = 1.0, separation: float = 6.0):
    """Three classes, features ``N(separation * e_k, 1)`` in the first three coordinates (the rest noise),
    every coordinate multiplied by ``scale``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    z = torch.randn(n, d, generator=g)
    z[torch.arange(n), y] += separation
    return z * scale, y


def test_linear_probe_separates_separable_features_and_not_noise():
    z_train, y_train = blobs(300, 8, seed=0)
    z_test, y_test = blobs(150, 8, seed=1)
    assert linear_probe_accuracy(z_train, y_train, z_test, y_test) == 1.0
    noise = linear_probe_accuracy(torch.randn(300, 8), y_train, torch.randn(150, 8), y_test)
    assert 0.15 < noise < 0.55  # chance is 1/3
    flipped = linear_probe_accuracy(z_train, y_train, z_test, (y_test + 1) % 3)
    assert flipped == 0.0
    dead = torch.zeros(300, 1), torch.zeros(150, 1)  # a dead ReLU unit: a constant feature, zero variance
    assert linear_probe_accuracy(torch.cat([z_train, dead[0]], 1), y_train, torch.cat([z_test, dead[1]], 1),
                                 y_test) == 1.0


def test_linear_probe_standardises_the_features():
    """Features at scale 1e-4 (e.g. small activations) with weak separation: standardised, the probe gives
    the same accuracy as at scale 1, well above chance (unscaled, the L2 penalty on the weights 1e4
    times larger that such features need would leave it near chance)."""
    z_train, y_train = blobs(600, 8, seed=0, separation=1.5)
    z_test, y_test = blobs(600, 8, seed=1, separation=1.5)
    unit = linear_probe_accuracy(z_train, y_train, z_test, y_test)
    assert unit > 0.6
    assert linear_probe_accuracy(z_train * 1e-4, y_train, z_test * 1e-4, y_test) == pytest.approx(unit, abs=1 / 600)
    assert linear_probe_accuracy(z_train, y_train, z_test, y_test, seed=5) == unit  # lbfgs draws nothing


@pytest.mark.parametrize("change, message", [
    (dict(y_train=torch.zeros(30, dtype=torch.long)), "y_train: expected at least two classes to separate, got only class 0"),
    (dict(z_test=torch.randn(10, 5)), "z_test: expected 4 features per row (as z_train), got 5"),
    (dict(z_train=torch.full((30, 4), float("nan"))), "z_train: the features contain NaN or Inf values"),
    (dict(z_train=torch.randn(30)), "z_train: expected a floating [N, D] tensor of features with N >= 1"),
    (dict(z_test=torch.randn(0, 4)), "z_test: expected a floating [N, D] tensor of features with N >= 1"),
    (dict(y_test=torch.zeros(10, dtype=torch.int32)), "y_test: expected an int64 [10] tensor of class indices"),
    (dict(y_train=torch.zeros(29, dtype=torch.long)), "y_train: expected an int64 [30] tensor"),
    (dict(seed=-1), "seed: expected an integer in [0, 4294967295], got -1"),
    (dict(max_iter=0), "max_iter: expected an integer >= 1, got 0"),
])
def test_linear_probe_refuses_bad_arguments_by_name(change, message):
    args = dict(z_train=torch.randn(30, 4), y_train=torch.arange(30) % 2, z_test=torch.randn(10, 4),
                y_test=torch.arange(10) % 2) | change
    keywords = {k: args.pop(k) for k in ("seed", "max_iter") if k in args}
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        linear_probe_accuracy(*args.values(), **keywords)


# ---- saliency ------------------------------------------------------------------------------------

def test_saliency_of_a_linear_model_is_the_analytic_gradient_max_over_channels():
    """f(x) = W vec(x): d CE / d x = W^T (softmax(f(x)) - e_y), reshaped [C, H, W]; |.| max over C."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 6, bias=False)).double()
    x, y = torch.rand(5, 3, 4, 5, dtype=torch.float64), torch.tensor([0, 1, 5, 3, 3])
    p = torch.softmax(model(x), 1).detach()
    grad = ((p - F.one_hot(y, 6)) @ model[1].weight.detach()).view(5, 3, 4, 5)
    maps = saliency_maps(model, x, y)
    assert maps.shape == (5, 4, 5) and not maps.requires_grad
    torch.testing.assert_close(maps, grad.abs().amax(1))


def test_saliency_is_per_sample_in_eval_mode_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = TinyCNN().train()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    maps = saliency_maps(model, x, y)
    assert model.training and all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BatchNorm's statistics too
    alone = torch.cat([saliency_maps(model, x[i:i + 1], y[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(maps, alone)  # eval mode: no sample sees another's batch statistics
    assert bool((maps.flatten(1).amax(1) > 0).all())


def test_saliency_refuses_bad_arguments_by_name():
    model, x, y = TinyCNN(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"^x: expected \[N, C, H, W\] images, got a tensor of shape \(2, 1, 64\)"):
        saliency_maps(model, x.flatten(2), y)
    with pytest.raises(ValueError, match="^y: expected an int64 .2. tensor"):
        saliency_maps(model, x, y.float())
