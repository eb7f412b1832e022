"""Image-classification datasets held in memory as uint8 and served as float32 in [0, 1].

``load_dataset(name, split, data_dir)`` finds a dataset's standard files, decodes them
(:mod:`memdisc.data.readers`) and returns an :class:`ImageDataset`. Nothing is downloaded.

Where files are looked for: ``data_dir`` itself, then the dataset's usual sub-folders of
it (so ``data_dir`` may be the folder holding the files or its parent, e.g. the folder
containing ``cifar-10-batches-py``). Without ``data_dir`` the base is
``/usr/share/datasets/<name>`` (where ``apt-get install dataset-fashion-mnist`` puts
Fashion-MNIST, the default dataset).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from memdisc.checks import describe
from memdisc.data.readers import (DatasetNotFoundError, read_cifar_batches, read_idx_split,
                                  read_svhn_mat)

__all__ = ["DATASETS", "SPLITS", "DEFAULT_DATA_ROOT", "ImageDataset", "load_dataset", "check_dataset_files"]

SPLITS = ("train", "test")
DEFAULT_DATA_ROOT = Path("/usr/share/datasets")


@dataclass(eq=False, repr=False)
class ImageDataset:
    """A labelled image set in memory.

    Attributes:
        name: dataset name (one of :data:`DATASETS` for loaded sets).
        images: uint8 ``[N, C, H, W]``, pixel values 0..255.
        labels: int64 ``[N]``, each in ``[0, num_classes)``.
        num_classes: number of classes K >= 1.

    Images are served as float32 ``x = images / 255`` in ``[0, 1]``. The tensors
    may live on any device; indexing follows them there.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images: expected a uint8 [N, C, H, W] tensor, got {describe(self.images)}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels: expected an int64 [N] tensor, got {describe(self.labels)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"labels: expected {self.images.shape[0]} labels (one per image), "
                             f"got {self.labels.shape[0]}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes: expected an int >= 1, got {self.num_classes!r}")
        if self.labels.numel() and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < self.num_classes:
            raise ValueError(f"labels: expected values in [0, {self.num_classes}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, shape={self.shape}, "
                f"num_classes={self.num_classes}, device={self.images.device})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``index`` (int64 ``[b]``) as ``x`` float32 ``[b, C, H, W]`` = images/255 and ``y`` int64 ``[b]``."""
        _check_index(index)
        return self.images[index].to(torch.float32).div_(255.0), self.labels[index]

    def subset(self, index: torch.Tensor) -> ImageDataset:
        """A new dataset of samples ``index`` (int64 ``[b]``), in that order (copies the selected rows)."""
        _check_index(index)
        return ImageDataset(self.name, self.images[index], self.labels[index], self.num_classes)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples: ``x`` float32 ``[N, C, H, W]`` in [0, 1] (a new tensor) and ``y`` int64 ``[N]`` (shared)."""
        return self.images.to(torch.float32).div_(255.0), self.labels


@dataclass(frozen=True)
class _Source:
    """Where a dataset's files are and how to decode them."""

    title: str
    num_classes: int
    files: dict[str, tuple[str, ...]]  # split -> file names, in reading order
    subdirs: tuple[str, ...]  # usual sub-folders of a parent data_dir
    gz_ok: bool  # a file may also be present as <name>.gz
    mirror_ok: bool  # a left-right mirrored image keeps its label (not so for digits)
    read: Callable[[list[Path], int], tuple[np.ndarray, np.ndarray]]  # (paths, num_classes) -> (images, labels)
    how_to_get: str


def _idx_files(prefix: str) -> tuple[str, str]:
    return (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")


def _read_idx(paths: list[Path], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    return read_idx_split(paths[0], paths[1], num_classes)


_IDX_NAMES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
_SOURCES = {
    "fashion-mnist": _Source(
        "Fashion-MNIST", 10, {"train": _idx_files("train"), "test": _idx_files("t10k")},
        ("fashion-mnist", "FashionMNIST/raw"), True, True, _read_idx,
        "Install it with `apt-get install dataset-fashion-mnist` (it lands in /usr/share/datasets/fashion-mnist), "
        f"or put the four idx files ({_IDX_NAMES}, gzipped or not; "
        "https://github.com/zalandoresearch/fashion-mnist) in a folder and pass --data-dir DIR."),
    "mnist": _Source(
        "MNIST", 10, {"train": _idx_files("train"), "test": _idx_files("t10k")},
        ("mnist", "MNIST/raw"), True, False, _read_idx,
        f"Put the four MNIST idx files ({_IDX_NAMES}, gzipped or not; e.g. from "
        "https://ossci-datasets.s3.amazonaws.com/mnist/) in a folder and pass --data-dir DIR."),
    "cifar10": _Source(
        "CIFAR-10", 10, {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        ("cifar-10-batches-py",), False, True, lambda paths, k: read_cifar_batches(paths, b"labels", k),
        "Download and unpack https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and pass "
        "--data-dir DIR (the cifar-10-batches-py folder or its parent)."),
    "cifar100": _Source(
        "CIFAR-100", 100, {"train": ("train",), "test": ("test",)},
        ("cifar-100-python",), False, True, lambda paths, k: read_cifar_batches(paths, b"fine_labels", k),
        "Download and unpack https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and pass "
        "--data-dir DIR (the cifar-100-python folder or its parent)."),
    "svhn": _Source(
        "SVHN", 10, {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
        ("svhn", "SVHN"), False, False, lambda paths, k: read_svhn_mat(paths[0]),
        "Download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and test_32x32.mat "
        "(the cropped-digit format) into a folder and pass --data-dir DIR."),
}
DATASETS = tuple(_SOURCES)  # ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn")


def mirror_ok(name: str) -> bool:
    """Whether a left-right flip keeps the label (augmentation flips only then): False for the digit
    sets (MNIST, SVHN), True for Fashion-MNIST and CIFAR."""
    if name not in _SOURCES:
        raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    return _SOURCES[name].mirror_ok


def load_dataset(name: str, split: str = "train", data_dir: str | Path | None = None) -> ImageDataset:
    """Load one split of a dataset from its standard files.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        data_dir: folder holding the files, or its parent; ``None`` means
            ``/usr/share/datasets/<name>``.

    Returns:
        :class:`ImageDataset` with images uint8 ``[N, C, H, W]`` (1x28x28 for
        (Fashion-)MNIST, 3x32x32 otherwise) and labels int64 ``[N]``.

    Raises:
        ValueError: unknown ``name`` or ``split``.
        DatasetNotFoundError: the files are not there (the message names the
            folders looked at and how to obtain the files).
        DatasetFormatError: a file is truncated or corrupt (the message names it).
    """
    if name not in _SOURCES:
        raise ValueError(f"name: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    source = _SOURCES[name]
    images, labels = source.read(_locate(source, split, data_dir, name), source.num_classes)
    return ImageDataset(name, torch.from_numpy(images), torch.from_numpy(labels), source.num_classes)


def check_dataset_files(name: str, data_dir: str | Path | None = None) -> None:
    """Check, without decoding them, that both splits' files of dataset ``name`` are where
    :func:`load_dataset` looks and can be opened: a run checks this before it writes anything.

    Raises:
        ValueError: unknown ``name``.
        DatasetNotFoundError: files missing (the message says where it looked and how to get them).
        OSError: a file that cannot be read (naming it).
    """
    if name not in _SOURCES:
        raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    for split in SPLITS:
        for path in _locate(_SOURCES[name], split, data_dir, name):
            with open(path, "rb") as f:
                f.read(1)


def _locate(source: _Source, split: str, data_dir: str | Path | None, name: str) -> list[Path]:
    """Paths of the split's files in the first candidate folder that holds any of them."""
    base = DEFAULT_DATA_ROOT / name if data_dir is None else Path(data_dir).expanduser()
    folders = [base] + [base / sub for sub in source.subdirs]
    wanted = source.files[split]
    for folder in folders:
        found = [_find_file(folder, file, source.gz_ok) for file in wanted]
        if any(found):
            missing = [file for file, path in zip(wanted, found) if path is None]
            if missing:
                raise DatasetNotFoundError(f"{source.title} ({split} split) is incomplete in {folder}: missing "
                                           f"{', '.join(missing)}. {source.how_to_get}")
            return found
    suffix = "[.gz]" if source.gz_ok else ""
    raise DatasetNotFoundError(f"{source.title} ({split} split) not found: looked for {wanted[0]}{suffix} in "
                               f"{', '.join(str(f) for f in folders)}. {source.how_to_get}")


def _find_file(folder: Path, file: str, gz_ok: bool) -> Path | None:
    for candidate in (file, file + ".gz") if gz_ok else (file,):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _check_index(index: object) -> None:
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError(f"index: expected an int64 [b] tensor, got {describe(index)}")
