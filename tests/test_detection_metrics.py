"""memdisc.eval.detection against a brute-force pairwise count and hand-made cases."""
import json

import numpy as np
import pytest
import torch

from memdisc.eval.detection import auroc, detection_summary, roc_curve, tpr_at_fpr


def brute_auroc(s, y):
    """Mann-Whitney: P(score_pos > score_neg) + 0.5 P(tie), over all pairs."""
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def brute_tpr_at_fpr(s, y, target):
    """Try every threshold (each score and +inf); best TPR with FPR <= target."""
    best = 0.0
    for t in np.r_[np.inf, s]:
        flagged = s >= t
        if flagged[y == 0].mean() <= target:
            best = max(best, flagged[y == 1].mean())
    return best


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_tpr_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    y[:2] = [0, 1]
    # Rounded scores give many ties, within and between classes.
    s = np.round(rng.normal(size=n) + 0.8 * y, decimals=int(rng.integers(0, 3)))
    assert auroc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)
    for target in (0.0, 0.05, 0.1, 0.5, 1.0):
        assert tpr_at_fpr(s, y, fpr=target) == pytest.approx(brute_tpr_at_fpr(s, y, target), abs=1e-12)


def test_known_auroc_values():
    y = np.array([0, 0, 0, 1, 1])
    assert auroc([0.1, 0.2, 0.3, 0.8, 0.9], y) == 1.0
    assert auroc([0.9, 0.8, 0.7, 0.1, 0.2], y) == 0.0
    assert auroc(np.full(5, 3.0), y) == 0.5
    # Clean {0.1, 0.5, 0.6}, poisoned {0.5, 0.9}: 0.5 beats 0.1 and ties 0.5 (1.5 pairs),
    # 0.9 beats all three (3 pairs) -> 4.5 / 6.
    assert auroc([0.1, 0.5, 0.6, 0.5, 0.9], y) == pytest.approx(4.5 / 6)


def test_roc_curve_ties_give_one_point_per_threshold():
    s = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    y = np.array([1, 1, 0, 0, 0])
    fpr, tpr, thr = roc_curve(s, y)
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.5, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)


def test_tpr_at_fpr_hand_made():
    # By decreasing score: P N P P N N N N N N (3 poisoned, 7 clean).
    s = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], dtype=float)
    y = np.array([1, 0, 1, 1, 0, 0, 0, 0, 0, 0])
    assert tpr_at_fpr(s, y, fpr=0.0) == pytest.approx(1 / 3)   # only the top sample, before any clean one
    assert tpr_at_fpr(s, y, fpr=0.1) == pytest.approx(1 / 3)   # 1 clean = FPR 1/7 > 0.1: not allowed
    assert tpr_at_fpr(s, y, fpr=1 / 7) == pytest.approx(1.0)   # exactly one false positive allowed
    # A target computed in floating point just below 1/10 still admits one false positive in 10.
    s11, y11 = np.arange(11.0)[::-1], np.r_[0, 1, np.zeros(9)]  # by decreasing score: N P N ... N
    assert tpr_at_fpr(s11, y11, fpr=0.0) == 0.0
    assert tpr_at_fpr(s11, y11, fpr=1 - 0.9) == 1.0
    # A tie straddling the target cannot be split: 0.5 with two tied clean samples at the top.
    s_tie, y_tie = np.array([5.0, 5.0, 4.0, 3.0]), np.array([0, 0, 1, 1])
    assert tpr_at_fpr(s_tie, y_tie, fpr=0.5) == 0.0


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=50), np.r_[np.zeros(30), np.ones(20)]
    want = auroc(s, y)
    assert auroc(torch.tensor(s, dtype=torch.float32), torch.tensor(y).bool()) == pytest.approx(want)
    assert auroc(torch.tensor(s).requires_grad_(), torch.tensor(y, dtype=torch.int64)) == pytest.approx(want)
    assert auroc(list(s), list(y)) == want


@pytest.mark.parametrize("scores, labels, match", [
    ([0.1, 0.2, 0.3], [0, 1], "labels: expected the same length"),
    ([0.1, np.nan, 0.3], [0, 1, 1], "scores: expected finite"),
    ([0.1, np.inf, 0.3], [0, 1, 1], "scores: expected finite"),
    ([0.1, 0.2, 0.3], [0, 1, 2], "labels: expected binary"),
    ([0.1, 0.2, 0.3], [1, 1, 1], "labels: expected at least one poisoned"),
    ([0.1, 0.2, 0.3], [0, 0, 0], "labels: expected at least one poisoned"),
    ([[0.1, 0.2]], [[0, 1]], "scores: expected a 1-D array"),
    (["a", "b"], [0, 1], "scores: expected a 1-D array of numbers"),
])
def test_validation_errors_name_the_argument(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        auroc(scores, labels)


def test_fpr_target_is_validated():
    with pytest.raises(ValueError, match="fpr: expected"):
        tpr_at_fpr([0.1, 0.2], [0, 1], fpr=1.5)
    with pytest.raises(ValueError, match="fpr: expected"):
        detection_summary([0.1, 0.2], [0, 1], fpr=-0.1)


def test_detection_summary_is_compact_and_json_ready():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(4000), np.ones(1000)].astype(int)
    s = rng.normal(size=y.size) + 1.5 * y
    d = detection_summary(s, y, fpr=0.05)
    assert json.loads(json.dumps(d)) == d
    assert d["auroc"] == pytest.approx(brute_auroc(s, y), abs=1e-12)
    assert d["tpr_at_fpr"] == tpr_at_fpr(s, y, fpr=0.05)
    assert (d["n_pos"], d["n_neg"], d["fpr_target"]) == (1000, 4000, 0.05)
    fpr, tpr = np.array(d["roc"]["fpr"]), np.array(d["roc"]["tpr"])
    assert 2 <= fpr.size <= 200 and fpr.size == tpr.size
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # The stored curve stays close to the full one: its area is within 1%.
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2 == pytest.approx(d["auroc"], abs=0.01)


def test_detection_summary_drops_only_collinear_points():
    # Small curve: nothing to subsample, straight runs collapse to their corners exactly.
    s = np.array([6, 5, 4, 3, 2, 1], dtype=float)
    y = np.array([1, 1, 1, 0, 0, 0])
    roc = detection_summary(s, y)["roc"]
    assert roc == {"fpr": [0.0, 0.0, 1.0], "tpr": [0.0, 1.0, 1.0]}
