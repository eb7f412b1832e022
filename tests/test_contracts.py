"""The contract every registered component keeps, parametrized over the registries: every
attack in ``ATTACKS``, defence in ``DEFENSES`` and detector in ``DETECTORS``.  A component
added to a registry is tested here without another line: output shapes and dtypes,
determinism under a seed, the state round trip, and bad arguments refused with a ValueError
naming the argument."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from memdisc.attacks import ATTACKS, PoisonedBatch, build_attack
from memdisc.defenses import DEFENSES, DefenseContext, build_defense
from memdisc.detectors import DETECTORS
from memdisc.snapshots import SnapshotSet
from tiny_nets import TinyCNN

pytestmark = pytest.mark.usefixtures("single_thread")
B = 8


def model_and_history(seed: int = 0) -> tuple[nn.Module, SnapshotSet]:
    """A model and one historical snapshot of it (slightly other weights), both seeded."""
    torch.manual_seed(seed)
    model = TinyCNN()
    old = copy.deepcopy(model)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, SnapshotSet([old])


def data():
    """``(x, y)`` batch, clean trigger, validation and held-out sets: 1x8x8 pixels in [0, 1]."""
    g = torch.Generator().manual_seed(1)

    def draw(n):
        return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)

    return {"batch": draw(B), "trigger": draw(B), "val": draw(16), "heldout": draw(32)}


def module_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_module_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- attacks -------------------------------------------------------------------------------------

def make_attack(name: str, seed: int = 0):
    d = data()
    return build_attack(name, *d["trigger"], *d["val"], seed)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_poisons_a_batch_of_the_same_shape_and_leaves_the_model_as_it_was(name):
    model, _ = model_and_history()
    x, y = data()["batch"]
    attack = make_attack(name)
    attack.prepare(model)
    before, training = module_state(model), model.training
    out = attack.poison(model, x, y, 0)
    assert isinstance(out, PoisonedBatch)
    assert out.x.shape == x.shape and out.x.dtype == x.dtype and out.x.device == x.device
    assert out.y.shape == y.shape and not out.y.is_floating_point()
    assert out.poisoned.dtype == torch.bool and out.poisoned.shape == (B,)
    assert bool((out.x >= 0).all() and (out.x <= 1).all())
    assert torch.equal(out.x[~out.poisoned], x[~out.poisoned]) and torch.equal(out.y[~out.poisoned], y[~out.poisoned])
    assert_same_module_state(before, module_state(model))
    assert model.training == training


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_deterministic_under_its_seed(name):
    outs = []
    for _ in range(2):
        model, _ = model_and_history()
        attack = make_attack(name, seed=3)
        attack.prepare(model)
        outs.append(attack.poison(model, *data()["batch"], 2))
    a, b = outs
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.poisoned, b.poisoned)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_state_round_trip_resumes_to_the_same_batches(name):
    model, _ = model_and_history()
    x, y = data()["batch"]
    first = make_attack(name)
    first.prepare(model)
    resumed = make_attack(name)
    resumed.load_state_dict(first.state_dict())  # instead of prepare()
    a, b = first.poison(model, x, y, 1), resumed.poison(model, x, y, 1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.poisoned, b.poisoned)
    with pytest.raises(ValueError, match="^state"):
        resumed.load_state_dict({"not": "a state"})


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_refuses_bad_arguments_by_name(name):
    model, _ = model_and_history()
    x, y = data()["batch"]
    attack = make_attack(name)
    attack.prepare(model)
    with pytest.raises(ValueError, match="^step"):
        attack.poison(model, x, y, -1)
    with pytest.raises(ValueError, match="^x"):
        attack.poison(model, x[:, 0], y, 0)
    with pytest.raises(ValueError, match="^y"):
        attack.poison(model, x, y[:3], 0)
    with pytest.raises(ValueError, match="^y: expected an int64"):  # the labels F.cross_entropy takes
        attack.poison(model, x, y.int(), 0)
    with pytest.raises(ValueError, match="^seed"):
        make_attack(name, seed=-1)


def test_an_unknown_attack_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="^name: expected one of accumulative"):
        make_attack("nope")


# ---- defences ------------------------------------------------------------------------------------

def make_defense(name: str, snapshots: SnapshotSet, seed: int = 0):
    return build_defense(name, DefenseContext(snapshots, data()["heldout"], seed))


def correct_and_train(name: str, seed: int = 0):
    """A fresh model and defence: one corrected batch, its report, the loss and the trained weights."""
    model, snaps = model_and_history()
    defense = make_defense(name, snaps, seed)
    x, y = data()["batch"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x_train, report = defense.correct(model, x, y, 0)
    loss = defense.train_on(model, opt, x_train, y)
    return x_train, report, loss, module_state(model), defense


@pytest.mark.parametrize("name", list(DEFENSES))
def test_defense_returns_a_batch_and_report_of_the_documented_shapes(name):
    x, _ = data()["batch"]
    x_train, report, loss, _, defense = correct_and_train(name)
    assert x_train.shape == x.shape and x_train.dtype == x.dtype
    assert bool((x_train >= 0).all() and (x_train <= 1).all())
    assert report.moved.dtype == torch.bool and report.moved.shape == (B,)
    assert report.iterations.dtype == torch.long and report.iterations.shape == (B,)
    assert torch.equal(report.moved, report.iterations > 0)
    assert torch.equal(x_train[~report.moved], x[~report.moved])
    if report.md is not None:
        assert report.md.shape == (B,) and report.md.is_floating_point() and bool(torch.isfinite(report.md).all())
    for field, dtype in (("keep", torch.bool), ("weights", None)):
        value = getattr(report, field)
        assert value is None or (value.shape == (B,) and (dtype is None or value.dtype == dtype))
    assert loss.dim() == 0 and bool(torch.isfinite(loss))


@pytest.mark.parametrize("name", list(DEFENSES))
def test_defense_is_deterministic_under_its_seed(name):
    (xa, ra, la, wa, _), (xb, rb, lb, wb, _) = correct_and_train(name, seed=5), correct_and_train(name, seed=5)
    assert torch.equal(xa, xb) and torch.equal(ra.iterations, rb.iterations) and torch.equal(la, lb)
    assert (ra.md is None) == (rb.md is None) and (ra.md is None or torch.equal(ra.md, rb.md))
    assert_same_module_state(wa, wb)


@pytest.mark.parametrize("name", list(DEFENSES))
def test_defense_state_round_trip_continues_identically(name):
    model, snaps = model_and_history()
    x, y = data()["batch"]
    first = make_defense(name, snaps, seed=2)
    first.correct(model, x, y, 0)  # the state a run has after one batch (e.g. DSC's threshold, generator)
    resumed = make_defense(name, snaps, seed=9)  # another seed: the state must carry what matters
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    x2 = x.flip(0).contiguous()
    a, ra = first.correct(model, x2, y.flip(0), 1)
    b, rb = resumed.correct(model, x2, y.flip(0), 1)
    assert torch.equal(a, b) and torch.equal(ra.iterations, rb.iterations) and ra.threshold == rb.threshold


@pytest.mark.parametrize("name", list(DEFENSES))
def test_defense_refuses_bad_batches_by_name(name):
    model, snaps = model_and_history()
    defense = make_defense(name, snaps)
    x, y = data()["batch"]
    with pytest.raises(ValueError, match="^y"):
        defense.correct(model, x, y.float(), 0)
    with pytest.raises(ValueError, match="^y: expected an int64"):  # one batch rule for attacks and defences
        defense.correct(model, x, y.int(), 0)
    with pytest.raises(ValueError, match="^x"):
        defense.correct(model, torch.full_like(x, float("nan")), y, 0)
    with pytest.raises(ValueError, match="^name: expected one of ST"):
        make_defense("nope", snaps)


# ---- detectors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_scores_every_sample_without_changing_the_model(name):
    model, snaps = model_and_history()
    model.train()
    detector = DETECTORS[name](snaps)
    assert detector.fit(model, *data()["heldout"]) is detector
    x, y = data()["batch"]
    before = module_state(model)
    scores = detector.score(model, x, y)
    assert scores.shape == (B,) and scores.is_floating_point() and not scores.requires_grad
    assert bool(torch.isfinite(scores).all())
    assert model.training and all(not m.training for m in snaps.models)
    assert_same_module_state(before, module_state(model))


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_is_deterministic_and_its_state_round_trips(name):
    x, y = data()["batch"]
    runs = []
    for _ in range(2):
        model, snaps = model_and_history()
        detector = DETECTORS[name](snaps).fit(model, *data()["heldout"])
        runs.append((model, snaps, detector, detector.score(model, x, y)))
    assert torch.equal(runs[0][3], runs[1][3])
    model, snaps, detector, scores = runs[0]
    resumed = DETECTORS[name](snaps)
    resumed.load_state_dict(copy.deepcopy(detector.state_dict()))  # instead of fit()
    assert torch.equal(resumed.score(model, x, y), scores)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_refuses_bad_arguments_by_name(name):
    with pytest.raises(ValueError, match="^snapshots"):
        DETECTORS[name]("not a snapshot set")
    _, snaps = model_and_history()
    with pytest.raises(ValueError, match="^state"):
        DETECTORS[name](snaps).load_state_dict({"not": "a state"})
