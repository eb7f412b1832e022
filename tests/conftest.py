"""Shared fixtures: a tiny learnable Fashion-MNIST-format dataset and a one-thread torch for training tests."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from formats import idx_bytes

TINY_TRAIN, TINY_TEST, TINY_CLASSES = 512, 256, 10


def _idx_gz(array: np.ndarray) -> bytes:
    return gzip.compress(idx_bytes(array))


@pytest.fixture(scope="session")
def tiny_fashion_mnist(tmp_path_factory) -> Path:
    """A folder with the four gzipped Fashion-MNIST idx files: 512 train / 256 test images 28x28, 10 classes.

    Class k owns a fixed random mask M_k (a quarter of the pixels); an image of class k is
    ``U{0..119}`` noise with 120 added on M_k, so the class is learnable (a small CNN reaches
    ~0 test error in 2-3 epochs) while an untrained network sits near chance (0.9 error).
    """
    folder = tmp_path_factory.mktemp("tiny-fashion-mnist")
    rng = np.random.default_rng(0)
    masks = rng.random((TINY_CLASSES, 28, 28)) < 0.25
    for prefix, n in (("train", TINY_TRAIN), ("t10k", TINY_TEST)):
        labels = rng.integers(0, TINY_CLASSES, n).astype(np.uint8)
        noise = rng.integers(0, 120, (n, 28, 28))
        images = np.where(masks[labels], noise + 120, noise).astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(_idx_gz(images))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(_idx_gz(labels))
    return folder


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module's tests (restored afterwards).

    Training tests compare weights bit for bit, which needs a fixed thread count, and on
    two busy cores one thread is also several times faster than two competing ones.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
