"""memdisc.training.fit: end-to-end and transfer training on in-memory tensors: learning, early stopping
on validation loss with the best epoch's weights kept, determinism under a seed, the frozen backbone's
BatchNorm statistics (unchanged in transfer, moving end-to-end), the cached-features shortcut, and bad
arguments named.

A learnable synthetic set of 1x8x8 images (class k adds a fixed random mask M_k to uniform noise) and the
BatchNorm "cnn" keep every test around a second.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from memdisc.config import OptionError
from memdisc.eval.classification import error_rate
from memdisc.models import build_model
from memdisc.training import fit
from memdisc.training.fit import FitConfig, TrainingLog, train_end_to_end, train_transfer
from memdisc.training.victim import TransferVictim

pytestmark = pytest.mark.usefixtures("single_thread")

MASKS = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.25
FAST = FitConfig(epochs=4, batch_size=32, lr=0.05, patience=None, seed=3)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return 0.5 * torch.rand(n, 1, 8, 8, generator=g) + 0.5 * MASKS[y], y


TRAIN, VAL = make_data(256, 1), make_data(128, 2)


def make_cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", in_channels=1, num_classes=10, image_size=8, norm="bn")


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def trained_cnn() -> torch.nn.Module:
    """A cnn after one epoch end-to-end (features a fresh head can learn from)."""
    model = make_cnn()
    train_end_to_end(model, *TRAIN, *VAL, dataclasses.replace(FAST, epochs=1))
    return model


def test_end_to_end_learns():
    model = make_cnn()
    assert error_rate(model, *VAL) > 0.8
    log = train_end_to_end(model, *TRAIN, *VAL, FAST)
    assert isinstance(log, TrainingLog) and len(log.train_loss) == len(log.val_loss) == len(log.val_error) == 4
    assert min(log.val_error) < 0.1 and log.train_loss[-1] < log.train_loss[0]
    assert log.best_epoch == 1 + min(range(4), key=log.val_loss.__getitem__) and not log.stopped_early
    assert model.training  # left in train mode, as after any training loop


def test_early_stopping_keeps_the_best_epochs_weights():
    """Validation labels shifted by one class: the better the model learns the training set, the higher the
    validation loss, so training stops ``patience`` epochs after the best one, and the model holds exactly
    the weights (BatchNorm statistics included) of a run that ended at that epoch."""
    x_val, y_val = VAL
    shifted = (x_val, (y_val + 1) % 10)
    cfg = dataclasses.replace(FAST, epochs=20, patience=2)
    model = make_cnn()
    log = train_end_to_end(model, *TRAIN, *shifted, cfg)
    assert log.stopped_early and len(log.val_loss) == log.best_epoch + 2 < 20
    assert log.val_loss[log.best_epoch - 1] < min(log.val_loss[log.best_epoch:])
    shorter = make_cnn()
    short_log = train_end_to_end(shorter, *TRAIN, *shifted, dataclasses.replace(cfg, epochs=log.best_epoch))
    assert short_log.val_loss == log.val_loss[:log.best_epoch]
    assert same(state(model), state(shorter))
    assert not same(state(model), state(make_cnn()))


@pytest.mark.parametrize("setting", ["end-to-end", "transfer"])
def test_on_epoch_sees_each_epochs_weights_before_the_best_is_restored(setting):
    """The hook runs after every epoch, in order, with the weights that epoch left (epoch 1: those of a
    one-epoch run); the run still ends with the best epoch's weights, whatever the hook saw."""
    def victim():
        return make_cnn() if setting == "end-to-end" else TransferVictim(trained_cnn())
    train = train_end_to_end if setting == "end-to-end" else train_transfer
    model, seen = victim(), {}
    log = train(model, *TRAIN, *VAL, FAST, on_epoch=lambda epoch: seen.setdefault(epoch, state(model)))
    assert list(seen) == [1, 2, 3, 4]
    one = victim()
    train(one, *TRAIN, *VAL, dataclasses.replace(FAST, epochs=1))
    assert same(seen[1], state(one))
    assert same(seen[log.best_epoch], state(model))
    assert not same(seen[1], seen[4])

def test_runs_are_deterministic_and_leave_the_global_rng_alone():
    rng = torch.get_rng_state()
    a, b, c = make_cnn(), make_cnn(), make_cnn()
    log_a = train_end_to_end(a, *TRAIN, *VAL, FAST)
    log_b = train_end_to_end(b, *TRAIN, *VAL, FAST)
    assert log_a == log_b and same(state(a), state(b))
    log_c = train_end_to_end(c, *TRAIN, *VAL, dataclasses.replace(FAST, seed=4))  # another data order
    assert log_c.train_loss != log_a.train_loss and not same(state(a), state(c))
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("setting", ["transfer", "end-to-end"])
def test_batchnorm_statistics_move_only_end_to_end(setting):
    model = trained_cnn()
    before = state(model)
    if setting == "transfer":
        victim = TransferVictim(model)
        head = state(victim.head)
        log = train_transfer(victim, *TRAIN, *VAL, FAST)
        assert same(state(model), before) and not same(state(victim.head), head)
        assert len(log.val_loss) == 4
    else:
        train_end_to_end(model, *TRAIN, *VAL, FAST)
        moved = {k for k, v in state(model).items() if not torch.equal(v, before[k])}
        assert {k for k in before if "running" in k} <= moved


def test_transfer_on_cached_features_is_training_the_victim_on_images():
    """The head trained on features computed once equals the head of the victim trained on the images
    (the same loop, each minibatch through the frozen backbone), up to the rounding of batched convolutions."""
    backbone = trained_cnn()
    cached, on_images = TransferVictim(backbone, torch.nn.Linear(128, 10)), TransferVictim(backbone)
    on_images.head.load_state_dict(cached.head.state_dict())
    log = train_transfer(cached, *TRAIN, *VAL, FAST)
    log_images = fit._fit(on_images, *TRAIN, *VAL, FAST, "", False)
    for a, b in zip(cached.head.parameters(), on_images.head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert log.val_loss == pytest.approx(log_images.val_loss, rel=1e-5)
    assert log.val_error[0] > 0.5 and min(log.val_error) < 0.3  # the fresh head learns


@pytest.mark.parametrize("values, option", [
    (dict(epochs=0), "epochs"), (dict(batch_size=1.5), "batch_size"), (dict(lr=0.0), "lr"),
    (dict(momentum=-0.1), "momentum"), (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(patience=0), "patience"), (dict(seed=-1), "seed"),
])
def test_bad_options_are_named(values, option):
    with pytest.raises(OptionError, match=rf"^{option}: expected"):
        FitConfig(**values)


def test_bad_arguments_are_named():
    model = make_cnn()
    (x, y), (xv, yv) = TRAIN, VAL
    cases = [
        (dict(x_train=x.double().long()), r"^x_train: expected a floating \[N, \.\.\.\] tensor"),
        (dict(y_train=y.int()), r"^y_train: expected an int64 \[256\] tensor"),
        (dict(x_val=xv[:0], y_val=yv[:0]), r"^x_val: expected at least one sample"),
        (dict(y_val=yv + 5), r"^y_val: expected class indices in \[0, 10\) \(the classes of the model's head\), "
                             r"got values in \[5, 14\]"),
        (dict(x_val=xv[:, :, :4]), r"^x_val: expected samples of x_train's shape \(1, 8, 8\), got \(1, 4, 8\)"),
        (dict(cfg={"epochs": 2}), r"^cfg: expected a FitConfig, got dict"),
        (dict(progress="yes"), r"^progress: expected a bool, got str"),
    ]
    for change, message in cases:
        args = dict(x_train=x, y_train=y, x_val=xv, y_val=yv, cfg=FAST, progress=False) | change
        with pytest.raises(ValueError, match=message):
            train_end_to_end(model, **args)
    with pytest.raises(ValueError, match=r"^model: expected a memdisc model with a linear head"):
        train_end_to_end(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), x, y, xv, yv, FAST)
    with pytest.raises(ValueError, match=r"^victim: expected a TransferVictim \(TransferVictim\(model\) freezes"):
        train_transfer(model, x, y, xv, yv, FAST)
    victim = TransferVictim(make_cnn(), torch.nn.Linear(128, 3))
    with pytest.raises(ValueError, match=r"^y_train: expected class indices in \[0, 3\) \(the classes of the "
                                         r"victim's head\)"):
        train_transfer(victim, x, y, xv, yv, FAST)
    victim.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^victim: expected a module with trainable parameters"):
        train_transfer(victim, x, y % 3, xv, yv % 3, FAST)
    assert same(state(model), state(make_cnn()))  # nothing trained by a refused call
