"""Detection metrics for memorization discrepancy (MD) used as a poison score.

Convention everywhere: a *positive* is a poisoned sample (label 1), a negative
a clean one (label 0), and a higher score means more suspicious.  A threshold
``t`` flags every sample with ``score >= t``.  For ``n_pos`` positives and
``n_neg`` negatives,

    TPR(t) = #{i : y_i = 1, s_i >= t} / n_pos
    FPR(t) = #{i : y_i = 0, s_i >= t} / n_neg

Inputs are 1-D numpy arrays, torch tensors (any device, detached here) or
sequences; they are converted to float64 numpy arrays.  Scores must be finite,
labels binary, and both classes present.
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: Largest number of ROC points kept by :func:`detection_summary` for storage.
ROC_STORE_POINTS = 200


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """``x`` as a 1-D float64 numpy array; ValueError naming ``name`` otherwise."""
    if hasattr(x, "detach"):  # a torch tensor; torch is not imported here
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a 1-D array of numbers, got {type(x).__name__}: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    return arr


def _validate(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(scores float64 [N], labels bool [N])``."""
    s = _to_numpy(scores, "scores")
    y = _to_numpy(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(f"labels: expected the same length as scores ({s.size}), got {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores: expected finite values, got {int(np.sum(~np.isfinite(s)))} NaN/inf")
    if not np.all((y == 0) | (y == 1)):
        bad = np.unique(y[(y != 0) & (y != 1)])[:5]
        raise ValueError(f"labels: expected binary labels (0 = clean, 1 = poisoned), got values {bad.tolist()}")
    y = y == 1
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"labels: expected at least one poisoned (1) and one clean (0) sample, "
                         f"got {n_pos} poisoned and {y.size - n_pos} clean")
    return s, y


def _roc_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fps, tps, thresholds)`` with one entry per distinct score plus a leading ``(0, 0, +inf)``.

    Scores are sorted in decreasing order; tied scores fall on the same side of
    every threshold, so the counts are taken only at the last index of each run
    of equal scores.  ``fps`` and ``tps`` are int64 counts, nondecreasing.
    """
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted, dtype=np.int64)[last_of_tie]
    fps = last_of_tie.astype(np.int64) + 1 - tps
    return np.r_[0, fps], np.r_[0, tps], np.r_[np.inf, s_sorted[last_of_tie]]


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of ``scores`` [N] against binary ``labels`` [N] (1 = poisoned).

    Returns ``(fpr, tpr, thresholds)``, each float64 [K + 1] for K distinct
    scores: ``thresholds`` is ``+inf`` followed by the distinct scores in
    decreasing order, and point ``k`` is ``(FPR(t_k), TPR(t_k))`` for the rule
    ``score >= t_k``.  The curve starts at ``(0, 0)`` and ends at ``(1, 1)``;
    tied scores give a single (possibly diagonal) step.
    """
    s, y = _validate(scores, labels)
    fps, tps, thresholds = _roc_counts(s, y)
    return fps / fps[-1], tps / tps[-1], thresholds


def _trapezoid(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (trapezoid rule over :func:`roc_curve`).

    Equals the Mann-Whitney statistic with ties counted one half:

        AUROC = (1 / (n_pos n_neg)) * sum_{i: y_i=1} sum_{j: y_j=0} ([s_i > s_j] + 0.5 [s_i = s_j])

    1 = every poisoned sample scores above every clean one, 0.5 = chance.
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    return _trapezoid(fpr, tpr)


def _check_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr: expected a target false-positive rate in [0, 1], got {fpr}")
    return fpr


def _tpr_at(fpr_curve: np.ndarray, tpr_curve: np.ndarray, target: float) -> float:
    # The curve is monotone in both coordinates, so the last point with
    # FPR <= target has the highest TPR; the tolerance lets a target computed
    # in floating point (1 - 0.9 = 0.09999999999999998) still admit 1 / 10.
    k = np.searchsorted(fpr_curve, target + 1e-12, side="right") - 1
    return float(tpr_curve[k])


def tpr_at_fpr(scores: Any, labels: Any, fpr: float = 0.05) -> float:
    """Highest TPR of a threshold rule ``score >= t`` whose FPR is at most ``fpr``.

    No interpolation: only thresholds actually realisable on the data count,
    so with tied clean scores the answer may sit well below the target FPR.
    ``tpr_at_fpr(..., fpr=0)`` is the fraction of poisoned samples scoring
    strictly above every clean one.
    """
    target = _check_fpr(fpr)
    fpr_curve, tpr_curve, _ = roc_curve(scores, labels)
    return _tpr_at(fpr_curve, tpr_curve, target)


def _keep_corners(fps: np.ndarray, tps: np.ndarray) -> np.ndarray:
    """Indices of the ROC points that are not interior to a straight segment (lossless)."""
    dx1, dy1 = fps[1:-1] - fps[:-2], tps[1:-1] - tps[:-2]
    dx2, dy2 = fps[2:] - fps[1:-1], tps[2:] - tps[1:-1]
    corner = dx1 * dy2 != dy1 * dx2  # exact on integer counts
    return np.r_[0, np.flatnonzero(corner) + 1, fps.size - 1]


def detection_summary(scores: Any, labels: Any, fpr: float = 0.05,
                      max_points: int = ROC_STORE_POINTS) -> dict[str, Any]:
    """AUROC, TPR at ``fpr`` and a compact ROC curve, as plain JSON-ready values.

    Returns ``{"auroc": float, "tpr_at_fpr": float, "fpr_target": float,
    "n_pos": int, "n_neg": int, "roc": {"fpr": [float], "tpr": [float]}}``.
    AUROC and TPR come from the full curve.  The stored curve first drops points
    interior to straight segments (no change to its shape), then, if more than
    ``max_points`` remain, keeps ``max_points`` of them evenly spaced by index,
    always including ``(0, 0)`` and ``(1, 1)``.
    """
    target = _check_fpr(fpr)
    if int(max_points) < 2:
        raise ValueError(f"max_points: expected at least 2, got {max_points}")
    s, y = _validate(scores, labels)
    fps, tps, _ = _roc_counts(s, y)
    n_neg, n_pos = int(fps[-1]), int(tps[-1])
    fpr_curve, tpr_curve = fps / n_neg, tps / n_pos
    keep = _keep_corners(fps, tps)
    if keep.size > max_points:
        keep = keep[np.unique(np.round(np.linspace(0, keep.size - 1, int(max_points))).astype(np.int64))]
    return {"auroc": _trapezoid(fpr_curve, tpr_curve),
            "tpr_at_fpr": _tpr_at(fpr_curve, tpr_curve, target),
            "fpr_target": target, "n_pos": n_pos, "n_neg": n_neg,
            "roc": {"fpr": [float(v) for v in fpr_curve[keep]], "tpr": [float(v) for v in tpr_curve[keep]]}}
