"""The contract every registered component keeps, parametrized over the registries: every
attack in ``ATTACKS``, defence in ``DEFENSES`` and detector in ``DETECTORS``.  A component
added to a registry is tested here without another line: output shapes and dtypes,
determinism under a seed, the state round trip, and bad arguments refused with a ValueError
naming the argument; offline attacks also replace exactly ``round(fraction * N)`` distinct rows (the
seed's per-class draws, ``per_class``: their ``count``),
and a backdoor, where an attack has one, gives targets and an attack success rate."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from memdisc.attacks import ATTACKS, PoisonedBatch, build_attack, poison_count
from memdisc.defenses import DEFENSES, DefenseContext, build_defense
from memdisc.detectors import DETECTORS
from memdisc.eval.classification import attack_success_rate
from memdisc.snapshots import SnapshotSet
from tiny_nets import TinyCNN

pytestmark = pytest.mark.usefixtures("single_thread")
B = 8
N_TRAIN = 200  # an offline attack's training set: its default fraction poisons some rows of it
OFFLINE = [name for name, cls in ATTACKS.items() if cls.kind == "offline"]


class TinyVictim(TinyCNN):
    """TinyCNN with a memdisc model's ``head`` (its final linear layer; the same parameters and state), which
    an attack that trains its own copy of the victim with memdisc.training.fit needs (loss)."""

    @property
    def head(self) -> nn.Linear:
        return self.fc


def model_and_history(seed: int = 0) -> tuple[nn.Module, SnapshotSet]:
    """A model and one historical snapshot of it (slightly other weights), both seeded."""
    torch.manual_seed(seed)
    model = TinyVictim()
    old = copy.deepcopy(model)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, SnapshotSet([old])


def data():
    """``(x, y)`` batch, clean trigger, validation, held-out and training sets: 1x8x8 pixels in [0, 1],
    10 classes."""
    g = torch.Generator().manual_seed(1)

    def draw(n):
        return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)

    return {"batch": draw(B), "trigger": draw(B), "val": draw(16), "heldout": draw(32), "train": draw(N_TRAIN)}


def module_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_module_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- attacks -------------------------------------------------------------------------------------

def make_attack(name: str, seed: int = 0, cfg=None):
    d = data()
    (xt, yt), (xv, yv) = d["trigger"], d["val"]
    return build_attack(name, seed, cfg, num_classes=10, x_val=xv, y_val=yv, x_trigger=xt, y_trigger=yt)


def sent(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What ``poison`` gets: a batch at online step ``step``, or for an offline attack the training set at step 0."""
    if ATTACKS[name].kind == "offline":
        return (*data()["train"], 0)
    return (*data()["batch"], step)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_poisons_a_batch_of_the_same_shape_and_leaves_the_model_as_it_was(name):
    model, _ = model_and_history()
    x, y, step = sent(name, 0)
    attack = make_attack(name)
    attack.prepare(model)
    before, training = module_state(model), model.training
    out = attack.poison(model, x, y, step)
    assert isinstance(out, PoisonedBatch)
    assert out.x.shape == x.shape and out.x.dtype == x.dtype and out.x.device == x.device
    assert out.y.shape == y.shape and out.y.dtype == torch.int64
    assert out.poisoned.dtype == torch.bool and out.poisoned.shape == y.shape
    assert bool((out.x >= 0).all() and (out.x <= 1).all()) and bool(((out.y >= 0) & (out.y < 10)).all())
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
        outs.append(attack.poison(model, *sent(name, 2)))
    a, b = outs
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.poisoned, b.poisoned)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_state_round_trip_resumes_to_the_same_batches(name):
    model, _ = model_and_history()
    x, y, step = sent(name, 1)
    first = make_attack(name)
    first.prepare(model)
    resumed = make_attack(name)
    resumed.load_state_dict(first.state_dict())  # instead of prepare()
    a, b = first.poison(model, x, y, step), resumed.poison(model, x, y, step)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.poisoned, b.poisoned)
    with pytest.raises(ValueError, match="^state"):
        resumed.load_state_dict({"not": "a state"})


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_refuses_bad_arguments_by_name(name):
    model, _ = model_and_history()
    x, y, step = sent(name, 0)
    attack = make_attack(name)
    attack.prepare(model)
    with pytest.raises(ValueError, match="^step"):
        attack.poison(model, x, y, -1)
    with pytest.raises(ValueError, match="^x"):
        attack.poison(model, x[:, 0], y, step)
    with pytest.raises(ValueError, match="^y"):
        attack.poison(model, x, y[:3], step)
    with pytest.raises(ValueError, match="^y: expected an int64"):  # the labels F.cross_entropy takes
        attack.poison(model, x, y.int(), step)
    with pytest.raises(ValueError, match="^seed"):
        make_attack(name, seed=-1)
    with pytest.raises(ValueError, match="^cfg"):
        make_attack(name, cfg=object())
    with pytest.raises(ValueError, match="^num_classes"):
        build_attack(name, 0)
    with pytest.raises(ValueError, match="^x_vla: not something an attacker knows"):
        build_attack(name, 0, num_classes=10, x_vla=x)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_backdoor_is_absent_or_gives_targets_and_an_attack_success_rate(name):
    model, _ = model_and_history()
    x, y = data()["batch"]
    attack = make_attack(name)
    attack.prepare(model)
    x_before = x.clone()
    out = attack.apply_backdoor(x, y)
    if out is None:
        with pytest.raises(ValueError, match="^attack: .* plants no backdoor"):
            attack_success_rate(model, attack, x, y)
        return
    x_bd, target = out
    assert torch.equal(x, x_before)  # the test inputs are not written to
    assert x_bd.shape == x.shape and x_bd.dtype == x.dtype and bool((x_bd >= 0).all() and (x_bd <= 1).all())
    assert target.shape == y.shape and target.dtype == torch.int64 and bool(((target >= 0) & (target < 10)).all())
    again = attack.apply_backdoor(x, y)
    assert torch.equal(again[0], x_bd) and torch.equal(again[1], target)
    assert 0.0 <= attack_success_rate(model, attack, x, y) <= 1.0
    with pytest.raises(ValueError, match="^x"):
        attack.apply_backdoor(x[:, 0], y)


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_attack_replaces_round_fraction_n_distinct_rows_drawn_by_its_seed(name):
    model, _ = model_and_history()
    x, y = data()["train"]
    attack = make_attack(name)
    out = attack.poison(model, x, y, 0)
    n = attack.count(y)
    assert n == poison_count(attack.cfg.fraction, N_TRAIN) or getattr(attack.cfg, "per_class", False)
    assert n > 0 and int(out.poisoned.sum()) == n  # a mask: n rows, none twice
    changed = (out.x != x).flatten(1).any(1) | (out.y != y)
    assert torch.equal(changed, out.poisoned)  # every poisoned row replaced, every other row as it was
    other = make_attack(name, seed=1).poison(model, x, y, 0)
    assert int(other.poisoned.sum()) == n and not torch.equal(other.poisoned, out.poisoned)


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_attack_refuses_bad_arguments_by_name(name):
    model, _ = model_and_history()
    x, y = data()["train"]
    attack = make_attack(name)
    with pytest.raises(ValueError, match="^step: an offline attack poisons the whole training set once"):
        attack.poison(model, x, y, 1)
    with pytest.raises(ValueError, match=r"^y: expected class indices in \[0, 10\)"):
        attack.poison(model, x, y + 10, 0)
    with pytest.raises(ValueError, match="^fraction"):
        ATTACKS[name].config_class(fraction=1.5)


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
    loss = defense.train_on(model, opt, x_train, y, report)
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
    assert report.keep is None or (report.keep.shape == (B,) and report.keep.dtype == torch.bool)
    assert report.weights is None or (report.weights.shape == (B,) and report.weights.is_floating_point()
                                      and bool((report.weights >= 0).all()))
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
    for field in ("keep", "weights"):
        va, vb = getattr(ra, field), getattr(rb, field)
        assert (va is None) == (vb is None) and (va is None or torch.equal(va, vb))


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
    flags = detector.flag(scores, y)
    assert flags.shape == (B,) and flags.dtype == torch.bool
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
    if DETECTORS[name].needs_snapshots:
        with pytest.raises(ValueError, match="^snapshots"):
            DETECTORS[name](None)
    else:  # a detector that reads no snapshots is built without them too
        DETECTORS[name](None)
    _, snaps = model_and_history()
    with pytest.raises(ValueError, match="^state"):
        DETECTORS[name](snaps).load_state_dict({"not": "a state"})


@pytest.mark.parametrize("name", list(DETECTORS))
@pytest.mark.parametrize("bad, arg", [("x_rank", "x"), ("x_channels", "x"), ("x_int", "x"), ("y_length", "y")])
def test_detector_score_refuses_bad_batches_by_name(name, bad, arg):
    """A batch the detector cannot score is a ValueError naming the argument, never an error from inside torch."""
    model, snaps = model_and_history()
    x, y = data()["batch"]
    bad_x, bad_y = {"x_rank": (x[:, 0, 0], y), "x_channels": (x.repeat(1, 3, 1, 1), y),
                    "x_int": ((x * 255).long(), y), "y_length": (x, y[:-1])}[bad]
    with pytest.raises(ValueError, match=f"^{arg}:"):
        DETECTORS[name](snaps).score(model, bad_x, bad_y)
