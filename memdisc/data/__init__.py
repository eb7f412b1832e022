"""memdisc's data layer: datasets in memory (uint8, served as float32 in [0, 1]) and batch streams.

    ds = load_dataset("fashion-mnist", "train")          # ImageDataset, images uint8 [60000, 1, 28, 28]
    for x, y in iterate_minibatches(ds, 256, gen, augment=True): ...   # burn-in epochs
    stream = BatchStream(ds, 100, seed=0)                 # online phase: stream.batch_at(step)

Files are read from /usr/share/datasets/<name> or a user ``data_dir``; nothing is downloaded.
"""
from memdisc.data.datasets import (DATASETS, DEFAULT_DATA_ROOT, SPLITS, ImageDataset, check_dataset_files,
                                   load_dataset, mirror_ok)
from memdisc.data.readers import DatasetFormatError, DatasetNotFoundError
from memdisc.data.stream import BatchStream, augment_batch, iterate_minibatches

__all__ = ["DATASETS", "SPLITS", "DEFAULT_DATA_ROOT", "ImageDataset", "load_dataset", "check_dataset_files",
           "mirror_ok", "DatasetNotFoundError", "DatasetFormatError", "iterate_minibatches", "augment_batch", "BatchStream"]
