"""The linear probe: how linearly separable a model's penultimate features are.

``penultimate_features(model, x)`` is ``model.features(x)`` (every memdisc model has it:
:mod:`memdisc.models`) in eval mode; ``linear_probe_accuracy`` fits a multinomial logistic
regression (scikit-learn's ``LogisticRegression``, L2 penalty ``C = 1``, lbfgs) on standardised
training features and returns its test accuracy:

    z' = (z - mean(z_train)) / std(z_train)        per feature, the training set's statistics
    accuracy = #{i : argmax_k (W z'_i + b)_k = y_i} / N_test

The seed (changhongyan123/poisoning ``model_evaluation.py``) fits ``LogisticRegression()`` with
scikit-learn's defaults (in its day, before 0.22: liblinear, one-vs-rest, 100 iterations) on
``model.layers[-1].output``, the *softmax output* of the network (its ``preds`` layer, C values),
taken with Keras' learning phase set to training, unscaled, and prints a ``classification_report``.
memdisc departs on purpose: the probe reads the penultimate features (the input of the head, what
a poisoned representation changes; the softmax output is the classifier's own decision, which a
linear probe can only re-read), in eval mode (deterministic), standardised (the L2 penalty then
treats every feature alike, and lbfgs converges), multinomial, with ``max_iter`` iterations (100
often stop before convergence), and returns the accuracy (per-class numbers of the network itself:
:func:`memdisc.eval.classification.per_class_accuracy`).  The seed fits the probe on the clean
training set's features; which set ``z_train`` holds is the caller's choice.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from memdisc.checks import describe
from memdisc.config import check_int, check_seed
from memdisc.eval.classification import eval_outputs

__all__ = ["penultimate_features", "linear_probe_accuracy"]


def penultimate_features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """``[N, D]`` float ``model.features(x)`` on the CPU, in eval mode (restored afterwards), no gradient;
    x ``[N, C, H, W]`` in [0, 1] on the model's device, ``batch_size`` rows at a time.

    Raises:
        ValueError: naming ``model`` (no ``features`` method), ``x`` or ``batch_size``.
    """
    if not callable(getattr(model, "features", None)):
        raise ValueError(f"model: expected a memdisc model with features(x) (memdisc.models), got {describe(model)}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating [N, ...] tensor of pixels in [0, 1], got {describe(x)}")
    return eval_outputs(model, x, batch_size, output=lambda batch: model.features(batch).cpu())


def _as_arrays(name_z: str, z, name_y: str, y) -> tuple[np.ndarray, np.ndarray]:
    """``(z [N, D] float64, y [N] int64)`` as numpy arrays, from tensors of those shapes (N >= 1, finite)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point() or z.shape[0] == 0:
        raise ValueError(f"{name_z}: expected a floating [N, D] tensor of features with N >= 1, got {describe(z)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name_z}: the features contain NaN or Inf values")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (z.shape[0],):
        raise ValueError(f"{name_y}: expected an int64 [{z.shape[0]}] tensor of class indices (one per row of "
                         f"{name_z}), got {describe(y)}")
    return z.detach().cpu().double().numpy(), y.cpu().numpy()


def linear_probe_accuracy(z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor,
                          y_test: torch.Tensor, *, seed: int = 0, max_iter: int = 1000) -> float:
    """The test accuracy of a logistic regression fitted on standardised features (module docstring).

    Args:
        z_train: ``[N, D]`` float features (e.g. :func:`penultimate_features`), y_train: ``[N]`` int64 labels,
            at least two classes.  z_test, y_test: ``[M, D]``, ``[M]`` the same for the test set (M >= 1).
        seed: an int in [0, 2**32), the regression's ``random_state`` (lbfgs itself draws nothing: the result is a
            function of the data).
        max_iter: an int >= 1, lbfgs iterations at most (scikit-learn warns when they do not suffice).
    Returns:
        ``#{i : prediction_i = y_test_i} / M``.
    Raises:
        ValueError: naming the argument.
    """
    z_tr, y_tr = _as_arrays("z_train", z_train, "y_train", y_train)
    z_te, y_te = _as_arrays("z_test", z_test, "y_test", y_test)
    if z_te.shape[1] != z_tr.shape[1]:
        raise ValueError(f"z_test: expected {z_tr.shape[1]} features per row (as z_train), got {z_te.shape[1]}")
    if len(np.unique(y_tr)) < 2:
        raise ValueError(f"y_train: expected at least two classes to separate, got only class {int(y_tr[0])}")
    check_seed("seed", seed)
    check_int("max_iter", max_iter)
    scaler = StandardScaler().fit(z_tr)
    probe = LogisticRegression(max_iter=max_iter, random_state=seed).fit(scaler.transform(z_tr), y_tr)
    return float((probe.predict(scaler.transform(z_te)) == y_te).mean())
