"""Writers of small files in the datasets' standard formats, shared by the tests."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 00 00 08 <ndim>, big-endian int32 dims, raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_pickle(path: Path, obj: object, numpy1: bool = False) -> None:
    """Protocol-2 pickle, as the CIFAR files are; ``numpy1`` spells numpy's globals as numpy 1 did
    (``numpy.core.multiarray``), like the original files."""
    data = pickle.dumps(obj, protocol=2)
    if numpy1:
        assert b"numpy._core.multiarray" in data
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(data)
