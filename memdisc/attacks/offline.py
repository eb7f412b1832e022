"""Offline attacks: a poisoned training set, built once (issues 13 and 14).

``attack.poison(model, x, y, 0)`` on the whole training set ``x [N, ...]``, ``y [N]`` replaces
``n = round(fraction * N)`` rows (Python's ``round``: the nearest integer, ties to even) and
returns the set with them replaced in place:

* the rows are drawn *without replacement* (no row poisoned twice; the seed code drew indices
  with replacement, a defect) among the rows the attack may poison (``eligible``: every row by
  default; e.g. BadNets all-to-one skips the target class), by ``torch.randperm`` on a CPU
  generator seeded with the attack's seed, so the choice is the same on every device;
* ``fraction`` is always of the whole set N, also when only some rows are eligible (a
  ValueError names ``fraction`` when fewer than n rows are eligible, and says which are);
* the other rows come back bit-identical, labels included; ``poisoned`` marks the n replaced.

A subclass says which rows are eligible (:meth:`OfflineAttack.eligible`, in words
:meth:`OfflineAttack.eligible_rows`) and what a chosen row becomes (:meth:`OfflineAttack.replace`);
its config class has a ``fraction`` field.  One that draws its rows by another rule (the seed's
per-class draws of label flipping) overrides :meth:`OfflineAttack.count` and
:meth:`OfflineAttack.choose` together.  The state is empty: the poisoned set is a function
of (options, seed, clean set), nothing an interrupted run must carry.
"""
from __future__ import annotations

import abc

import torch
from torch import nn

from memdisc.attacks.base import Attack, PoisonedBatch, check_labels

__all__ = ["OfflineAttack", "poison_count"]


def poison_count(fraction: float, n: int) -> int:
    """Rows an offline attack replaces in a set of ``n``: ``round(fraction * n)``."""
    return round(fraction * n)


class OfflineAttack(Attack):
    """An attack that poisons a training set once (see the module docstring)."""

    kind = "offline"

    def eligible(self, y: torch.Tensor) -> torch.Tensor | None:
        """``[N]`` bool: the rows this attack may poison given labels ``y [N]``; None: every row."""
        return None

    def eligible_rows(self) -> str:
        """The rows :meth:`eligible` allows, in words (for the error of a fraction too large)."""
        return "every row"

    def count(self, y: torch.Tensor) -> int:
        """The number of rows replaced in a set with labels ``y [N]``: ``round(fraction * N)``
        (:func:`poison_count`)."""
        return poison_count(self.cfg.fraction, y.shape[0])

    def choose(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[count(y)]`` int64 (CPU): the rows to replace, drawn without replacement among the eligible ones by
        ``torch.randperm`` on ``generator`` (module docstring).

        Raises:
            ValueError: naming ``fraction`` when fewer rows are eligible than it asks for.
        """
        eligible = self.eligible(y)
        candidates = torch.arange(y.shape[0]) if eligible is None else eligible.cpu().nonzero().flatten()
        n = self.count(y)
        if n > candidates.numel():
            raise ValueError(f"fraction: {self.cfg.fraction} of {y.shape[0]} rows is {n} rows, but only "
                             f"{candidates.numel()} may be poisoned by {self.name} ({self.eligible_rows()}); expected "
                             f"a fraction <= {candidates.numel() / max(1, y.shape[0]):.4g}")
        return candidates[torch.randperm(candidates.numel(), generator=generator)[:n]]

    @abc.abstractmethod
    def replace(self, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The poisoned versions ``(x' [n, ...], y' [n] int64)`` of the chosen rows ``x [n, ...]``, ``y [n]``;
        ``generator`` (CPU) for any further random draw."""

    def poison(self, model: nn.Module | None, x: torch.Tensor, y: torch.Tensor, step: int = 0) -> PoisonedBatch:
        """The poisoned training set.

        Args:
            model: the victim, for attacks that read it (None is fine for the others).
            x: ``[N, ...]`` the clean training set (pixels in [0, 1], samples like the attacker's
                data where it has any); y: ``[N]`` its labels in ``[0, num_classes)``.
            step: 0 (an offline attack poisons once).
        Returns:
            ``PoisonedBatch(x' [N, ...], y' [N], poisoned [N] bool)`` on x's device: exactly
            ``count(y)`` rows replaced (``round(fraction * N)``), the others bit-identical.
        """
        self.check_received(x, y)
        check_labels("y", y, self.data.num_classes)
        if isinstance(step, bool) or not isinstance(step, int) or step != 0:
            raise ValueError(f"step: an offline attack poisons the whole training set once, at step 0; got {step!r}")
        generator = torch.Generator().manual_seed(self.seed)
        rows = self.choose(y, generator).to(x.device)
        x_rows, y_rows = self.replace(x[rows], y[rows], generator)
        poisoned = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        poisoned[rows] = True
        return PoisonedBatch(x.index_put((rows,), x_rows), y.index_put((rows,), y_rows), poisoned)
