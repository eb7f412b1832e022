"""memdisc.data: file readers (every format, built small in tmp_path), errors, batches and streams."""
from __future__ import annotations

import gzip
import re
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from formats import idx_bytes, make_cifar10, make_cifar100, make_idx_dataset, make_svhn, write_pickle

import memdisc.data.datasets as datasets_module
from memdisc.data.stream import _generator as _stream_generator
from memdisc.data import (DATASETS, BatchStream, DatasetFormatError, DatasetNotFoundError, ImageDataset,
                          augment_batch, iterate_minibatches, load_dataset, mirror_ok)

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def index_dataset(n: int, shape=(1, 28, 28), num_classes: int = 10) -> ImageDataset:
    """Image i is filled with the value i (n <= 256), so x * 255 recovers the sample index."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, *shape).contiguous()
    return ImageDataset("toy", images, torch.arange(n) % num_classes, num_classes)


def sample_ids(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0, 0, 0] * 255).round().long()


# ----------------------------------------------------------------------------------------------------------
# Reading every format
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_round_trip(tmp_path, name, gz):
    arrays = make_idx_dataset(tmp_path, gz)
    for split, (images, labels) in arrays.items():
        ds = load_dataset(name, split, tmp_path)
        assert ds.name == name and ds.num_classes == 10 and len(ds) == len(labels)
        assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
        assert tuple(ds.images.shape) == (len(labels), 1, 28, 28) and ds.shape == (1, 28, 28)
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(ds.labels.numpy(), labels)


@pytest.mark.parametrize("name,sub", [("fashion-mnist", "fashion-mnist"), ("fashion-mnist", "FashionMNIST/raw"),
                                      ("mnist", "mnist"), ("mnist", "MNIST/raw")])
def test_idx_parent_dir(tmp_path, name, sub):
    arrays = make_idx_dataset(tmp_path / sub, gz=True)
    ds = load_dataset(name, "test", tmp_path)
    np.testing.assert_array_equal(ds.labels.numpy(), arrays["test"][1])


def test_default_dir_is_used_without_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_module, "DEFAULT_DATA_ROOT", tmp_path)
    arrays = make_idx_dataset(tmp_path / "mnist", gz=False)
    np.testing.assert_array_equal(load_dataset("mnist", "train").labels.numpy(), arrays["train"][1])


@pytest.mark.parametrize("point_at_parent", [True, False], ids=["parent", "folder"])
def test_cifar10_round_trip(tmp_path, point_at_parent):
    arrays = make_cifar10(tmp_path / "cifar-10-batches-py")
    for split, (data, labels) in arrays.items():
        ds = load_dataset("cifar10", split, tmp_path if point_at_parent else tmp_path / "cifar-10-batches-py")
        assert tuple(ds.images.shape) == (len(labels), 3, 32, 32) and ds.num_classes == 10
        assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
        # each row holds the R plane, then G, then B, each 32x32 row-major
        np.testing.assert_array_equal(ds.images[:, 1, 2, 5].numpy(), data[:, 1024 + 2 * 32 + 5])
        np.testing.assert_array_equal(ds.images.reshape(len(labels), -1).numpy(), data)
        np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert len(load_dataset("cifar10", "train", tmp_path)) == 15  # all five batches, in order (checked above)


def test_cifar100_uses_fine_labels(tmp_path):
    arrays = make_cifar100(tmp_path / "cifar-100-python")
    for split, (data, fine) in arrays.items():
        ds = load_dataset("cifar100", split, tmp_path)
        assert ds.num_classes == 100 and ds.shape == (3, 32, 32)
        np.testing.assert_array_equal(ds.images.reshape(len(fine), -1).numpy(), data)
        np.testing.assert_array_equal(ds.labels.numpy(), fine)


def test_svhn_round_trip_and_label_10_is_0(tmp_path):
    arrays = make_svhn(tmp_path / "svhn")
    for split, (x, y) in arrays.items():
        ds = load_dataset("svhn", split, tmp_path)
        n = x.shape[3]
        assert tuple(ds.images.shape) == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        np.testing.assert_array_equal(ds.images.numpy(), x.transpose(3, 2, 0, 1))  # [i, c, h, w] = X[h, w, c, i]
        np.testing.assert_array_equal(ds.labels.numpy(), np.where(y[:, 0] == 10, 0, y[:, 0]))
        assert ds.labels[0] == 0 and ds.labels[1] == 1 and ds.labels.dtype == torch.int64


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install "
                                                             "dataset-fashion-mnist)")
def test_real_fashion_mnist():
    start = time.perf_counter()
    train = load_dataset("fashion-mnist", "train")
    seconds = time.perf_counter() - start
    test = load_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.shape == test.shape == (1, 28, 28) and train.num_classes == 10
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    assert abs(train.images.float().mean().item() / 255 - 0.2860) < 1e-3  # the published pixel mean
    assert seconds < 5.0, f"loading 60k Fashion-MNIST images took {seconds:.2f} s"


# ----------------------------------------------------------------------------------------------------------
# Missing and corrupt files
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DATASETS)
def test_missing_dataset_names_path_and_remedy(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path))) as info:
        load_dataset(name, "train", tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert "--data-dir DIR" in str(info.value)


def test_missing_default_fashion_mnist_says_apt_get(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_module, "DEFAULT_DATA_ROOT", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", "test")
    assert str(tmp_path / "nowhere" / "fashion-mnist") in str(info.value)


def test_nonexistent_data_dir(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        load_dataset("cifar10", "test", tmp_path / "absent")


def test_incomplete_dataset_names_missing_file(tmp_path):
    make_idx_dataset(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", tmp_path)
    make_cifar10(tmp_path / "c")
    (tmp_path / "c" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", "train", tmp_path / "c")


def _corrupt_idx(folder: Path, how: str) -> Path:
    """Write valid MNIST files, then spoil the train file `how`; returns the spoiled file."""
    make_idx_dataset(folder, gz=False)
    images, labels = folder / "train-images-idx3-ubyte", folder / "train-labels-idx1-ubyte"
    raw = images.read_bytes()
    if how == "bad magic":
        images.write_bytes(b"\x00\x00\x0d\x03" + raw[4:])
    elif how == "truncated payload":
        images.write_bytes(raw[:-7])
    elif how == "extra bytes":
        images.write_bytes(raw + b"\x00")
    elif how == "truncated header":
        images.write_bytes(raw[:9])
    elif how == "empty file":
        images.write_bytes(b"")
    elif how == "images are 1-d":
        images.write_bytes(idx_bytes(np.zeros(12, np.uint8)))
    elif how == "bad gzip":
        images.unlink()
        images = folder / "train-images-idx3-ubyte.gz"
        images.write_bytes(b"this is not gzip data at all")
    elif how == "truncated gzip":
        images.unlink()
        images = folder / "train-images-idx3-ubyte.gz"
        images.write_bytes(gzip.compress(raw)[:-20])
    elif how == "count mismatch":
        labels.write_bytes(idx_bytes(np.zeros(11, np.uint8)))
        return labels
    elif how == "label out of range":
        labels.write_bytes(idx_bytes(np.full(12, 10, np.uint8)))
        return labels
    return images


@pytest.mark.parametrize("how", ["bad magic", "truncated payload", "extra bytes", "truncated header", "empty file",
                                 "images are 1-d", "bad gzip", "truncated gzip", "count mismatch",
                                 "label out of range"])
def test_corrupt_idx_raises_format_error(tmp_path, how):
    spoiled = _corrupt_idx(tmp_path, how)
    with pytest.raises(DatasetFormatError, match=re.escape(str(spoiled))) as info:
        load_dataset("mnist", "train", tmp_path)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("how", ["garbage", "truncated", "not a dict", "missing labels", "wrong data shape",
                                 "data not uint8", "count mismatch", "label out of range", "foreign global"])
def test_corrupt_cifar_raises_format_error(tmp_path, how):
    make_cifar10(tmp_path)
    target = tmp_path / "test_batch"
    good = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [1, 2, 3, 4]}
    if how == "garbage":
        target.write_bytes(b"\x80\x02garbage")
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:500])
    elif how == "not a dict":
        write_pickle(target, [1, 2, 3])
    elif how == "missing labels":
        write_pickle(target, {b"data": good[b"data"]})
    elif how == "wrong data shape":
        write_pickle(target, {**good, b"data": np.zeros((4, 3000), np.uint8)})
    elif how == "data not uint8":
        write_pickle(target, {**good, b"data": np.zeros((4, 3072), np.float32)})
    elif how == "count mismatch":
        write_pickle(target, {**good, b"labels": [1, 2, 3]})
    elif how == "label out of range":
        write_pickle(target, {**good, b"labels": [1, 2, 3, 10]})
    elif how == "foreign global":  # a pickle that would call os.getcwd() when loaded must be refused
        target.write_bytes(b"cos\ngetcwd\n(tR.")
    with pytest.raises(DatasetFormatError, match=re.escape(str(target))) as info:
        load_dataset("cifar10", "test", tmp_path)
    if how == "foreign global":
        assert "refusing to load global os.getcwd" in str(info.value)


@pytest.mark.parametrize("how", ["garbage", "truncated", "missing y", "wrong X shape", "count mismatch",
                                 "label 0", "label 11"])
def test_corrupt_svhn_raises_format_error(tmp_path, how):
    make_svhn(tmp_path)
    target = tmp_path / "test_32x32.mat"
    x, y = np.zeros((32, 32, 3, 3), np.uint8), np.array([[1], [2], [10]], np.uint8)
    if how == "garbage":
        target.write_bytes(b"not a mat file" * 20)
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:3000])
    elif how == "missing y":
        scipy.io.savemat(target, {"X": x})
    elif how == "wrong X shape":
        scipy.io.savemat(target, {"X": np.zeros((32, 32, 1, 3), np.uint8), "y": y})
    elif how == "count mismatch":
        scipy.io.savemat(target, {"X": x, "y": y[:2]})
    elif how == "label 0":
        scipy.io.savemat(target, {"X": x, "y": np.array([[0], [1], [2]], np.uint8)})
    elif how == "label 11":
        scipy.io.savemat(target, {"X": x, "y": np.array([[11], [1], [2]], np.uint8)})
    with pytest.raises(DatasetFormatError, match=re.escape(str(target))):
        load_dataset("svhn", "test", tmp_path)


def test_bad_name_and_split():
    with pytest.raises(ValueError, match="name: unknown dataset 'imagenet'.*fashion-mnist, mnist, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split: expected one of train, test, got 'val'"):
        load_dataset("mnist", "val")


# ----------------------------------------------------------------------------------------------------------
# ImageDataset
# ----------------------------------------------------------------------------------------------------------

def test_batch_subset_tensors_serve_float_in_unit_range():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=gen)
    images[0].fill_(255)
    images[1].fill_(0)
    ds = ImageDataset("toy", images, torch.arange(20) % 4, 4)
    index = torch.tensor([3, 0, 17, 1, 3])
    x, y = ds.batch(index)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and tuple(x.shape) == (5, 3, 8, 8)
    torch.testing.assert_close(x, images[index].double().div(255).float(), rtol=0, atol=0)
    assert x[1].min() == 1.0 and x[3].max() == 0.0
    assert y.tolist() == [3, 0, 1, 1, 3]
    sub = ds.subset(index)
    assert len(sub) == 5 and sub.num_classes == 4 and sub.name == "toy"
    torch.testing.assert_close(sub.tensors()[0], x, rtol=0, atol=0)
    assert sub.tensors()[1].tolist() == y.tolist()
    all_x, all_y = ds.tensors()
    assert tuple(all_x.shape) == (20, 3, 8, 8) and float(all_x.min()) >= 0 and float(all_x.max()) <= 1
    assert all_y is ds.labels
    all_x.zero_()
    assert ds.images[0].max() == 255  # tensors() returned a new float tensor, not a view of the data
    assert "n=20" in repr(ds) and "shape=(3, 8, 8)" in repr(ds)


@pytest.mark.parametrize("images,labels,num_classes,argument", [
    (torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), 2, "images"),
    (torch.zeros(4, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 2, "images"),
    (torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.int32), 2, "labels"),
    (torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), 2, "labels"),
    (torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]), 2, "labels"),
    (torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 0, "num_classes"),
])
def test_image_dataset_validates(images, labels, num_classes, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        ImageDataset("bad", images, labels, num_classes)


def test_batch_rejects_non_long_index():
    ds = index_dataset(10)
    with pytest.raises(ValueError, match="^index:"):
        ds.batch(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="^index:"):
        ds.subset(torch.tensor([[1, 2]]))


# ----------------------------------------------------------------------------------------------------------
# iterate_minibatches and augmentation
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,batch_size,drop_last", [(50, 8, False), (50, 8, True), (48, 8, True), (50, 50, False)])
def test_epoch_covers_every_sample_once(n, batch_size, drop_last):
    ds = index_dataset(n)
    batches = list(iterate_minibatches(ds, batch_size, torch.Generator().manual_seed(1), drop_last=drop_last))
    ids = torch.cat([sample_ids(x) for x, _ in batches])
    sizes = [len(y) for _, y in batches]
    if drop_last:
        assert sizes == [batch_size] * (n // batch_size)
        assert len(set(ids.tolist())) == len(ids) == n - n % batch_size
    else:
        assert sorted(ids.tolist()) == list(range(n)) and sum(sizes) == n
    for x, y in batches:
        assert y.tolist() == (sample_ids(x) % 10).tolist() and x.dtype == torch.float32
    if n > batch_size:
        assert ids.tolist() != sorted(ids.tolist())  # shuffled


def test_epochs_reproducible_from_generator_and_differ_between_epochs():
    ds = index_dataset(40)

    def epoch(gen):
        return torch.cat([sample_ids(x) for x, _ in iterate_minibatches(ds, 7, gen)])

    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first_a, first_b = epoch(gen_a), epoch(gen_b)
    assert torch.equal(first_a, first_b)
    assert not torch.equal(first_a, epoch(gen_a))  # the generator moved on: a new order next epoch


def _augment_oracle(x: torch.Tensor, gen: torch.Generator, pad: int, flip: bool = True) -> torch.Tensor:
    """Per-sample loop: same draws as augment_batch (offsets [2, b], then coins [b] if flip), explicit slicing."""
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    for i in range(b):
        dy, dx = int(offsets[0, i]), int(offsets[1, i])
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@pytest.mark.parametrize("shape,pad", [((1, 28, 28), 2), ((3, 32, 32), 4), ((2, 9, 13), 2)])
def test_augment_matches_per_sample_oracle(shape, pad):
    x = torch.rand(17, *shape, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, torch.Generator().manual_seed(5))
    expected = _augment_oracle(x, torch.Generator().manual_seed(5), pad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)


def test_augment_without_flip_only_crops():
    x = torch.rand(17, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, torch.Generator().manual_seed(5), flip=False)
    torch.testing.assert_close(out, _augment_oracle(x, torch.Generator().manual_seed(5), 2, flip=False), rtol=0, atol=0)
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(5)))  # the flips did something


@pytest.mark.parametrize("name,expected", [("fashion-mnist", True), ("cifar10", True), ("cifar100", True),
                                           ("mnist", False), ("svhn", False)])
def test_digit_sets_are_never_mirrored(name, expected):
    assert mirror_ok(name) is expected


def test_mirror_ok_names_the_argument():
    with pytest.raises(ValueError, match="dataset: expected one of"):
        mirror_ok("imagenet")


def test_augmented_epoch_reproducible_and_in_range():
    gen = torch.Generator().manual_seed(0)
    ds = ImageDataset("toy", torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=gen),
                      torch.arange(30) % 10, 10)

    def epoch(seed):
        return list(iterate_minibatches(ds, 8, torch.Generator().manual_seed(seed), augment=True))

    a, b, c = epoch(1), epoch(1), epoch(2)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape[1:] == (3, 32, 32) and xa.dtype == torch.float32
        assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    plain = list(iterate_minibatches(ds, 8, torch.Generator().manual_seed(1)))
    assert [y.tolist() for _, y in plain][0] == a[0][1].tolist()  # same order; only pixels change
    assert not torch.equal(plain[0][0], a[0][0])


def test_iterate_minibatches_validates():
    ds, gen = index_dataset(10), torch.Generator()
    for bad in (0, 11, 2.5, True):
        with pytest.raises(ValueError, match="^batch_size:"):
            next(iterate_minibatches(ds, bad, gen))
    with pytest.raises(ValueError, match="^generator:"):
        next(iterate_minibatches(ds, 2, 0))
    with pytest.raises(ValueError, match="^dataset:"):
        next(iterate_minibatches([1, 2], 2, gen))
    with pytest.raises(ValueError, match="^x:"):
        augment_batch(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), gen)


# ----------------------------------------------------------------------------------------------------------
# BatchStream
# ----------------------------------------------------------------------------------------------------------

def test_stream_batches_match_dataset():
    ds = index_dataset(100)
    x, y, index = BatchStream(ds, 10, seed=0).batch_at(3)
    assert tuple(x.shape) == (10, 1, 28, 28) and x.dtype == torch.float32
    assert index.dtype == torch.int64 and sample_ids(x).tolist() == index.tolist()
    assert y.tolist() == (index % 10).tolist()


def test_stream_reproducible_and_seed_dependent():
    ds = index_dataset(100)
    a, b, c = BatchStream(ds, 10, seed=7), BatchStream(ds, 10, seed=7), BatchStream(ds, 10, seed=8)
    steps = [0, 1, 9, 10, 55, 123456]
    assert all(torch.equal(a.indices_at(s), b.indices_at(s)) for s in steps)
    assert not all(torch.equal(a.indices_at(s), c.indices_at(s)) for s in steps)


@pytest.mark.parametrize("n,batch_size", [(100, 10), (103, 10), (50, 50)])
def test_stream_fresh_batches_no_repeat_within_pass(n, batch_size):
    stream = BatchStream(index_dataset(n), batch_size, seed=1)
    per_pass = n // batch_size
    assert stream.batches_per_pass == per_pass
    passes = []
    for q in range(3):
        ids = torch.cat([stream.indices_at(q * per_pass + k) for k in range(per_pass)])
        assert len(set(ids.tolist())) == len(ids) == per_pass * batch_size
        passes.append(ids)
    assert not torch.equal(passes[0], passes[1]) and not torch.equal(passes[1], passes[2])
    consecutive = [stream.indices_at(s) for s in range(2 * per_pass + 1)]
    assert all(not torch.equal(u, v) for u, v in zip(consecutive, consecutive[1:]))


def test_stream_step_independent_of_history():
    ds = index_dataset(60)
    walked = BatchStream(ds, 7, seed=2)
    history = [idx for _, (_, _, idx) in zip(range(40), walked)]  # iterate over several passes
    jumped = BatchStream(ds, 7, seed=2)
    for step in (39, 3, 17, 0, 39, 8):
        assert torch.equal(jumped.batch_at(step)[2], history[step])
        assert torch.equal(walked.batch_at(step)[0], jumped.batch_at(step)[0])
    assert torch.equal(jumped.batch_at(10 ** 9)[2], BatchStream(ds, 7, seed=2).batch_at(10 ** 9)[2])


def test_stream_repeat_first_is_the_seed_behaviour():
    ds = index_dataset(100)
    stream = BatchStream(ds, 10, seed=3, repeat_first=True)
    assert stream.batches_per_pass == 1
    for step, (x, y, index) in zip(range(5), stream):
        assert index.tolist() == list(range(10))
        torch.testing.assert_close(x, ds.images[:10].float() / 255, rtol=0, atol=0)
        assert torch.equal(y, ds.labels[:10])
    assert stream.batch_at(10 ** 6)[2].tolist() == list(range(10))


def test_stream_augment_reaugments_every_step_and_resumes_exactly():
    """The seed's loader re-augments every batch it yields, the repeated first batch too; the
    augmentation of step s is a function of (seed, s) alone, so a resumed stream gives the same batch."""
    ds = index_dataset(100)
    stream = BatchStream(ds, 10, seed=3, repeat_first=True, augment=True)
    plain = BatchStream(ds, 10, seed=3, repeat_first=True).batch_at(0)[0]
    batches = [stream.batch_at(step)[0] for step in range(3)]
    assert not torch.equal(batches[0], batches[1]) and not torch.equal(batches[0], plain)
    for step in (2, 0, 1):
        assert torch.equal(BatchStream(ds, 10, seed=3, repeat_first=True, augment=True).batch_at(step)[0],
                           batches[step])
    unflipped = BatchStream(ds, 10, seed=3, augment=True, flip=False).batch_at(0)[0]
    gen = _stream_generator(3, 1, 0)
    assert torch.equal(unflipped, augment_batch(BatchStream(ds, 10, seed=3).batch_at(0)[0], gen, flip=False))


@pytest.mark.parametrize("kwargs,argument", [
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 11}, "batch_size"), ({"batch_size": 2.0}, "batch_size"),
    ({"seed": -1}, "seed"), ({"seed": "0"}, "seed"), ({"dataset": None}, "dataset"),
])
def test_stream_validates(kwargs, argument):
    args = {"dataset": index_dataset(10), "batch_size": 5, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=f"^{argument}:"):
        BatchStream(**args)


def test_stream_rejects_negative_step():
    stream = BatchStream(index_dataset(10), 5, seed=0)
    with pytest.raises(ValueError, match="^step:"):
        stream.batch_at(-1)
    assert torch.equal(stream.batch_at(np.int64(4))[2], stream.batch_at(4)[2])  # numpy ints are accepted
