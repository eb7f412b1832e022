"""memdisc's dataset readers return exactly what torchvision.datasets returns from the same files.

Small files with random pixels and labels (tests/formats.py) are laid out where each torchvision
class looks (``root/MNIST/raw``, ``root/FashionMNIST/raw``, ``root/cifar-10-batches-py``,
``root/cifar-100-python``, ``root/{train,test}_32x32.mat``); memdisc reads the same ``root``.
torchvision's images (PIL) become uint8 ``[C, H, W]`` with its own ``pil_to_tensor`` (no scaling),
stacked to ``[N, C, H, W]``, and are compared bit for bit with memdisc's ``images``, as are the labels.
Random content makes a transposed axis, a swapped channel, a wrong file order or SVHN's 10 -> 0
mapping show.  Skipped without torchvision (the CPU-torch path).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from formats import make_cifar10, make_cifar100, make_idx_dataset, make_svhn, write_pickle

from memdisc.data import load_dataset

torchvision = pytest.importorskip("torchvision")
from torchvision import datasets as tv_datasets  # noqa: E402
from torchvision.transforms.functional import pil_to_tensor  # noqa: E402


def _mnist(root: Path, cls) -> None:
    make_idx_dataset(root / cls.__name__ / "raw", gz=False)  # torchvision reads unzipped files only


def _cifar10(root: Path, cls) -> None:
    make_cifar10(root / cls.base_folder, py2=True)
    write_pickle(root / cls.base_folder / "batches.meta", {b"label_names": [b"c%d" % k for k in range(10)]},
                 py2=True)


def _cifar100(root: Path, cls) -> None:
    make_cifar100(root / cls.base_folder, py2=True)
    write_pickle(root / cls.base_folder / "meta", {b"fine_label_names": [b"c%d" % k for k in range(100)]},
                 py2=True)


def _svhn(root: Path, cls) -> None:
    make_svhn(root)


# memdisc name -> (torchvision class, writer of its files under root, torchvision's split argument)
CASES = {
    "mnist": (tv_datasets.MNIST, _mnist, lambda split: {"train": split == "train"}),
    "fashion-mnist": (tv_datasets.FashionMNIST, _mnist, lambda split: {"train": split == "train"}),
    "cifar10": (tv_datasets.CIFAR10, _cifar10, lambda split: {"train": split == "train"}),
    "cifar100": (tv_datasets.CIFAR100, _cifar100, lambda split: {"train": split == "train"}),
    "svhn": (tv_datasets.SVHN, _svhn, lambda split: {"split": split}),
}


@pytest.fixture
def files_exist_is_integrity(monkeypatch):
    """CIFAR and SVHN compare each file's md5 with the real dataset's, which small test files cannot
    match: the test replaces that check (in those two modules only) by "the file exists", which is
    what torchvision checks for MNIST."""
    for module in (tv_datasets.cifar, tv_datasets.svhn):
        monkeypatch.setattr(module, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.usefixtures("files_exist_is_integrity")
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", list(CASES))
def test_reader_matches_torchvision(tmp_path, name, split):
    cls, write, split_args = CASES[name]
    write(tmp_path, cls)
    ours = load_dataset(name, split, tmp_path)
    theirs = cls(str(tmp_path), download=False, **split_args(split))
    assert len(theirs) == len(ours) > 0
    images = torch.stack([pil_to_tensor(image) for image, _ in theirs])
    labels = torch.tensor([label for _, label in theirs], dtype=torch.int64)
    assert images.dtype == ours.images.dtype == torch.uint8 and images.shape == ours.images.shape
    assert torch.equal(images, ours.images)
    assert torch.equal(labels, ours.labels)
