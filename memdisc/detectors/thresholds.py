"""Threshold rules on a whole set's suspicion scores: which rows a detector flags.

Both rules fit a Gaussian to the *lower half* of the scores (the rows at or below the median,
taken as the lower order statistic: ``np.quantile(s, 0.5, method="lower")``, as ASSET's notebook
``get_t``), on the view that at least half of a training set is clean, and put the threshold
far in that Gaussian's upper tail.  With ``L = {s_i : s_i <= median}``, ``mu = mean(L)`` and
``sigma`` the population standard deviation of ``L`` (``correction=0``):

* :func:`tail_threshold` (every detector's default rule, :meth:`Detector.flag`):
  ``t = mu + sigma * sqrt(-2 ln eps)``, the point where the fitted density falls to ``eps`` of its
  peak (``exp(-(t - mu)^2 / (2 sigma^2)) = eps``); scale-free: ``t(a s + b) = a t(s) + b`` for
  ``a > 0``.
* :func:`asset_threshold` (ASSET's own rule): the notebook's ``get_t`` exactly.

The lower half of clean scores ``N(m, s^2)`` has mean ``m - 0.798 s`` and standard deviation
``0.603 s`` (a half-normal), so the default rule puts ``t`` near ``m + 2.37 s`` for eps 1e-6: it flags
about 0.9 % of Gaussian clean scores, and more where their upper tail is heavier than the lower.

A row is flagged when ``score >= t`` (compared in float64).
"""
from __future__ import annotations

import math

import torch

from memdisc.checks import describe
from memdisc.config import check_number

__all__ = ["check_scores", "lower_half", "tail_threshold", "asset_threshold", "GMM_REG_COVAR"]

GMM_REG_COVAR = 1e-6
"""scikit-learn's ``GaussianMixture(reg_covar=1e-6)`` default: added to the fitted variance."""


def check_scores(scores, y=None) -> None:
    """``scores`` a non-empty ``[N]`` floating tensor of finite values; ``y``, when given, int64 ``[N]``
    labels on the same device.

    Raises:
        ValueError: naming ``scores`` or ``y``.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not scores.is_floating_point() \
            or scores.numel() == 0:
        raise ValueError(f"scores: expected a non-empty [N] float tensor (a detector's scores), got {describe(scores)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores: expected finite values, got {int((~torch.isfinite(scores)).sum())} NaN or Inf")
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape != scores.shape or y.dtype != torch.int64
                          or y.device != scores.device):
        raise ValueError(f"y: expected the int64 [{scores.shape[0]}] labels of the scored rows on {scores.device}, "
                         f"got {describe(y)}")


def lower_half(scores: torch.Tensor) -> torch.Tensor:
    """The scores at or below their lower median, float64 ``[M]`` (``M >= N / 2``): ``s[s <= q]`` with
    ``q = np.quantile(s, 0.5, method="lower")``, the ``floor((N - 1) / 2)``-th smallest score."""
    check_scores(scores)
    s = scores.detach().double()
    return s[s <= torch.quantile(s, 0.5, interpolation="lower")]


def _check_eps(eps) -> None:
    check_number("eps", eps, 0.0, 1.0, strict=True)


def tail_threshold(scores: torch.Tensor, eps: float = 1e-6) -> float:
    """The default flag threshold of ``scores [N]``: ``t = mu + sigma * sqrt(-2 ln eps)`` with ``mu``,
    ``sigma`` the mean and population standard deviation of :func:`lower_half` (module docstring);
    ``eps`` in (0, 1): the fitted density at ``t`` is ``eps`` times its peak.

    Where the lower half is one value (``sigma = 0``, a point mass) ``t`` is the next float64 above it,
    so every higher score and none of the lower half is flagged.

    Raises:
        ValueError: naming ``scores`` or ``eps``.
    """
    _check_eps(eps)
    low = lower_half(scores)
    mu, sigma = low.mean(), low.std(correction=0)
    if sigma == 0:
        return float(torch.nextafter(mu, torch.tensor(math.inf, dtype=mu.dtype)))
    return float(mu + sigma * math.sqrt(-2 * math.log(eps)))


def asset_threshold(scores: torch.Tensor, eps: float = 1e-6) -> float:
    """ASSET's flag threshold, the notebook's ``get_t(scores, 1e-6)`` exactly (new_poi_util.py):

        t = (sigma * sqrt(-2 ln(eps) * sigma * sqrt(2 pi)) + mu) / w

    where ``mu``, ``sigma^2``, ``w`` are the mean, variance and weight of a one-component
    ``sklearn.mixture.GaussianMixture`` fitted to :func:`lower_half`: ``mu`` the mean, ``sigma^2``
    the population variance plus ``reg_covar`` (:data:`GMM_REG_COVAR`, 1e-6), ``w = 1``.

    Its algebra is not the density-level formula: the point where the fitted density equals
    ``eps`` is ``mu + sigma * sqrt(-2 ln(eps * sigma * sqrt(2 pi)))``, and the peak-relative one
    :func:`tail_threshold`; here ``sigma * sqrt(2 pi)`` multiplies ``-2 ln eps`` outside the log.
    So it is not scale invariant: scaling the scores by ``a`` moves ``t - mu`` by about ``a^1.5``
    (``sigma^1.5`` dependence), and the fraction flagged depends on the loss's units.

    Raises:
        ValueError: naming ``scores`` or ``eps``.
    """
    _check_eps(eps)
    low = lower_half(scores)
    mu, sigma, weight = low.mean(), torch.sqrt(low.var(correction=0) + GMM_REG_COVAR), 1.0
    return float((sigma * torch.sqrt(-2 * math.log(eps) * sigma * math.sqrt(2 * math.pi)) + mu) / weight)
