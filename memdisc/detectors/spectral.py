"""Spectral signatures (Tran, Li, Madry, NeurIPS 2018): "spectral".

Per class ``c`` (by the labels given), over the rows of the scored set with that label: the
penultimate features ``f_i`` (``model.features``, eval mode), centred on the class mean, and the top
right singular vector ``v_c`` of that centred ``[n_c, D]`` matrix; the score is the squared projection

    score_i = <f_i - mean_c, v_c>^2.

So the statistics are those of the set scored (score the whole training set at once); a class with
one row scores 0.

Flag rule (the paper's): per class, the rows at or above the ``1 - 1.5 * expected_fraction`` quantile
of the class's scores (linear interpolation), about ``1.5 * expected_fraction * n_c`` rows (every row
once ``1.5 * expected_fraction >= 1``).  ``expected_fraction`` is the paper's epsilon, the fraction of
a class's rows the defender expects poisoned; default 0.1, the larger of Tran et al.'s two settings
(5 % and 10 % of the target class), so 15 % of each class is flagged.  It is a prior, not learned:
an all-to-one backdoor at 5 % of a 10-class set makes about a third of the target class poisoned
(0.05 / (0.1 * 0.95 + 0.05)), which needs ``expected_fraction`` about 0.33 to flag them all.

IBM ART's ``SpectralSignatureDefense(expected_pp_poison=0.33, eps_multiplier=1.5)`` maps as
``expected_fraction = expected_pp_poison`` with the multiplier fixed at the paper's 1.5, and the same
per-class cut (``np.quantile(score, max(1 - eps_multiplier * expected_pp_poison, 0))``, flag
``score >= cutoff``).  Its default 0.33 is the all-to-one case above (about half of every class
flagged); ART scores ``|<f_i, v_c>|`` on the *uncentred* features (its ``spectral_signature_scores``),
memdisc the paper's centred square, which orders rows differently when the class mean has a component
along ``v_c``.
"""
from __future__ import annotations

import torch
from torch import nn

from memdisc.config import check_number
from memdisc.detectors.base import Detector, register_detector
from memdisc.detectors.model_outputs import check_labelled, features_of
from memdisc.detectors.thresholds import check_scores

__all__ = ["SpectralDetector", "spectral_signature", "REMOVAL_MULTIPLIER"]

REMOVAL_MULTIPLIER = 1.5
"""Tran et al. flag ``1.5 * epsilon`` of a class's rows (epsilon: the expected poisoned fraction)."""


def spectral_signature(features: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 ``<f_i - mean, v>^2`` for the rows of ``features [n, D]``, ``v`` the top right singular
    vector of the centred matrix (its sign does not matter); zeros for a single row."""
    centred = features.double() - features.double().mean(0)
    v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    return (centred @ v) ** 2


@register_detector("spectral")
class SpectralDetector(Detector):
    """Spectral signatures per class (module docstring); nothing to fit.

    Args:
        snapshots: None or a SnapshotSet (unused).
        expected_fraction: in (0, 1), the fraction of a class's rows expected poisoned (Tran et al.'s
            epsilon); :meth:`flag` marks ``1.5 *`` that of each class.
    """

    def __init__(self, snapshots=None, *, expected_fraction: float = 0.1):
        self.check_snapshots(snapshots)
        check_number("expected_fraction", expected_fraction, 0.0, 1.0, strict=True)
        self.expected_fraction = float(expected_fraction)

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` float32 spectral scores of the rows of ``x [N, ...]``, per class of ``y [N]`` (int64 labels),
        the class statistics over these rows; the model in eval mode (restored after), no grad.

        Raises:
            ValueError: naming ``x`` or ``y``.
        """
        check_labelled(x, y)
        features = features_of(model, x)
        labels = y.cpu()
        scores = torch.zeros(x.shape[0], dtype=torch.float64)
        for c in torch.unique(labels):
            rows = labels == c
            scores[rows] = spectral_signature(features[rows])
        return scores.float().to(x.device)

    def flag(self, scores: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` bool: per class of ``y``, ``scores >= q_c``, ``q_c`` the ``max(0, 1 - 1.5 * expected_fraction)``
        quantile of the class's scores (linear interpolation, as ``np.quantile``).

        Raises:
            ValueError: naming ``scores`` or ``y`` (needed: the rule is per class).
        """
        if y is None:
            raise ValueError("y: spectral flags per class; give the labels of the scored rows")
        check_scores(scores, y)
        level = max(0.0, 1.0 - REMOVAL_MULTIPLIER * self.expected_fraction)
        s = scores.double()
        flags = torch.zeros_like(s, dtype=torch.bool)
        for c in torch.unique(y):
            rows = y == c
            flags[rows] = s[rows] >= torch.quantile(s[rows], level)
        return flags
