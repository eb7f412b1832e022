"""Mini-batch iteration: shuffled epochs for burn-in and the online phase's batch stream.

* :func:`iterate_minibatches` -- one shuffled epoch, optionally with the standard
  random-crop + horizontal-flip augmentation, all randomness from one ``torch.Generator``.
* :class:`BatchStream` -- the online phase's incoming batches, a pure function of
  ``(seed, step)`` so that a run resumed at step k sees exactly the batches it would have.
"""
from __future__ import annotations

import itertools
import operator
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from memdisc.data.datasets import ImageDataset

__all__ = ["augment_batch", "iterate_minibatches", "BatchStream"]


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding: int | None = None,
                  flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding, then (``flip``) random horizontal flip, vectorised over the batch.

    For each sample i independently: pad by ``p`` zeros on every side, take the
    ``H x W`` window at offset ``(dy_i, dx_i)``, ``dy_i, dx_i ~ U{0..2p}``, and mirror it
    left-right with probability 1/2 (never without ``flip``):

        out[i, c, h, w] = pad_p(x)[i, c, dy_i + h, dx_i + w']   with w' = W-1-w if flipped else w

    Args:
        x: float ``[b, C, H, W]`` (any device).
        generator: CPU generator; draws, in this order, the offsets ``[2, b]`` and (with
            ``flip``) the flip coins ``[b]``, so the result is a function of the generator state alone.
        padding: ``p``; ``None`` picks 4 for images of 32 px or more a side, else 2 (28x28).

    Returns:
        a new tensor of the shape and dtype of ``x``; values stay within ``[min(x, 0), max(x, 0)]``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a floating [b, C, H, W] tensor, got {got}")
    _check_generator(generator)
    b, c, h, w = x.shape
    p = (4 if min(h, w) >= 32 else 2) if padding is None else _check_int("padding", padding, 0)
    offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator).to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [b, H]
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [b, W]
    if flip:
        coins = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        cols = torch.where(coins[:, None], cols.flip(1), cols)
    padded = F.pad(x, (p, p, p, p))  # [b, C, H+2p, W+2p], zeros outside
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def iterate_minibatches(dataset: ImageDataset, batch_size: int, generator: torch.Generator, augment: bool = False,
                        drop_last: bool = False, flip: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch of ``dataset`` as ``(x float32 [b, C, H, W] in [0, 1], y int64 [b])``.

    The order is ``torch.randperm(N, generator=generator)`` cut into batches of
    ``batch_size``; the last batch is smaller (``N mod batch_size``) unless
    ``drop_last``. With ``augment`` each batch goes through :func:`augment_batch`
    with the same generator (``flip`` passed on), so a fixed generator seed gives the same epoch.
    """
    _check_dataset(dataset)
    batch_size = _check_int("batch_size", batch_size, 1, len(dataset))
    _check_generator(generator)
    order = torch.randperm(len(dataset), generator=generator)
    stop = len(dataset) - len(dataset) % batch_size if drop_last else len(dataset)
    for start in range(0, stop, batch_size):
        x, y = dataset.batch(order[start:start + batch_size])
        yield (augment_batch(x, generator, flip=flip) if augment else x), y


class BatchStream:
    """The online phase's stream of incoming batches, addressable by step.

    Fresh mode (default): the steps are grouped in passes of
    ``P = N // batch_size`` steps; pass ``q = step // P`` uses the permutation
    ``randperm(N)`` drawn from a generator seeded with ``SeedSequence([seed, q])``,
    and step ``s`` takes its slice ``[(s mod P) * b, (s mod P + 1) * b)``. No sample
    repeats within a pass; the ``N mod b`` samples left at the end of a permutation
    are skipped in that pass only. Each step costs one gather (and one ``randperm``
    on entering a new pass), whatever its number, so resuming at step k is exact.

    ``repeat_first=True`` reproduces the seed code (shuffling off, batch 100): every
    step returns samples ``0 .. batch_size-1`` of the dataset, in order.

    ``augment=True`` passes each batch through :func:`augment_batch` (``flip`` passed
    on) with a generator seeded with ``SeedSequence([seed, 1, step])``, as the seed's
    training loader re-augments every batch it yields (the repeated one too).

    Iterating yields ``batch_at(0), batch_at(1), ...`` forever.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, repeat_first: bool = False,
                 augment: bool = False, flip: bool = True) -> None:
        _check_dataset(dataset)
        self.dataset = dataset
        self.batch_size = _check_int("batch_size", batch_size, 1, len(dataset))
        self.seed = _check_int("seed", seed, 0)
        self.repeat_first = bool(repeat_first)
        self.augment, self.flip = bool(augment), bool(flip)
        self._pass = -1  # pass whose permutation is cached in self._order
        self._order = torch.arange(len(dataset))

    @property
    def batches_per_pass(self) -> int:
        """Steps before a sample can reappear: ``N // batch_size`` (1 with ``repeat_first``)."""
        return 1 if self.repeat_first else len(self.dataset) // self.batch_size

    def indices_at(self, step: int) -> torch.Tensor:
        """Dataset indices (int64 ``[batch_size]``, CPU) of the batch at ``step`` >= 0."""
        step = _check_int("step", step, 0)
        if self.repeat_first:
            return torch.arange(self.batch_size)
        pass_index, position = divmod(step, self.batches_per_pass)
        if pass_index != self._pass:
            self._order = torch.randperm(len(self.dataset), generator=_generator(self.seed, pass_index))
            self._pass = pass_index
        return self._order[position * self.batch_size:(position + 1) * self.batch_size]

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch at ``step``: ``(x float32 [b, C, H, W] in [0, 1], y int64 [b], index int64 [b])``."""
        index = self.indices_at(step)
        x, y = self.dataset.batch(index)
        if self.augment:
            x = augment_batch(x, _generator(self.seed, 1, step), flip=self.flip)
        return x, y, index

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for step in itertools.count():
            yield self.batch_at(step)


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded with ``SeedSequence(key)``: one independent stream per key."""
    state = np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name}: expected an int {bound}, got {value}")
    return value


def _check_dataset(dataset: object) -> None:
    if not isinstance(dataset, ImageDataset):
        raise ValueError(f"dataset: expected an ImageDataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset: expected at least one sample, got an empty dataset")


def _check_generator(generator: object) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU torch.Generator, got "
                         f"{generator.device if isinstance(generator, torch.Generator) else type(generator).__name__}")
