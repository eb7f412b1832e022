"""Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
Activation Clustering", 2018): "activation-clustering".

Per class ``c`` (by the labels given), over the rows of the scored set with that label (so the
statistics are those of the set scored: score the whole training set at once):

1. the penultimate features ``f_i`` (``model.features``, eval mode), reduced to ``components``
   dimensions by independent component analysis (scikit-learn ``FastICA(max_iter=1000, tol=0.005,
   whiten="unit-variance")``, seeded; Chen et al. use ICA, and these are IBM ART's settings); when the
   features have at most ``components`` dimensions, or the class at most ``components`` rows, they are
   clustered as they are (ART skips the reduction in the first case too);
2. 2-means on them (scikit-learn ``KMeans(n_clusters=2, n_init=10)``, seeded), centroids ``m_0, m_1``;
   each row belongs to its nearer centroid (ties to cluster 0), the smaller cluster ``S`` (ties to
   cluster 1) has the relative size ``r_c = |S| / n_c``, the other is ``L``;
3. with ``d_S``, ``d_L`` a row's Euclidean distances to the two centroids in the reduced space, its
   *margin* ``(d_L - d_S) / (d_L + d_S)`` in ``[-1, 1]`` (0 where both are 0): positive exactly for
   the rows of ``S``, the nearer ``S``'s centroid the higher.

The continuous score is the margin, shifted down by 2 in a class whose smaller cluster is not small:

    score_i = margin_i            if r_c < size_threshold   (in [-1, 1])
    score_i = margin_i - 2        otherwise, or n_c < 2     (in [-3, -1])

so rows of a suspect class (one with a small cluster) rank above every row of the others, and within
a class the rows nearest the small cluster rank first.  :meth:`flag` is ``score > 0``, which is the
flag rule of Chen et al. / ART's ``relative-size`` analysis (default ``size_threshold`` 0.35): the
rows of the smaller cluster of every class whose smaller cluster holds less than ``size_threshold``
of the class, exactly (a row exactly equidistant from both centroids is in cluster 0 and has margin
0: unflagged; if cluster 0 is also the smaller one this is the one place the two rules can differ).
ART rounds ``r_c`` to two decimals before comparing; memdisc compares it as it is.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import FastICA
from torch import nn

from memdisc.config import check_int, check_number, check_seed
from memdisc.detectors.base import Detector, register_detector
from memdisc.detectors.model_outputs import check_labelled, features_of
from memdisc.detectors.thresholds import check_scores

__all__ = ["ActivationClusteringDetector", "cluster_margins"]


def cluster_margins(features: np.ndarray, components: int, seed: int) -> tuple[np.ndarray, float]:
    """``(margin [n] float64, r)`` of the rows of one class's ``features [n, D]`` (module docstring, steps
    1-3): each row's margin towards the smaller of two k-means clusters and that cluster's relative size
    ``r`` in ``[0, 0.5]``; for ``n < 2`` zeros and ``r = 0.5`` (nothing to split).  Columns constant over
    the class (e.g. ReLU units never active on it) are dropped first: they carry nothing to cluster on and
    FastICA's whitening divides by their zero spread."""
    n = features.shape[0]
    if n < 2:
        return np.zeros(n), 0.5
    features = features[:, features.std(axis=0) > 0]
    if features.shape[1] == 0:
        return np.zeros(n), 0.5
    reduced, dims = features, features.shape[1]
    if dims > components and n > components:
        reduced = FastICA(n_components=components, max_iter=1000, tol=0.005, whiten="unit-variance",
                          random_state=seed).fit_transform(features)
    centres = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(reduced).cluster_centers_
    dist = np.linalg.norm(reduced[:, None, :] - centres[None, :, :], axis=2)  # [n, 2]
    member = (dist[:, 1] < dist[:, 0]).astype(np.int64)  # the nearer centroid, ties to cluster 0
    sizes = np.bincount(member, minlength=2)
    small = 0 if sizes[0] < sizes[1] else 1
    d_small, d_large = dist[:, small], dist[:, 1 - small]
    total = d_small + d_large
    margin = np.divide(d_large - d_small, total, out=np.zeros(n), where=total > 0)
    return margin, sizes[small] / n


@register_detector("activation-clustering")
class ActivationClusteringDetector(Detector):
    """Activation clustering per class with a continuous score (module docstring); nothing to fit.

    Args:
        snapshots: None or a SnapshotSet (unused).
        components: an int >= 1, the ICA dimensions the features are reduced to (Chen et al. and ART: 10).
        size_threshold: in (0, 1), a class's smaller cluster is suspect when it holds less than this
            fraction of the class (ART's default 0.35).
        seed: an int in [0, 2**32), FastICA's and KMeans' ``random_state``.
    """

    def __init__(self, snapshots=None, *, components: int = 10, size_threshold: float = 0.35, seed: int = 0):
        self.check_snapshots(snapshots)
        check_int("components", components)
        check_number("size_threshold", size_threshold, 0.0, 1.0, strict=True)
        check_seed("seed", seed)
        self.components, self.size_threshold, self.seed = components, float(size_threshold), seed

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` float64 scores (module docstring) of the rows of ``x [N, ...]``, per class of ``y [N]`` (int64
        labels), the clusters found among these rows; the model in eval mode (restored after), no grad.
        (float64, so that ``score > 0`` is the cluster rule exactly, also for margins below float32's range.)

        Raises:
            ValueError: naming ``x`` or ``y``.
        """
        check_labelled(x, y)
        features = features_of(model, x).double().numpy()
        labels = y.cpu().numpy()
        scores = np.zeros(x.shape[0])
        for c in np.unique(labels):
            rows = labels == c
            margin, small_fraction = cluster_margins(features[rows], self.components, self.seed)
            scores[rows] = margin if small_fraction < self.size_threshold else margin - 2
        return torch.from_numpy(scores).to(x.device)

    def flag(self, scores: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` bool ``scores > 0``: the smaller cluster of every class whose smaller cluster holds less
        than ``size_threshold`` of it (module docstring); ``y`` unused (checked when given).

        Raises:
            ValueError: naming ``scores`` or ``y``.
        """
        check_scores(scores, y)
        return scores > 0
