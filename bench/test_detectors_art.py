"""Tests of bench/bench_detectors_art.py: its measures, ART's rules as the bench applies them, and that ART
reads exactly the features it is given.

    OMP_NUM_THREADS=1 PYTHONPATH=. /work/venv-art/bin/python -m pytest -q bench/test_detectors_art.py

The tests that call ART skip where it is not installed (``pip install adversarial-robustness-toolbox``).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_detectors_art as bench  # noqa: E402

from memdisc.detectors import DETECTORS  # noqa: E402
from memdisc.eval.detection import auroc  # noqa: E402


def test_flag_measures_by_hand():
    flags = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    poisoned = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    m = bench.flag_measures(flags, poisoned)  # 2 of 3 poisoned flagged, 1 of 5 clean
    assert m == {"flagged": 3, "tpr": pytest.approx(2 / 3), "fpr": pytest.approx(1 / 5),
                 "balanced_accuracy": pytest.approx((2 / 3 + 4 / 5) / 2)}


def test_balanced_accuracy_is_the_auroc_of_the_flags():
    gen = np.random.default_rng(0)
    flags, poisoned = gen.random(200) < 0.3, gen.random(200) < 0.2
    assert bench.flag_measures(flags, poisoned)["balanced_accuracy"] == pytest.approx(
        auroc(flags.astype(float), poisoned.astype(float)))


def test_jaccard_by_hand():
    a = np.array([1, 1, 0, 1, 0], dtype=bool)
    b = np.array([0, 1, 1, 1, 0], dtype=bool)
    assert bench.jaccard(a, b) == pytest.approx(2 / 4)
    assert bench.jaccard(np.zeros(3, dtype=bool), np.zeros(3, dtype=bool)) == 1.0


def test_relative_size_rounds_shares_as_art():
    """A share below 0.35 that rounds to 0.35 (139 / 400 = 0.3475) is not suspicious for ART; 0.30 is."""
    assert bench.relative_size(np.array([1] * 139 + [0] * 261)).tolist() == []
    assert bench.relative_size(np.array([1] * 6 + [0] * 14)).tolist() == [1]
    assert bench.relative_size(np.array([0] * 7 + [1] * 13)).tolist() == []
    assert bench.smaller(np.array([1, 0, 0, 1, 1])).tolist() == [0]


def _features(n: int = 300, dims: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, dims, generator=gen), torch.arange(n) % 3


@pytest.fixture
def art():
    pytest.importorskip("art")
    return bench.import_art()


def test_art_reads_exactly_the_features(art):
    F, y = _features()
    head = nn.Linear(F.shape[1], 3)
    classifier = art.PyTorchClassifier(bench.Penultimate(head), loss=nn.CrossEntropyLoss(), input_shape=(16,),
                                       nb_classes=3, device_type="cpu")
    layer = len(classifier.layer_names) - 1
    assert classifier.layer_names[layer] == "features"
    assert np.array_equal(classifier.get_activations(F.numpy(), layer=layer, batch_size=64), F.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(classifier.predict(F.numpy()), head(F).numpy(), rtol=1e-6, atol=1e-6)


def test_cluster_flags_map_rows_as_detect_poison(art):
    F, y = _features(seed=1)
    x, labels = F.numpy(), y.numpy()
    classifier = art.PyTorchClassifier(bench.Penultimate(nn.Linear(16, 3)), loss=nn.CrossEntropyLoss(),
                                       input_shape=(16,), nb_classes=3, device_type="cpu")
    np.random.seed(0)
    defence = art.ActivationDefence(classifier, x, labels)
    _, is_clean = defence.detect_poison(nb_dims=4)
    flags = bench.cluster_flags(art, defence.clusters_by_class, labels, 3, bench.smaller)
    assert flags.any() and np.array_equal(flags, np.asarray(is_clean) == 0)


def test_art_spectral_projects_uncentred_features(art):
    """ART's score is ``|<f, v>|`` with the features uncentred (``v`` from the centred SVD, computed here with
    torch); where the class mean lies along ``v`` opposite to the poisons, that ranks the poisons last, while
    the centred square (Tran et al., memdisc) ranks them first."""
    gen = torch.Generator().manual_seed(2)
    clean = torch.randn(90, 8, generator=gen, dtype=torch.float64) * 0.3
    clean[:, 0] -= 9.0
    poisons = torch.randn(10, 8, generator=gen, dtype=torch.float64) * 0.3
    F, y = torch.cat([clean, poisons]), torch.zeros(100, dtype=torch.long)
    poisoned = np.r_[np.zeros(90), np.ones(10)]
    v = torch.linalg.svd(F - F.mean(0), full_matrices=False).Vh[0]
    art_scores = bench.art_spectral_scores(art, F.numpy(), y.numpy())
    np.testing.assert_allclose(art_scores, (F @ v).abs().numpy(), rtol=1e-9)
    assert auroc(art_scores, poisoned) < 0.05
    memdisc_scores = DETECTORS["spectral"](None).score(bench.Penultimate(nn.Identity()), F, y)
    assert auroc(memdisc_scores, poisoned) > 0.95


def test_art_spectral_ranking_checks_the_report(art):
    F, y = _features(seed=3)
    x, labels = F.numpy(), y.numpy()
    classifier = art.PyTorchClassifier(bench.Penultimate(nn.Linear(16, 3)), loss=nn.CrossEntropyLoss(),
                                       input_shape=(16,), nb_classes=3, device_type="cpu")
    options = {"expected_pp_poison": 0.1, "eps_multiplier": 1.5}
    report, is_clean = art.SpectralSignatureDefense(classifier, x, labels, **options).detect_poison()
    flags = np.asarray(is_clean) == 0
    scores = bench.art_spectral_ranking(art, x, labels, report, flags, options)
    assert flags.sum() == len(report) > 0
    for c in range(3):  # within a class, every flagged row scores at least as high as every other
        assert scores[flags & (labels == c)].min() >= scores[~flags & (labels == c)].max()
    flags[np.flatnonzero(~flags)[0]] = True  # a flag the report does not hold
    with pytest.raises(RuntimeError, match="quantile cut"):
        bench.art_spectral_ranking(art, x, labels, report, flags, options)
