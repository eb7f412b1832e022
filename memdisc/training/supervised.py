"""Supervised training (the burn-in): ordinary training that produces the snapshots the online
phase starts from (ALGORITHM.md section 1, phase 1); ``BurninConfig`` and ``run_burnin``.

Run directory layout::

    OUT/config.json              the configuration and provenance
    OUT/history.json             per-epoch test error, train loss, seconds
    OUT/checkpoint.pt            the latest epoch (model + optimizer), for resuming
    OUT/snapshots/epoch_NNN.pt   snapshots at the chosen epochs (historical models)

Interrupting and re-running the same command resumes from ``checkpoint.pt``;
on CPU the final weights equal those of an uninterrupted run (the data order of
epoch e depends only on (seed, e)).

Under torchrun (``memdisc.runtime.distributed``) the model trains as ``DistributedDataParallel``: every
rank draws the same global minibatches and takes its contiguous part of each, with its loss scaled by
``W n_r / B`` (W ranks, n_r of the batch's B rows here; ``share_loss``) so that DDP's gradient average
is the global batch's mean-loss gradient; rank 0's buffers go to every rank after each epoch; the test
error is summed over the ranks' parts of the test set.  Rank 0 writes the files; an unfinished
checkpoint resumes only on the number of processes that wrote it.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memdisc.artifacts import load_model_file, provenance, remove_stale_temp_files, save_model_file, write_json
from memdisc.config import (OptionError, check_choice, check_int, check_number, check_seed, comparable, field,
                            to_dict)
from memdisc.data import DATASETS, iterate_minibatches, load_dataset, mirror_ok
from memdisc.eval.classification import error_rate
from memdisc.models import MODELS, ZOO, build_model, check_zoo_options, load_weights
from memdisc.runtime.device import resolve_device
from memdisc.runtime.distributed import Comm, check_processes, data_parallel, process_comm, share_loss


@dataclasses.dataclass
class BurninConfig:
    dataset: str = field("fashion-mnist", "dataset name: fashion-mnist, mnist, cifar10, cifar100, svhn")
    data_dir: str | None = field(None, "directory holding the dataset files (default: the dataset's standard place)",
                                 path="data")
    model: str = field("cnn", "model name: cnn, resnet18, or a torchvision victim (needs torchvision): "
                              + ", ".join(ZOO))
    model_weights: str | None = field(None, "weights of a tv-* model: a state_dict file saved with torch.save (e.g. "
                                            "torchvision's downloaded .pth); a head with another number of classes "
                                            "stays freshly initialised (default: random initialisation)", path="data")
    norm: str = field("auto", "normalisation layers: auto, bn, gn, none")
    epochs: int = field(6, "training epochs (seed: 40 on CIFAR-10)")
    batch_size: int = field(128, "minibatch size (seed: 256)")
    lr: float = field(0.05, "SGD learning rate (seed: 0.1 for ResNet-18)")
    momentum: float = field(0.9, "SGD momentum")
    weight_decay: float = field(1e-4, "SGD weight decay")
    augment: bool = field(False, "random crop + horizontal flip (no flip for the digit sets MNIST and SVHN; "
                                 "seed: on for CIFAR-10)")
    snapshot_every: int = field(1, "save a snapshot every N epochs (the last epoch is always saved)")
    train_subset: int | None = field(None, "use only the first N training images (tests, quick looks)")
    test_subset: int | None = field(None, "evaluate on only the first N test images")
    seed: int = field(0, "random seed for initialisation and data order")
    device: str = field("auto", "cpu, cuda, or auto (cuda when available)")
    out: str | None = field(None, "run directory (default: runs/burnin-DATASET-MODEL-sSEED)", path="run")

    def __post_init__(self):
        """Known dataset, model and norm (a tv-* model: torchvision importable, norm auto); an existing
        model_weights file; counts >= 1; lr > 0, momentum and weight decay >= 0, finite; a seed in
        [0, 2**32).  (The data files, and the weights' contents, are checked when a run starts, before
        it writes.)"""
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, sorted(MODELS))
        check_choice("norm", self.norm, ("auto", "bn", "gn", "none"))
        check_zoo_options(self.model, self.norm)
        if self.model_weights is not None and not Path(self.model_weights).expanduser().is_file():
            raise OptionError("model_weights", f"no such file {self.model_weights!r}; give a state_dict file saved "
                                               "with torch.save")
        for name in ("epochs", "batch_size", "snapshot_every"):
            check_int(name, getattr(self, name))
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        check_number("lr", self.lr, 0.0, strict=True)
        check_number("momentum", self.momentum, 0.0)
        check_number("weight_decay", self.weight_decay, 0.0)
        check_seed("seed", self.seed)
        if self.out is None:
            self.out = f"runs/burnin-{self.dataset}-{self.model}-s{self.seed}"


def _resume_config_matches(path: Path, saved: dict, current: dict) -> None:
    """Refuse the checkpoint ``path`` of another configuration (paths compared as :func:`comparable`
    makes them)."""
    ignore = {"epochs", "device", "out"}
    saved, current = comparable(BurninConfig, saved), comparable(BurninConfig, current)
    diff = {k: (saved.get(k), v) for k, v in current.items() if k not in ignore and saved.get(k) != v}
    if diff:
        raise ValueError(f"{path}: a checkpoint of another configuration {diff}; use a different --out or delete "
                         "the directory")


def check_model_weights(cfg: BurninConfig) -> None:
    """Refuse a ``model_weights`` file that does not fit ``cfg.model`` before anything is written.

    The file is loaded into a throwaway network: a ``tv-*`` victim's parameters do not depend on the
    dataset's channels or image size, and a head of another class count is allowed
    (:func:`memdisc.models.load_weights`).  Raises ValueError naming the file."""
    if cfg.model_weights is not None:
        load_weights(build_model(cfg.model, in_channels=3, num_classes=10, image_size=32), cfg.model_weights)


def snapshot_path(out: str | Path, epoch: int) -> Path:
    return Path(out) / "snapshots" / f"epoch_{epoch:03d}.pt"


def run_burnin(cfg: BurninConfig, progress: bool = True, device: torch.device | None = None,
               comm: Comm | None = None) -> dict:
    """Train, evaluate every epoch, save snapshots; resume if ``cfg.out`` has a checkpoint.

    ``device``: the device an entry point above resolved (default: ``cfg.device`` resolved here).
    ``comm``: the processes the run is spread over (module docstring; default: this process's group,
    ``memdisc.runtime.distributed.process_comm``; progress from rank 0 only).
    Returns the history dict (also written to OUT/history.json).
    """
    device = resolve_device(cfg.device) if device is None else device
    comm = process_comm() if comm is None else comm
    progress = progress and comm.is_writer
    out = Path(cfg.out)
    train = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test = load_dataset(cfg.dataset, "test", cfg.data_dir)
    if cfg.train_subset:
        train = train.subset(torch.arange(min(cfg.train_subset, len(train))))
    if cfg.test_subset:
        test = test.subset(torch.arange(min(cfg.test_subset, len(test))))
    x_test, y_test = (comm.shard(t).to(device) for t in test.tensors())

    spec = {"name": cfg.model, "in_channels": train.shape[0], "num_classes": train.num_classes,
            "image_size": train.shape[1], "norm": cfg.norm}
    if cfg.model not in ZOO:  # a tv-* model normalises with ImageNet's statistics, which its weights expect
        pixels = train.images.float().div_(255)
        spec |= {"mean": pixels.mean(dim=(0, 2, 3)).tolist(), "std": pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()}
        del pixels
    torch.manual_seed(cfg.seed)
    model = build_model(**spec)
    if cfg.model_weights is not None:
        loaded = load_weights(model, cfg.model_weights)  # the snapshots hold the weights from here on
        if progress:
            print(loaded)
    model = model.to(device)
    trainer = data_parallel(model, comm)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    start_epoch = 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = load_model_file(ckpt_path, remedy="delete it to restart the burn-in from epoch 1")
        _resume_config_matches(ckpt_path, ckpt["config"], to_dict(cfg))
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, history = ckpt["epoch"], ckpt["extra"]["history"]
        if start_epoch < cfg.epochs:  # a finished burn-in is read back on any number of processes
            check_processes(ckpt_path, ckpt["extra"].get("processes", 1), comm)
        if start_epoch > cfg.epochs:
            raise ValueError(f"epochs: the run directory {out} already holds {start_epoch} epochs, more than the "
                             f"{cfg.epochs} asked for; use a different --out or --epochs >= {start_epoch}")
        if comm.is_writer:
            print(f"resuming {out} from epoch {start_epoch}")
    remove_stale_temp_files(out, out / "snapshots")
    write_json(out / "config.json", {"command": "burnin", "config": to_dict(cfg), "provenance": provenance(cfg.seed, device)})

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        trainer.train()
        total = torch.zeros((), device=device)
        n_batches = -(-len(train) // cfg.batch_size)
        bar = tqdm(iterate_minibatches(train, cfg.batch_size, gen, augment=cfg.augment, flip=mirror_ok(cfg.dataset)), total=n_batches,
                   desc=f"burn-in epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False,
                   mininterval=1.0)
        for x, y in bar:
            rows = y.shape[0]
            x, y = (comm.shard(t).to(device, non_blocking=True) for t in (x, y))
            loss = share_loss(trainer(x), y, rows, comm)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * (rows / comm.world_size)
        comm.sync_buffers(model)
        err = error_rate(model, x_test, y_test, comm=comm)
        record = {"epoch": epoch, "test_error": err, "train_loss": comm.all_reduce_sum(total).item() / len(train),
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        if progress:
            print(f"epoch {epoch}: test error {100 * err:.2f}%  train loss {record['train_loss']:.4f}  "
                  f"({record['seconds']:.1f} s)")
        common = dict(model=model, model_spec=spec, epoch=epoch, test_error=err, config=to_dict(cfg),
                      seed=cfg.seed, optimizer=opt, extra={"history": history, "processes": comm.world_size})
        if epoch % cfg.snapshot_every == 0 or epoch == cfg.epochs:
            save_model_file(snapshot_path(out, epoch), **common)
        save_model_file(ckpt_path, **common)
    result = {"config": to_dict(cfg), "history": history,
              "final_test_error": history[-1]["test_error"] if history else None,
              "seconds": sum(h["seconds"] for h in history), "provenance": provenance(cfg.seed, device)}
    write_json(out / "history.json", result)
    return result
