"""Robust skewness and outlyingness of a 1-D sample, for ASSET's choice of the rows to push away.

``medcouple(x)`` (Brys, Hubert, Struyf, "A Robust Measure of Skewness", JCGS 2004): with ``m`` the
median of ``x`` (the mean of the two middle values for even ``n``) and, for every pair of a value
above and one below it, ``x_i >= m >= x_j``,

    h(x_i, x_j) = ((x_i - m) - (m - x_j)) / (x_i - x_j),        MC = median over all pairs of h.

For ``k`` values tied at ``m`` (``x_i = x_j = m``, ``0/0``) the kernel is, indexing the tied values as
above the median ``a = 0..k-1`` and below ``b = 0..k-1``, ``h = sign(a + b - (k - 1))`` (-1, 0 or +1):
statsmodels' exact ``medcouple(x, use_fast=False)`` (its O(n^2) algorithm, the one statsmodels
versions of 2023 ran by default, as ASSET's notebook did).  MC is in ``[-1, 1]``: positive for a
right-skewed sample.  O(n^2) memory: meant for a batch (ASSET's 512 rows: 256 x 256 pairs).

``adjusted_outlyingness(x)``: ASSET's notebook's formula (new_poi_util.py), the adjusted-boxplot
fences (Hubert and Vandervieren 2008) with ``q1``, ``q3`` the quartiles, ``iqr = q3 - q1``:

    MC > 0:   w1 = q1 - 1.5 e^{-4 MC} iqr,   w2 = q3 + 1.5 e^{3 MC} iqr
    MC <= 0:  w1 = q1 - 1.5 e^{-3 MC} iqr,   w2 = q3 + 1.5 e^{4 MC} iqr
    AO_i = (x_i - med) / (w2 - med)   if x_i > med,   (med - x_i) / (med - w1)   otherwise,

where ``med`` is ``torch.median`` (the *lower* middle value for even ``n``, as the notebook) and the
quartiles ``torch.quantile`` (linear interpolation).  Everything is computed in float64 (the notebook
takes the quartiles in the input's float32).  A fence equal to the median (a sample with ``iqr = 0``)
divides by zero as in the notebook: ``inf`` for a row beyond it, NaN for a row at it.
"""
from __future__ import annotations

import math

import torch

from memdisc.checks import describe

__all__ = ["medcouple", "adjusted_outlyingness"]


def _check_sample(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.numel() == 0 or not x.is_floating_point():
        raise ValueError(f"x: expected a non-empty 1-D float tensor, got {describe(x)}")
    return x.detach().double()


def _median_mean(values: torch.Tensor) -> torch.Tensor:
    """The median of a 1-D tensor as numpy takes it: the mean of the two middle values for an even count."""
    s = torch.sort(values).values
    n = s.numel()
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def medcouple(x: torch.Tensor) -> torch.Tensor:
    """The medcouple of ``x [n]`` (module docstring): a float64 scalar tensor in ``[-1, 1]``.

    Raises:
        ValueError: naming ``x`` (not a non-empty 1-D float tensor).
    """
    v = torch.sort(_check_sample(x)).values
    z = v - _median_mean(v)
    upper, lower = z[z >= 0], z[z <= 0]  # ascending: the ties at 0 are upper's first, lower's last k
    h = (upper[:, None] + lower[None, :]) / (upper[:, None] - lower[None, :])
    k = int((z == 0).sum())
    if k:
        a = torch.arange(k, device=z.device)
        h[:k, lower.numel() - k:] = torch.sign(a[:, None] + a[None, :] - (k - 1)).double()
    return _median_mean(h.flatten())


def adjusted_outlyingness(x: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 adjusted outlyingness of each value of ``x [n]`` (module docstring, the notebook's formula).

    Raises:
        ValueError: naming ``x`` (not a non-empty 1-D float tensor).
    """
    v = _check_sample(x)
    med = torch.median(v)
    q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=v.dtype, device=v.device))
    mc, iqr = float(medcouple(v)), q3 - q1
    low, high = (-4, 3) if mc > 0 else (-3, 4)
    w1 = q1 - 1.5 * math.exp(low * mc) * iqr
    w2 = q3 + 1.5 * math.exp(high * mc) * iqr
    return torch.where(v > med, (v - med) / (w2 - med), (med - v) / (med - w1))
