"""Decoders for the standard on-disk image-classification formats.

Every reader returns numpy arrays ``(images, labels)``:

* ``images``: uint8 ``[N, C, H, W]``, C-contiguous (pixel values 0..255);
* ``labels``: int64 ``[N]``, each in ``[0, num_classes)``.

Formats:

* IDX (MNIST, Fashion-MNIST), gzipped or plain: a big-endian header
  ``00 00 <dtype=0x08> <ndim>`` followed by ``ndim`` int32 sizes and the
  raw bytes; images are ``[N, H, W]`` (magic 0x00000803), labels ``[N]``
  (magic 0x00000801).
* CIFAR-10 / CIFAR-100 python pickles: a dict with ``b'data'`` uint8
  ``[N, 3072]`` (rows are R, G, B planes of 32x32) and ``b'labels'``
  (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100).
* SVHN cropped digits (``*_32x32.mat``, MATLAB v5): ``X`` uint8
  ``[32, 32, 3, N]`` and ``y`` ``[N, 1]`` with digits 1..9 and 10 meaning 0.

A file that cannot be decoded raises :class:`DatasetFormatError` (a
``ValueError``) naming the file and what was wrong; the decoding error, if
any, is chained as ``__cause__``. Files are only read, never downloaded.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import zlib
from pathlib import Path

import numpy as np

__all__ = ["DatasetNotFoundError", "DatasetFormatError", "read_idx", "read_idx_split", "read_cifar_batches",
           "read_svhn_mat"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to provide them."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is truncated or not in the expected format."""


_IDX_UINT8 = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Decode one IDX file (``.gz`` is decompressed first) into a uint8 array of the header's shape.

    Only the unsigned-byte element type (0x08) is accepted, which is what the
    MNIST-style image and label files use. The payload must be exactly
    ``prod(dims)`` bytes.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DatasetFormatError(f"{path}: not a valid gzip file ({err})") from err
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: IDX file too short for its 4-byte magic ({len(raw)} bytes)")
    zero0, zero1, dtype_code, ndim = raw[:4]
    if zero0 != 0 or zero1 != 0 or dtype_code != _IDX_UINT8 or ndim < 1:
        raise DatasetFormatError(f"{path}: bad IDX magic 0x{raw[:4].hex()} (expected 0x000008NN, "
                                 f"unsigned bytes with NN >= 1 dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: IDX header truncated ({len(raw)} bytes, header needs {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetFormatError(f"{path}: IDX payload is {len(raw) - header} bytes, "
                                 f"header dims {dims} need {expected}")
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def read_idx_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read an IDX image file ``[N, H, W]`` and its label file ``[N]``.

    Returns images uint8 ``[N, 1, H, W]`` and labels int64 ``[N]``.
    """
    images = read_idx(images_path)
    if images.ndim != 3:
        raise DatasetFormatError(f"{images_path}: expected an IDX image file with 3 dimensions [N, H, W], "
                                 f"got shape {images.shape}")
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DatasetFormatError(f"{labels_path}: expected an IDX label file with 1 dimension [N], "
                                 f"got shape {labels.shape}")
    _check_count(images.shape[0], labels.shape[0], f"{images_path} and {labels_path}")
    labels = labels.astype(np.int64)
    _check_labels(labels, num_classes, labels_path)
    return images[:, None].copy(), labels


# The only globals a pickle of numpy arrays needs; anything else is refused, so a hostile
# "dataset" file cannot run code when loaded. "core." stands for numpy.core (numpy 1, and
# pickles written by it, such as the original CIFAR files) or numpy._core (numpy 2).
_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"
_ALLOWED_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                    ("core.multiarray", "_reconstruct"), ("core.multiarray", "scalar"),
                    ("core.numeric", "_frombuffer")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed to rebuild arrays."""

    def find_class(self, module: str, name: str):
        key = module.replace("numpy._core.", "core.").replace("numpy.core.", "core.")
        if (key, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if key.startswith("core."):
            module = f"{_NUMPY_CORE}.{key[len('core.'):]}"
        return getattr(importlib.import_module(module), name)


def _load_pickle(path: Path) -> object:
    raw = Path(path).read_bytes()
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # the unpickler raises many types on corrupt input (EOFError, KeyError, ...)
        raise DatasetFormatError(f"{path}: not a readable CIFAR python pickle ({type(err).__name__}: {err})") \
            from err


def read_cifar_batches(paths: list[Path], label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate CIFAR python batches.

    Each file holds a dict with ``b'data'`` uint8 ``[n, 3072]`` and the label
    list under ``label_key`` (``b'labels'`` for CIFAR-10, ``b'fine_labels'``
    for CIFAR-100). Returns images uint8 ``[N, 3, 32, 32]`` and labels int64
    ``[N]`` with ``N = sum(n)``, in file order.
    """
    all_images, all_labels = [], []
    for path in paths:
        batch = _load_pickle(path)
        if not isinstance(batch, dict):
            raise DatasetFormatError(f"{path}: expected a dict of arrays, got {type(batch).__name__}")
        if b"data" not in batch or label_key not in batch:
            raise DatasetFormatError(f"{path}: expected keys b'data' and {label_key!r}, "
                                     f"got {sorted(k for k in batch if isinstance(k, bytes))}")
        data = batch[b"data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            described = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                         else type(data).__name__)
            raise DatasetFormatError(f"{path}: b'data' must be a uint8 [N, 3072] array, got {described}")
        try:
            labels = np.asarray(batch[label_key], dtype=np.int64)
        except (TypeError, ValueError) as err:
            raise DatasetFormatError(f"{path}: {label_key!r} is not a list of integers ({err})") from err
        if labels.ndim != 1:
            raise DatasetFormatError(f"{path}: {label_key!r} must be 1-D [N], got shape {labels.shape}")
        _check_count(data.shape[0], labels.shape[0], str(path))
        _check_labels(labels, num_classes, path)
        all_images.append(data.reshape(-1, 3, 32, 32))
        all_labels.append(labels)
    return np.ascontiguousarray(np.concatenate(all_images)), np.concatenate(all_labels)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN ``*_32x32.mat`` file (MATLAB v5, read with ``scipy.io.loadmat``).

    ``X`` uint8 ``[32, 32, 3, N]`` becomes images ``[N, 3, 32, 32]``;
    ``y`` ``[N, 1]`` in 1..10 becomes labels int64 ``[N]`` with 10 mapped to 0.
    """
    from scipy.io import loadmat  # scipy is only needed for SVHN

    path = Path(path)
    with path.open("rb") as file:
        try:
            mat = loadmat(file, variable_names=("X", "y"))
        except Exception as err:  # scipy raises ValueError, TypeError, MatReadError, ... on corrupt input
            raise DatasetFormatError(f"{path}: not a readable MATLAB v5 .mat file "
                                     f"({type(err).__name__}: {err})") from err
    if "X" not in mat or "y" not in mat:
        raise DatasetFormatError(f"{path}: expected variables X and y, found {sorted(k for k in mat if k[0] != '_')}")
    images, y = mat["X"], mat["y"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DatasetFormatError(f"{path}: X must be uint8 [32, 32, 3, N], got {images.dtype} {images.shape}")
    if y.ndim != 2 or y.shape[1] != 1 or not np.issubdtype(y.dtype, np.number):
        raise DatasetFormatError(f"{path}: y must be a numeric [N, 1] array, got {y.dtype} {y.shape}")
    _check_count(images.shape[3], y.shape[0], str(path))
    labels = y[:, 0].astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10 or not np.array_equal(labels, y[:, 0])):
        raise DatasetFormatError(f"{path}: y must hold integer digits 1..10 (10 meaning 0), "
                                 f"got values in [{y.min()}, {y.max()}]")
    labels[labels == 10] = 0
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


def _check_count(n_images: int, n_labels: int, where: str) -> None:
    if n_images != n_labels:
        raise DatasetFormatError(f"{where}: {n_images} images but {n_labels} labels")


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(f"{path}: labels must lie in [0, {num_classes}), "
                                 f"got values in [{labels.min()}, {labels.max()}]")
