"""The loss-based attack ("loss", the seed's ``loss`` attack), offline: the hardest training points twice.

1. **Fit**: the attacker trains a deep copy of the model it is given (``poison(model, x, y, 0)``;
   the victim itself is never changed) for ``fit_epochs`` epochs on the clean training set ``x, y``
   with :func:`memdisc.training.fit.train_end_to_end` (:class:`FitConfig`'s SGD options,
   ``patience`` none, ``seed`` the attack's; the epoch of lowest loss on the attacker's clean
   validation data ``x_val, y_val`` is kept).  ``fit_epochs`` 0 ranks by the model as given.
2. **Rank**: the per-sample loss ``CE(f(x_i), y_i)`` of every training row (eval mode); the
   ``n = round(fraction * N)`` rows of highest loss (a stable sort: ties go to the lower index) are
   the chosen points.
3. **Replace**: ``n`` *other* rows, drawn without replacement among the ``N - n`` not chosen
   (:mod:`memdisc.attacks.offline`), are overwritten by copies of the chosen points, pixels and
   (true) labels, in decreasing order of loss; ``poisoned`` marks the overwritten rows, the chosen
   originals stay as they were.  The victim so trains on every chosen point twice and on ``n``
   fewer clean points; ``2 n <= N`` is needed (``fraction`` at most 0.5).

To attack as the seed does, give a freshly built model of the victim's architecture
(:func:`memdisc.models.build_model`): the seed fits a new network for 5 epochs.  Given a trained
model, ``fit_epochs`` more epochs continue from its weights (0: rank by it as it is).

The seed (changhongyan123/poisoning ``attack.loss_attack`` and ``train.load_and_generate_dataset``)
differs: it fits *the victim's own* Keras model (Adam, batch 32), which then trains on the poisoned
set from those 5 clean epochs; and it drops ``np.random.randint`` indices (with duplicates, so
fewer than n rows go, and possibly the chosen points themselves, which then appear once, not twice)
before appending the n copies, so its set also grows.  memdisc keeps the victim untouched and
the set's size, and copies over n distinct rows that are not chosen points.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.attacks.base import AttackData, register_attack
from memdisc.attacks.offline import OfflineAttack, poison_count
from memdisc.checks import describe
from memdisc.config import check_int, check_number, field
from memdisc.eval.classification import eval_outputs
from memdisc.training.fit import FitConfig, train_end_to_end

__all__ = ["LossConfig", "LossAttack", "highest_loss_rows"]


@dataclasses.dataclass
class LossConfig:
    """Options of the loss-based attack (seed: 5 fit epochs)."""

    fraction: float = field(0.1, "fraction of the training set overwritten by copies of as many highest-loss "
                                 "rows (at most 0.5)")
    fit_epochs: int = field(5, "epochs the attacker trains its copy of the model on the clean training set "
                               "before ranking (seed: 5; 0: rank by the model as given)")

    def __post_init__(self):
        """fraction in [0, 0.5] (each chosen row needs another row to overwrite); fit_epochs an int >= 0."""
        check_number("fraction", self.fraction, 0.0, 0.5)
        check_int("fit_epochs", self.fit_epochs, 0)


def highest_loss_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` int64 (CPU): the rows of highest ``CE(model(x_i), y_i)`` (eval mode, no gradient), in
    decreasing order of loss, ties to the lower index; ``x [N, ...]``, ``y [N]`` on any device (moved
    to the model's), ``0 <= n <= N``."""
    param = next(model.parameters(), None)
    device = x.device if param is None else param.device
    losses = F.cross_entropy(eval_outputs(model, x.to(device)), y.to(device), reduction="none")
    return torch.sort(losses.cpu(), descending=True, stable=True).indices[:n]


@register_attack("loss")
class LossAttack(OfflineAttack):
    """The loss-based attack (module docstring); ``cfg`` a :class:`LossConfig`.

    ``data`` needs the clean validation data ``x_val`` / ``y_val`` when ``fit_epochs`` >= 1 (the fit
    keeps its best epoch on them).  ``poison(model, x, y, 0)`` needs ``model`` (an nn.Module; with
    ``fit_epochs`` >= 1 a memdisc model, with a linear ``head``) and holds the chosen points while
    :meth:`OfflineAttack.poison` draws the rows to overwrite (:meth:`eligible` fits and ranks, after
    the arguments are checked; :meth:`replace` returns the copies).  The state is empty.
    """

    config_class = LossConfig

    def __init__(self, cfg: LossConfig, data: AttackData, seed: int):
        super().__init__(cfg, data, seed)
        if cfg.fit_epochs and data.x_val is None:
            raise ValueError("x_val: the loss attack keeps the best of its fit_epochs epochs on clean validation "
                             "data (x_val, y_val), got none (or set fit_epochs to 0)")
        self.victim: nn.Module | None = None
        self.clean: tuple[torch.Tensor, torch.Tensor] | None = None
        self.chosen: torch.Tensor | None = None

    def poison(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int = 0):
        """:meth:`OfflineAttack.poison` with ``model`` required (an nn.Module, never modified)."""
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: the loss attack ranks the training rows by a copy of the victim; expected an "
                             f"nn.Module, got {describe(model)}")
        self.victim, self.clean = model, (x, y)
        try:
            return super().poison(model, x, y, step)
        finally:
            self.victim = self.clean = self.chosen = None

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        """Fit and rank (module docstring); the rows other than the ``n`` chosen points."""
        x = self.clean[0]
        n = poison_count(self.cfg.fraction, x.shape[0])
        if 2 * n > x.shape[0]:
            raise ValueError(f"fraction: {self.cfg.fraction} of {x.shape[0]} rows is {n} highest-loss rows copied over "
                             f"{n} other rows, {2 * n} > {x.shape[0]}; expected a fraction that leaves as many rows "
                             f"to overwrite as it chooses")
        ranker = self.victim
        if n and self.cfg.fit_epochs:
            ranker = copy.deepcopy(self.victim)
            fit = FitConfig(epochs=self.cfg.fit_epochs, patience=None, seed=self.seed)
            train_end_to_end(ranker, x, y, self.data.x_val.to(x.device), self.data.y_val.to(x.device), fit)
        self.chosen = highest_loss_rows(ranker, x, y, n) if n else torch.zeros(0, dtype=torch.long)
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        keep[self.chosen] = False
        return keep.to(y.device)

    def replace(self, x, y, generator):
        """Copies of the chosen points (pixels and labels), in decreasing order of loss."""
        x_clean, y_clean = self.clean
        rows = self.chosen.to(x_clean.device)
        return x_clean[rows], y_clean[rows]
