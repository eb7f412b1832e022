"""memdisc.detectors' backdoor-data detectors (loss, spectral, activation-clustering, asset), their flag
rules and ASSET's pieces (medcouple, adjusted outlyingness, thresholds, variance objective, offset
model); the registry-wide contract is tests/test_contracts.py."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from torch import nn

from memdisc.detectors import (DETECTORS, ASSETDetector, ActivationClusteringDetector, Detector, LossDetector,
                               MDDetector, SpectralDetector, adjusted_outlyingness, asset_threshold, cluster_margins,
                               medcouple, offset_model, output_variance, tail_threshold)
from memdisc.detectors.asset import fit_vnet, make_vnet
from memdisc.eval.detection import auroc
from memdisc.models import SmallCNN
from memdisc.snapshots import SnapshotSet
from memdisc.training.victim import TransferVictim

pytestmark = pytest.mark.usefixtures("single_thread")
CLASSES, TARGET, SOURCE = 4, 0, 1


class RowNet(nn.Module):
    """``features(x)``: the 8 row means of a 1x8x8 image, [B, 8], no parameters; ``head``: linear(8 -> 4)
    reading class k from row k (a model that classifies the clean rows right and has not learnt the trigger)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, CLASSES)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            for k in range(CLASSES):
                self.head.weight[k, k] = 16.0

    def features(self, x):
        return x.mean(3).flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


def synthetic(per_class: int, poisons: int, seed: int):
    """``(x [N, 1, 8, 8], y [N], poisoned [N])``: class k is gray noise (0.25 +- 0.05) with row k brightened by
    0.5; the poisons are class-1 images with rows 6-7 set to 0.9 (the trigger), labelled 0, last."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(CLASSES).repeat_interleave(per_class)
    looks = torch.cat([y, torch.full((poisons,), SOURCE)])
    x = (0.25 + 0.05 * torch.randn(looks.shape[0], 1, 8, 8, generator=g)).clamp(0, 1)
    x[torch.arange(looks.shape[0]), 0, looks] += 0.5
    x[per_class * CLASSES:, 0, 6:] = 0.9
    poisoned = torch.arange(looks.shape[0]) >= per_class * CLASSES
    return x, torch.cat([y, torch.full((poisons,), TARGET)]), poisoned


@pytest.fixture(scope="module")
def backdoor():
    """A model, a 420-row set whose 20 poisons are separable in its features, and a clean 100-row base set."""
    x, y, poisoned = synthetic(100, 20, seed=0)
    x_base, y_base, _ = synthetic(25, 0, seed=1)
    return RowNet(), x, y, poisoned, x_base, y_base


# Options under which ASSET's offset training moves a linear head enough on 420 rows in one pass (the
# notebook's lr 1e-4 and 100 Vnet steps at 1e-4 are for 50,000 CIFAR rows and 8,192 features).
FAST_ASSET = {"epochs": 1, "batch_size": 140, "lr": 0.1, "vnet_steps": 40, "vnet_lr": 1e-2}
SEPARABLE = {"loss": {}, "spectral": {}, "activation-clustering": {}, "asset": FAST_ASSET}


# ---- medcouple and adjusted outlyingness ----------------------------------------------------------

# statsmodels 0.15.0's exact medcouple, statsmodels.stats.stattools.medcouple(np.array(x, dtype=float),
# use_fast=False) (its O(n^2) algorithm with the tie rule of statsmodels GH5395), in a scratch venv
# (python3 -m venv; pip install numpy statsmodels); statsmodels is not a dependency of memdisc.
MEDCOUPLE_REFERENCE = [
    ([0.1, 0.4, 0.5, 0.7, 1.2, 2.5, 6.0], 0.6071428571428572),  # odd n, right-skewed
    ([-9.0, -4.0, -1.5, -1.0, -0.5, 0.0, 0.2, 0.3], -0.5058139534883721),  # even n, left-skewed
    ([1, 2, 3, 3, 3, 4, 8, 10, 11], 0.6666666666666666),  # odd n, three ties at the median
    ([0, 1, 2, 2, 2, 2, 5, 9], 0.1),  # even n, four ties at the median
    ([-12, -7, -7, -3, 0, 0, 0, 0, 1, 2], -0.75),  # even n, ties at the median and below, left-skewed
    ([5.0, 5.0, 5.0, 5.0], 0.0),  # all tied
    ([1.0, 2.0, 3.0, 4.0, 5.0], 0.0),  # symmetric
    ([3.2, 0.05, 7.9, 0.4, 1.1, 0.8, 0.3, 2.2, 0.6, 0.9, 15.0], 0.706043956043956),  # unsorted
    ([1.001, 1.348, 0.76, 0.41, 0.635, 0.371, 1.062, 3.82, 0.611, 0.538, 1.632, 1.429, 1.111, 0.394, 0.971,
      2.004, 0.261, 0.633, 0.149, 0.275, 0.159, 0.79, 0.282, 1.312, 1.17], 0.1732199787460149),  # lognormal
]


@pytest.mark.parametrize("values, expected", MEDCOUPLE_REFERENCE)
def test_medcouple_matches_statsmodels(values, expected):
    x = torch.tensor(values, dtype=torch.float64)
    assert medcouple(x).dtype == torch.float64
    assert float(medcouple(x)) == pytest.approx(expected, abs=1e-12)
    assert float(medcouple(-x)) == pytest.approx(-expected, abs=1e-12)  # MC(-x) = -MC(x)
    assert float(medcouple(x[torch.randperm(len(values))])) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("bad", [torch.zeros(0), torch.zeros(2, 3), torch.arange(4), [1.0, 2.0]])
def test_medcouple_and_outlyingness_refuse_what_is_not_a_sample(bad):
    for fn in (medcouple, adjusted_outlyingness):
        with pytest.raises(ValueError, match="^x: expected a non-empty 1-D float tensor"):
            fn(bad)


def _by_hand(values, med, q1, q3, mc):
    """The notebook's adjusted outlyingness from hand-computed median (torch's lower middle value),
    quartiles (linear interpolation) and statsmodels' medcouple."""
    iqr = q3 - q1
    if mc > 0:
        w1, w2 = q1 - 1.5 * math.exp(-4 * mc) * iqr, q3 + 1.5 * math.exp(3 * mc) * iqr
    else:
        w1, w2 = q1 - 1.5 * math.exp(-3 * mc) * iqr, q3 + 1.5 * math.exp(4 * mc) * iqr
    return [(v - med) / (w2 - med) if v > med else (med - v) / (med - w1) for v in values]


def test_adjusted_outlyingness_is_the_notebooks_formula_by_hand():
    # n = 7, right-skewed (MC > 0): sorted 0.1 0.2 0.25 0.3 0.4 0.6 2.5; median 0.3; q1 at position 1.5:
    # 0.225; q3 at 4.5: 0.5; statsmodels' MC 0.41666666666666685.
    right = [0.4, 0.1, 2.5, 0.25, 0.3, 0.6, 0.2]
    want = _by_hand(right, 0.3, 0.225, 0.5, 0.41666666666666685)
    np.testing.assert_allclose(adjusted_outlyingness(torch.tensor(right, dtype=torch.float64)).numpy(), want,
                               rtol=1e-12)
    assert max(want) == want[2] < 2  # 2.5 the most outlying, yet inside the skew-adjusted fence
    # n = 8, left-skewed (MC <= 0): sorted -3 -1 0 0.5 1 1.2 1.4 1.5; torch.median: the lower middle value
    # 0.5; q1 at position 1.75: -0.25; q3 at 5.25: 1.25; statsmodels' MC -0.4291666666666667.
    left = [1.0, -3.0, 0.5, 1.5, -1.0, 1.2, 0.0, 1.4]
    want = _by_hand(left, 0.5, -0.25, 1.25, -0.4291666666666667)
    got = adjusted_outlyingness(torch.tensor(left, dtype=torch.float32))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)  # float32 input: 1.2 and 1.4 are rounded


# ---- thresholds and flag rules ----------------------------------------------------------------------

def _scores(seed: int = 0, n: int = 301) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n - 15, generator=g), 6 + torch.rand(15, generator=g)]).float()


def _lower_half(s: np.ndarray) -> np.ndarray:
    return s[s <= np.quantile(s, 0.5, method="lower")]


def test_tail_threshold_is_the_lower_half_gaussian_tail():
    s = _scores()
    low = _lower_half(s.double().numpy())
    want = low.mean() + low.std(ddof=0) * math.sqrt(-2 * math.log(1e-6))
    assert tail_threshold(s) == pytest.approx(want, rel=1e-12)
    assert tail_threshold(s, eps=1e-3) == pytest.approx(low.mean() + low.std() * math.sqrt(-2 * math.log(1e-3)))
    assert tail_threshold(3 * s + 2) == pytest.approx(3 * want + 2, rel=1e-6)  # scale-free
    flags = LossDetector().flag(s)
    assert torch.equal(flags, torch.from_numpy(s.double().numpy() >= want))
    assert bool(flags[-15:].all()) and int(flags.sum()) < 15 + 0.03 * 286  # the planted scores; ~1 % of N(0, 1)
    # a point mass in the lower half: every higher score flagged, none of the lower half
    assert LossDetector().flag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.5, 4.0])).tolist() == [False] * 4 + [True] * 2


def test_asset_threshold_is_get_t_with_sklearn_gaussian_mixture():
    for s in (_scores(1), _scores(2, n=40) * 0.05):
        low = _lower_half(s.double().numpy())
        gmm = GaussianMixture(n_components=1, covariance_type="full").fit(low.reshape(-1, 1))
        sigma, mu, w = np.sqrt(gmm.covariances_).item(), gmm.means_.item(), gmm.weights_.item()
        want = (sigma * np.sqrt(-2 * np.log(1e-6) * sigma * np.sqrt(2 * np.pi)) + mu) / w
        assert asset_threshold(s) == pytest.approx(want, rel=1e-9)
        assert torch.equal(ASSETDetector().flag(s), s.double() >= want)
    s = _scores(3)
    assert asset_threshold(4 * s) != pytest.approx(4 * asset_threshold(s), rel=1e-3)  # not scale invariant


def test_flag_rules_refuse_bad_scores_and_labels():
    s = _scores()
    for bad in (s[None], s.long(), s[:0], torch.cat([s, torch.tensor([math.nan])]), s.tolist()):
        with pytest.raises(ValueError, match="^scores: expected"):
            LossDetector().flag(bad)
    for bad in (torch.zeros(s.shape[0] - 1, dtype=torch.long), torch.zeros(s.shape[0]), [0] * s.shape[0]):
        with pytest.raises(ValueError, match="^y: expected the int64"):
            ASSETDetector().flag(s, bad)
    for bad in (0, 1, -0.5, math.nan, True):
        with pytest.raises(ValueError, match="^eps: expected a finite number > 0.0 and < 1.0"):
            tail_threshold(s, eps=bad)
        with pytest.raises(ValueError, match="^eps: "):
            asset_threshold(s, eps=bad)
    with pytest.raises(ValueError, match="^y: spectral flags per class"):
        SpectralDetector().flag(s)


def test_md_flags_by_the_default_rule():
    assert MDDetector.flag is Detector.flag and LossDetector.flag is Detector.flag


# ---- the detectors on a separable backdoor ----------------------------------------------------------

@pytest.mark.parametrize("name", list(SEPARABLE))
def test_detector_finds_separable_poisons_and_leaves_the_model(name, backdoor):
    model, x, y, poisoned, x_base, y_base = backdoor
    model.train()
    before = copy.deepcopy(model.state_dict())
    detector = DETECTORS[name](None, **SEPARABLE[name]).fit(model, x_base, y_base)
    scores = detector.score(model, x, y)
    assert scores.shape == y.shape and scores.is_floating_point() and not scores.requires_grad
    assert auroc(scores, poisoned) >= 0.99
    flags = detector.flag(scores, y)
    assert flags.dtype == torch.bool and flags.shape == y.shape
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = DETECTORS[name](None, **SEPARABLE[name]).fit(model, x_base, y_base)
    assert torch.equal(again.score(model, x, y), scores)  # deterministic (under the default seed where seeded)


def test_loss_scores_are_the_cross_entropy(backdoor):
    model, x, y, *_ = backdoor
    with torch.no_grad():
        logits = model(x).double()
    want = torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y]
    np.testing.assert_allclose(LossDetector().score(model, x, y).double().numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_spectral_scores_and_flags_per_class(backdoor):
    model, x, y, poisoned, *_ = backdoor
    detector = SpectralDetector(expected_fraction=0.12)
    scores = detector.score(model, x, y)
    features = model.features(x).double().numpy()
    for c in range(CLASSES):  # the top eigenvector of the class's scatter matrix, independently of the SVD
        centred = features[y.numpy() == c] - features[y.numpy() == c].mean(0)
        v = np.linalg.eigh(centred.T @ centred)[1][:, -1]
        np.testing.assert_allclose(scores[y == c].double().numpy(), (centred @ v) ** 2, rtol=1e-5, atol=1e-9)
    flags = detector.flag(scores, y)
    for c in range(CLASSES):
        s = scores[y == c].double().numpy()
        assert np.array_equal(flags[y == c].numpy(), s >= np.quantile(s, 1 - 1.5 * 0.12))
    assert bool(flags[poisoned].all())  # 1.5 * 0.12 of 120 target rows: 22 flagged, the 20 poisons among them
    assert int(flags[y == TARGET].sum()) == 22 and int(flags.sum()) == 22 + 3 * 18
    assert SpectralDetector().flag(scores, y).sum() < flags.sum()  # 0.1: 15 % of each class


def test_cluster_margins_of_two_groups():
    # 2-D features (fewer than the components: clustered as they are): 8 rows around (0, 0), 2 around (10, 10)
    f = np.array([[0, 0], [0.1, 0], [0, 0.2], [0.2, 0.1], [-0.1, 0], [0, -0.1], [0.1, 0.1], [-0.2, 0.1],
                  [10, 10], [10.2, 9.9]])
    margin, small = cluster_margins(f, components=10, seed=0)
    m_large, m_small = f[:8].mean(0), f[8:].mean(0)  # the k-means centroids of the obvious split
    d_large, d_small = np.linalg.norm(f - m_large, axis=1), np.linalg.norm(f - m_small, axis=1)
    np.testing.assert_allclose(margin, (d_large - d_small) / (d_large + d_small), rtol=1e-9)
    assert small == 0.2 and (margin[8:] > 0).all() and (margin[:8] < 0).all()
    assert cluster_margins(f[:1], 10, 0)[1] == 0.5  # one row: nothing to split



def test_cluster_margins_drop_columns_constant_over_the_class():
    """ReLU units never active on a class are constant columns: FastICA's whitening would divide by their zero
    spread (NaN inside scikit-learn); they are dropped, and the split is the one of the other columns."""
    rng = np.random.default_rng(0)
    f = np.concatenate([rng.normal(0, 1, (40, 12)), rng.normal(8, 1, (10, 12))])
    with_dead = np.concatenate([f, np.zeros((50, 30))], axis=1)  # 42 columns > 10 components: FastICA runs
    margin, small = cluster_margins(with_dead, components=10, seed=0)
    assert np.isfinite(margin).all() and small == 0.2 and (margin[40:] > 0).all()
    np.testing.assert_array_equal(margin, cluster_margins(f, components=10, seed=0)[0])
    assert cluster_margins(np.zeros((5, 3)), 10, 0)[1] == 0.5  # nothing varies: nothing to split

def test_activation_clustering_flags_the_small_cluster_of_a_suspect_class(backdoor):
    model, x, y, poisoned, *_ = backdoor
    for components in (10, 4):  # the 8 features as they are; reduced by FastICA to 4
        detector = ActivationClusteringDetector(components=components)
        scores = detector.score(model, x, y)
        assert torch.equal(detector.flag(scores, y), poisoned)  # 20 of 120 in class 0: below 0.35
        assert bool((scores[y == TARGET].abs() <= 1).all()) and bool((scores[y != TARGET] <= -1).all())
    strict = ActivationClusteringDetector(size_threshold=0.1)  # 20 / 120 is not below 0.1: no suspect class
    scores = strict.score(model, x, y)
    assert not bool(strict.flag(scores, y).any()) and bool((scores <= -1).all())
    assert auroc(scores, poisoned) >= 0.99  # the order within and across classes stays


# ---- ASSET's pieces -----------------------------------------------------------------------------------

def test_output_variance_is_the_mean_unbiased_variance_over_classes():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(output_variance(logits)) == pytest.approx(np.var(logits.numpy(), axis=1, ddof=1).mean(), rel=1e-12)


def test_fit_vnet_singles_out_rows_unlike_the_base_set():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 6, generator=g)
    suspect = torch.randn(64, 6, generator=g)
    suspect[:4] += 4.0  # four rows unlike anything in the base set
    torch.manual_seed(0)
    out = fit_vnet(make_vnet(6, 16), suspect, base, steps=200, lr=1e-2)
    assert out.shape == (64,) and bool(((out > 0) & (out < 1)).all())
    outlying = adjusted_outlyingness(out)
    assert set(outlying.topk(4).indices.tolist()) == {0, 1, 2, 3}  # the most outlying outputs


def test_offset_model_reinitialises_every_trainable_layer_under_the_seed():
    torch.manual_seed(0)
    model = SmallCNN(image_size=8, width=4, hidden=8)
    with torch.no_grad():  # a "trained" model: other weights than any initialisation, other buffers
        for p in model.parameters():
            p.add_(1.0)
        model.normalize.mean.fill_(0.3)
    before, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    offset = offset_model(model, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model untouched
    torch.manual_seed(5)
    fresh = SmallCNN(image_size=8, width=4, hidden=8)  # the constructor draws the layers in the same order
    for (name, p), q in zip(offset.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(offset.normalize.mean, model.normalize.mean)  # buffers copied
    # a transfer victim: only the head is new, the frozen backbone is shared
    victim = TransferVictim(model)
    offset = offset_model(victim, seed=5)
    assert offset.backbone is victim.backbone
    torch.manual_seed(5)
    head = nn.Linear(8, 10)
    assert torch.equal(offset.head.weight, head.weight) and torch.equal(offset.head.bias, head.bias)
    assert not torch.equal(offset.head.weight, victim.head.weight)


def test_offset_model_refuses_a_layer_it_cannot_reinitialise():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

    model = nn.Sequential(nn.Linear(2, 2), Scaled())
    with pytest.raises(ValueError, match=r"^model: .* 1 \(Scaled\) has no reset_parameters"):
        offset_model(model, 0)


def test_asset_is_seeded_keeps_its_base_set_and_flags_by_get_t(backdoor):
    model, x, y, poisoned, x_base, y_base = backdoor
    rng = torch.get_rng_state()
    detector = ASSETDetector(**FAST_ASSET).fit(model, x_base, y_base)
    scores = detector.score(model, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(detector.flag(scores, y), scores.double() >= asset_threshold(scores))
    other = ASSETDetector(**{**FAST_ASSET, "seed": 1}).fit(model, x_base, y_base)
    assert not torch.equal(other.score(model, x, y), scores)
    resumed = ASSETDetector(**FAST_ASSET)
    resumed.load_state_dict(detector.state_dict())
    assert torch.equal(resumed.score(model, x, y), scores)
    with pytest.raises(ValueError, match="^x_base: ASSET has no clean base set; call fit"):
        ASSETDetector().score(model, x, y)
    for bad in ({"x_base": x_base, "y_base": y_base}, {"x_base": y_base}, {"x_base": x_base[:0]}):
        with pytest.raises(ValueError, match="^state: "):
            ASSETDetector().load_state_dict(bad)
    with pytest.raises(ValueError, match="^y: expected class indices in"):
        detector.score(model, x, y + CLASSES)


# ---- options and arguments --------------------------------------------------------------------------

@pytest.mark.parametrize("name, option, bad", [
    ("spectral", "expected_fraction", 0), ("spectral", "expected_fraction", 1.0),
    ("spectral", "expected_fraction", "0.1"),
    ("activation-clustering", "components", 0), ("activation-clustering", "components", 2.0),
    ("activation-clustering", "size_threshold", 0.0), ("activation-clustering", "size_threshold", 1),
    ("activation-clustering", "seed", -1), ("activation-clustering", "seed", True),
    ("asset", "epochs", 0), ("asset", "batch_size", 0), ("asset", "lr", 0.0), ("asset", "lr", math.inf),
    ("asset", "vnet_steps", 1.5), ("asset", "vnet_lr", -1e-4), ("asset", "vnet_hidden", 0),
    ("asset", "cutoff", 0), ("asset", "seed", 2 ** 32),
])
def test_bad_options_are_refused_by_name(name, option, bad):
    with pytest.raises(ValueError, match=f"^{option}: expected"):
        DETECTORS[name](None, **{option: bad})


def test_snapshots_are_refused_unless_none_or_a_snapshot_set():
    """(The contract, tests/test_contracts.py, builds every detector from None where it reads no snapshots.)"""
    for cls in (LossDetector, SpectralDetector, ActivationClusteringDetector, ASSETDetector):
        cls(SnapshotSet([RowNet()]))
        with pytest.raises(ValueError, match=r"^snapshots: .* takes None or a SnapshotSet \(unused\), got list"):
            cls([RowNet()])
    with pytest.raises(ValueError, match="^snapshots: expected a SnapshotSet"):
        MDDetector(None)


@pytest.mark.parametrize("name", list(SEPARABLE))
def test_detectors_that_read_labels_refuse_none(name, backdoor):
    model, x, *_ = backdoor
    with pytest.raises(ValueError, match="^y: this detector reads the labels"):
        DETECTORS[name](None).score(model, x)
