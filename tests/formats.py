"""Writers of small files in the datasets' standard formats, shared by the tests."""
from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 00 00 08 <ndim>, big-endian int32 dims, raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    """Writes every ``bytes`` as a Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), as the original
    CIFAR files hold their keys and array data: ``encoding="bytes"`` loads them as bytes,
    ``encoding="latin1"`` (torchvision) as str."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        size = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj if size < 256
                   else pickle.BINSTRING + struct.pack("<i", size) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_pickle(path: Path, obj: object, numpy1: bool = False, py2: bool = False) -> None:
    """Protocol-2 pickle, as the CIFAR files are; ``numpy1`` spells numpy's globals as numpy 1 did
    (``numpy.core.multiarray``), like the original files; ``py2`` writes bytes as Python 2 strings
    (:class:`_Py2Pickler`), also like the original files (Python 3 writes ``_codecs.encode`` calls)."""
    if py2:
        buffer = io.BytesIO()
        _Py2Pickler(buffer, protocol=2).dump(obj)
        data = buffer.getvalue()
    else:
        data = pickle.dumps(obj, protocol=2)
    if numpy1:
        assert b"numpy._core.multiarray" in data
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(data)


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_idx_dataset(folder: Path, gz: bool, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    """Write the four MNIST-style files; returns {split: (images [N, 28, 28], labels [N])}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays[split] = (images, labels)
    return arrays


def make_cifar10(folder: Path, seed: int = 0, py2: bool = False, per_batch: int = 3, n_test: int = 4) -> dict:
    """cifar-10-batches-py with five ``per_batch``-sample train batches and an ``n_test``-sample test
    batch of random pixels and labels (``py2``: see :func:`write_pickle`)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train": ([], []), "test": ([], [])}
    for name, split, n in ([(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)]
                           + [("test_batch", "test", n_test)]):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        write_pickle(folder / name, {b"batch_label": name.encode(), b"data": data, b"labels": labels},
                     numpy1=name in ("data_batch_2", "test_batch"), py2=py2)
        arrays[split][0].append(data)
        arrays[split][1].extend(labels)
    return {split: (np.concatenate(d), np.array(lab)) for split, (d, lab) in arrays.items()}


def make_cifar100(folder: Path, seed: int = 0, py2: bool = False) -> dict:
    """cifar-100-python with a 6-sample train and a 4-sample test file (``py2``: see :func:`write_pickle`)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", 6), ("test", 4)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(90, 100, n).tolist()  # > 9, so reading coarse labels or the CIFAR-10 key shows
        write_pickle(folder / split, {b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * n},
                     py2=py2)
        arrays[split] = (data, np.array(fine))
    return arrays


def make_svhn(folder: Path, seed: int = 0) -> dict:
    """train_32x32.mat / test_32x32.mat with X [32, 32, 3, N] and y [N, 1] in 1..10 (10 included)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", 7), ("test", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.concatenate([[10, 1], rng.integers(1, 11, n - 2)]).astype(np.uint8)[:, None]
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        arrays[split] = (x, y)
    return arrays
