"""Fitting a model to a fixed (possibly poisoned) training set held in memory: the end-to-end,
transfer and stream settings.

* :func:`train_end_to_end`: every trainable parameter of a model trains on the images;
* :func:`train_transfer`: only a :class:`~memdisc.training.victim.TransferVictim`'s head trains, on
  its frozen backbone's features, computed once;
* :func:`train_streaming`: the online setting, every trainable parameter of a model trains on the
  set as a stream: ``epochs`` passes (a stream: one) of small minibatches, no early stopping.

All three are plain functions over tensors (no files, nothing global changed), for a study that trains
one victim per cell.  With ``N`` training samples, each epoch draws the order
``torch.randperm(N)`` from one generator seeded with ``seed`` and takes SGD steps (``lr``,
``momentum``, ``weight_decay``) on the mean cross-entropy of consecutive minibatches of
``batch_size`` (the last one smaller); the global RNG (dropout) is seeded with ``seed`` inside and
restored afterwards, so a run is a function of its inputs and options.  After each epoch the
validation loss ``L_val = sum_i CE(f(x_i), y_i) / N_val`` (eval mode) is measured; training stops
after ``patience`` epochs without a lower one, and the model ends with the parameters and buffers of
the epoch of lowest ``L_val`` (:class:`TrainingLog`).  A stream (:func:`train_streaming`) takes the
same steps without early stopping: every epoch runs and the model ends as the last one left it.

Under torchrun (``comm``, default: this process's group, ``memdisc.runtime.distributed.process_comm``)
the trainable module trains as ``DistributedDataParallel``: every rank draws the same order and takes its
contiguous part of each minibatch, its loss scaled by ``W n_r / B`` so that DDP's gradient average is the
minibatch's mean-loss gradient (a rank may get no row of a short last minibatch); rank 0's buffers go to
every rank after each epoch; ``L_val``, the validation error and the training loss are sums over the
ranks' parts, so every rank takes the same early-stopping decisions and ends with the same weights.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from memdisc.checks import check_batch, describe
from memdisc.config import check_int, check_number, check_seed, field
from memdisc.eval.classification import eval_mode
from memdisc.models import classifier_head
from memdisc.runtime.distributed import Comm, data_parallel, process_comm, share_loss
from memdisc.training.victim import TransferVictim, trainable_parameters

__all__ = ["FitConfig", "TrainingLog", "EpochHook", "train_end_to_end", "train_transfer", "train_streaming"]


@dataclasses.dataclass
class FitConfig:
    """The options of end-to-end and transfer training."""

    epochs: int = field(30, "maximum training epochs")
    batch_size: int = field(128, "minibatch size (also of the evaluation and feature passes)")
    lr: float = field(0.05, "SGD learning rate")
    momentum: float = field(0.9, "SGD momentum")
    weight_decay: float = field(1e-4, "SGD weight decay")
    patience: int | None = field(5, "stop after N epochs without a lower validation loss (none: train every "
                                    "epoch; the best epoch's weights are kept either way)")
    seed: int = field(0, "random seed of the data order and of dropout")

    def __post_init__(self):
        """Counts >= 1 (patience: or none); lr > 0, momentum and weight decay >= 0, finite; a seed in
        [0, 2**32)."""
        check_int("epochs", self.epochs)
        check_int("batch_size", self.batch_size)
        check_number("lr", self.lr, 0.0, strict=True)
        check_number("momentum", self.momentum, 0.0)
        check_number("weight_decay", self.weight_decay, 0.0)
        if self.patience is not None:
            check_int("patience", self.patience)
        check_seed("seed", self.seed)


@dataclasses.dataclass(frozen=True)
class TrainingLog:
    """What one fit did, one entry per epoch run (epoch e at index e - 1).

    Attributes:
        train_loss: the mean minibatch cross-entropy over the epoch, weighted by minibatch size.
        val_loss: ``L_val`` after the epoch; val_error: the top-1 error on the validation set.
        best_epoch: the epoch (from 1) whose weights the model holds: the one of lowest ``L_val``
            (a stream, :func:`train_streaming`: the last).
        stopped_early: True when ``patience`` ended training before ``epochs``.
    """

    train_loss: tuple[float, ...]
    val_loss: tuple[float, ...]
    val_error: tuple[float, ...]
    best_epoch: int
    stopped_early: bool


def _check_data(net_name: str, head: nn.Linear, x_train, y_train, x_val, y_val) -> None:
    """Labelled batches of the same sample shape, not empty, labels in [0, classes of ``head``)."""
    for name_x, x, name_y, y in (("x_train", x_train, "y_train", y_train), ("x_val", x_val, "y_val", y_val)):
        check_batch(name_x, x, name_y, y)
        if x.shape[0] == 0:
            raise ValueError(f"{name_x}: expected at least one sample, got {describe(x)}")
        if int(y.min()) < 0 or int(y.max()) >= head.out_features:
            raise ValueError(f"{name_y}: expected class indices in [0, {head.out_features}) (the classes of the "
                             f"{net_name}'s head), got values in [{int(y.min())}, {int(y.max())}]")
    if x_val.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"x_val: expected samples of x_train's shape {tuple(x_train.shape[1:])}, got "
                         f"{tuple(x_val.shape[1:])}")


def _check_options(name: str, net: nn.Module, cfg, progress) -> FitConfig:
    """``cfg`` (None: the defaults), ``progress`` a bool, and ``net`` (the argument ``name``) with
    trainable parameters."""
    if cfg is not None and not isinstance(cfg, FitConfig):
        raise ValueError(f"cfg: expected a FitConfig, got {describe(cfg)}")
    if not isinstance(progress, bool):
        raise ValueError(f"progress: expected a bool, got {describe(progress)}")
    if not trainable_parameters(net):
        raise ValueError(f"{name}: expected a module with trainable parameters (requires_grad)")
    return FitConfig() if cfg is None else cfg


@torch.no_grad()
def _validate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
              device: torch.device, comm: Comm) -> tuple[float, float]:
    """``(L_val, top-1 error)`` of ``net`` in eval mode (restored afterwards) on every rank's part of
    ``x [N, ...]``: sums over ranks divided by N."""
    loss, wrong = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    n = x.shape[0]
    x, y = comm.shard(x), comm.shard(y)
    with eval_mode(net):
        for i in range(0, x.shape[0], batch_size):
            yb = y[i:i + batch_size].to(device)
            logits = net(x[i:i + batch_size].to(device))
            loss += F.cross_entropy(logits, yb, reduction="sum")
            wrong += (logits.argmax(1) != yb).sum()
    return comm.all_reduce_sum(loss).item() / n, comm.all_reduce_sum(wrong).item() / n


EpochHook = Callable[[int], None]
"""Called as ``on_epoch(epoch)`` after each epoch (from 1) is validated, with the model as that epoch
left it (before the best epoch's weights are restored at the end); e.g. to keep snapshots."""


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
         cfg: FitConfig, desc: str, progress: bool, early_stopping: bool = True,
         on_epoch: EpochHook | None = None, comm: Comm | None = None) -> TrainingLog:
    """The loop of the module docstring: ``net``'s trainable parameters learn ``x -> y``; without
    ``early_stopping`` every epoch runs and ``net`` ends with the last epoch's weights."""
    comm = process_comm() if comm is None else comm
    params = trainable_parameters(net)
    device = params[0].device
    trainer = data_parallel(net, comm)
    progress = progress and comm.is_writer
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    log = {"train_loss": [], "val_loss": [], "val_error": []}
    best_epoch, best_state, stopped = 0, None, False
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        bar = tqdm(range(1, cfg.epochs + 1), desc=desc, disable=not progress, leave=False)
        for epoch in bar:
            trainer.train()
            order = torch.randperm(x.shape[0], generator=order_gen)
            total = torch.zeros((), device=device)
            for start in range(0, x.shape[0], cfg.batch_size):
                index = order[start:start + cfg.batch_size]
                rows = comm.shard(index)
                yb = y[rows].to(device, non_blocking=True)
                loss = share_loss(trainer(x[rows].to(device, non_blocking=True)), yb, index.numel(), comm)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * (index.numel() / comm.world_size)
            comm.sync_buffers(net)
            val_loss, val_error = _validate(net, x_val, y_val, cfg.batch_size, device, comm)
            for key, value in zip(log, (comm.all_reduce_sum(total).item() / x.shape[0], val_loss, val_error)):
                log[key].append(value)
            bar.set_postfix(val_loss=f"{val_loss:.4f}", val_error=f"{val_error:.4f}")
            if on_epoch is not None:
                on_epoch(epoch)
            if not early_stopping:
                best_epoch = epoch
            elif best_state is None or val_loss < log["val_loss"][best_epoch - 1]:
                best_epoch, best_state = epoch, {k: v.detach().clone() for k, v in net.state_dict().items()}
            elif cfg.patience is not None and epoch - best_epoch >= cfg.patience:
                stopped = epoch < cfg.epochs
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    return TrainingLog(**{k: tuple(v) for k, v in log.items()}, best_epoch=best_epoch, stopped_early=stopped)


def train_end_to_end(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                     y_val: torch.Tensor, cfg: FitConfig | None = None, *, progress: bool = False,
                     on_epoch: EpochHook | None = None, comm: Comm | None = None) -> TrainingLog:
    """Train ``model`` (every trainable parameter; a model of :mod:`memdisc.models`) on the images, in place.

    Args:
        model: the victim, on the device to train on; ends with its best epoch's parameters and buffers.
        x_train: float ``[N, C, H, W]`` pixels in [0, 1]; y_train: int64 ``[N]`` class indices on x_train's
            device (any device: minibatches move to the model's).  x_val, y_val: the same for the
            validation set (early stopping).
        cfg: the options (default ``FitConfig()``); progress: a bar over the epochs; on_epoch: called
            after each epoch (:data:`EpochHook`); comm: the processes (module docstring; default: this
            process's group).
    Returns:
        the :class:`TrainingLog`.
    Raises:
        ValueError: naming the argument (``model`` without a linear head or trainable parameters, bad
            batches, labels outside the head's classes, ``cfg``).
    """
    _check_data("model", classifier_head(model), x_train, y_train, x_val, y_val)
    cfg = _check_options("model", model, cfg, progress)
    return _fit(model, x_train, y_train, x_val, y_val, cfg, "end-to-end", progress, on_epoch=on_epoch, comm=comm)


@torch.no_grad()
def _features(victim: TransferVictim, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """``victim.features`` of every row of ``x`` ``[N, D]`` on ``device`` (the backbone is in eval mode)."""
    return torch.cat([victim.features(x[i:i + batch_size].to(device)) for i in range(0, x.shape[0], batch_size)])


def train_transfer(victim: TransferVictim, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                   y_val: torch.Tensor, cfg: FitConfig | None = None, *, progress: bool = False,
                   on_epoch: EpochHook | None = None, comm: Comm | None = None) -> TrainingLog:
    """Train a transfer victim's head on its frozen backbone's features, in place.

    The backbone is frozen and in eval mode and the images are not augmented, so each sample's
    features are fixed: they are computed once (``[N, D]`` on the head's device) and the head trains
    on them, which is training the victim on the images with the same order and steps, without N
    backbone forwards per epoch.

    Args and returns: as :func:`train_end_to_end`, with ``victim`` a
    :class:`~memdisc.training.victim.TransferVictim` (e.g. ``TransferVictim(trained_model)``).
    Raises:
        ValueError: naming the argument (``victim`` not a TransferVictim, bad batches, labels outside
            the head's classes, ``cfg``).
    """
    if not isinstance(victim, TransferVictim):
        raise ValueError(f"victim: expected a TransferVictim (TransferVictim(model) freezes a trained model's "
                         f"features under a trainable head), got {describe(victim)}")
    _check_data("victim", victim.head, x_train, y_train, x_val, y_val)
    cfg = _check_options("victim", victim.head, cfg, progress)
    device = victim.head.weight.device
    z_train, z_val = (_features(victim, x, cfg.batch_size, device) for x in (x_train, x_val))
    return _fit(victim.head, z_train, y_train.to(device), z_val, y_val.to(device), cfg, "transfer", progress,
                on_epoch=on_epoch, comm=comm)


def train_streaming(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                    y_val: torch.Tensor, cfg: FitConfig, *, progress: bool = False,
                    comm: Comm | None = None) -> TrainingLog:
    """Train ``model`` on the training set as a stream, in place: the online setting of the study.

    The seed (changhongyan123/poisoning, ``train.py``) fits the shuffled poisoned set with batch
    size 1 for up to 100 epochs (Keras EarlyStopping on the training loss, patience 20), which is
    per-example SGD over a fixed set, not a stream.  Here the set is one stream: ``cfg.epochs``
    passes (a stream: 1) over the order ``torch.randperm(N)`` drawn from a generator seeded with
    ``cfg.seed``, SGD steps on consecutive minibatches of ``cfg.batch_size`` (small: per-example
    SGD is batch size 1), with ``cfg``'s lr, momentum and weight decay (momentum 0 and no weight
    decay is plain SGD), exactly the steps of :func:`train_end_to_end` (the same loop) but with no
    early stopping: a stream never comes back to a sample, so there is no best epoch to return to;
    every pass runs and the model ends as the last step left it.  ``L_val`` is recorded after every
    pass (``TrainingLog.val_loss``).

    Args and returns: as :func:`train_end_to_end`, with ``cfg`` required and ``cfg.patience`` None.
    Raises:
        ValueError: naming the argument (``model`` without a linear head or trainable parameters, bad
            batches, labels outside the head's classes, ``cfg`` not a FitConfig or with a patience).
    """
    _check_data("model", classifier_head(model), x_train, y_train, x_val, y_val)
    if not isinstance(cfg, FitConfig):
        raise ValueError(f"cfg: expected a FitConfig, got {describe(cfg)}")
    if cfg.patience is not None:
        raise ValueError(f"cfg: a stream has no early stopping (it never comes back to a sample); expected "
                         f"patience None, got {cfg.patience}")
    cfg = _check_options("model", model, cfg, progress)
    return _fit(model, x_train, y_train, x_val, y_val, cfg, "stream", progress, early_stopping=False, comm=comm)
