"""memdisc.pictures: the picture of one online batch (clean, received, difference, trained on).

Unit tests build pictures from synthetic batches with known perturbations (grayscale and RGB) and
compare the fallback with torchvision where torchvision imports; end-to-end tests run tiny online
runs (the tiny Fashion-MNIST-format data of tests/conftest.py, 32-sample batches, a few steps, and
one tiny RGB CIFAR-format run) and decode the PNG they wrote.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import memdisc.pictures as pictures
from formats import make_cifar10
from memdisc.attacks import AccumulativeAttack, AttackConfig
from memdisc.data import BatchStream
from memdisc.defenses import DSCConfig
from memdisc.pictures import PICTURE_NAME, ROWS, batch_canvas, encode_png, write_batch_picture
from memdisc.training.online import OnlineConfig, run_online
from memdisc.training.supervised import BurninConfig, run_burnin

EPS = 0.2
GAIN = 0.5 / EPS


def decode(png: bytes | Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of a PNG (bytes or file)."""
    data = png.read_bytes() if isinstance(png, Path) else png
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im).copy()


def tile(pixels: np.ndarray, layout: dict, row: int | str, col: int) -> np.ndarray:
    """The pixels ``[h, w, 3]`` of one tile (row: index or name from ``ROWS``)."""
    row = ROWS.index(row) if isinstance(row, str) else row
    (th, tw), (x0, y0), (py, px) = layout["tile"], layout["origin"], layout["pitch"]
    top, left = y0 + row * py, x0 + col * px
    return pixels[top:top + th, left:left + tw]


def run_layout(pixels: np.ndarray, side: int, columns: int = 8) -> dict:
    """The tile geometry of a picture an online run wrote (images ``side`` x ``side``): the grid
    fills the bottom right corner, under the header and right of the labels."""
    th = pictures.MIN_TILE if pictures.MIN_TILE % side == 0 else side * -(-pictures.MIN_TILE // side)
    pitch = th + pictures.PADDING
    return {"tile": [th, th], "pitch": [pitch, pitch],
            "origin": [pixels.shape[1] - columns * pitch, pixels.shape[0] - len(ROWS) * pitch]}


def as_pixels(image: torch.Tensor, size: int) -> np.ndarray:
    """``[C, h, w]`` floats in [0, 1] -> the uint8 ``[size, size, 3]`` tile the picture shows (nearest)."""
    k = size // image.shape[-1]
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    big = image.repeat_interleave(k, -2).repeat_interleave(k, -1)
    return big.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


def batches(channels: int, n: int = 8, side: int = 28, seed: int = 0):
    """A clean batch in [0.3, 0.7], received = clean + EPS on the left half and - EPS on the right
    half of channel 0, and a trained-on batch = received - 0.1 on every pixel of the even rows."""
    g = torch.Generator().manual_seed(seed)
    clean = 0.3 + 0.4 * torch.rand(n, channels, side, side, generator=g)
    received = clean.clone()
    received[:, 0, :, :side // 2] += EPS
    received[:, 0, :, side // 2:] -= EPS
    trained = received.clone()
    trained[::2] -= 0.1
    return clean, received, trained


# --- fallback against torchvision -----------------------------------------------------------------

@pytest.mark.parametrize("shape, nrow, padding, pad_value", [
    ((1, 1, 5, 7), 8, 2, 0.0), ((5, 1, 28, 28), 8, 2, 1.0), ((13, 3, 9, 11), 4, 3, 0.25),
    ((40, 3, 32, 32), 8, 2, 1.0), ((3, 3, 4, 4), 8, 0, 0.0)])
def test_fallback_make_grid_equals_torchvision(shape, nrow, padding, pad_value):
    utils = pytest.importorskip("torchvision.utils")
    tiles = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    expected = utils.make_grid(tiles, nrow=nrow, padding=padding, pad_value=pad_value)
    got = pictures.make_grid(tiles, nrow=nrow, padding=padding, pad_value=pad_value)
    assert got.shape == expected.shape and torch.equal(got, expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_fallback_and_torchvision_write_identical_pixels(channels, tmp_path):
    pytest.importorskip("torchvision.utils")
    clean, received, trained = batches(channels, n=6, side=32)
    poisoned = torch.tensor([True, False, True, True, False, True])
    out = {}
    for backend in ("torchvision", "fallback"):
        out[backend] = write_batch_picture(tmp_path / f"{backend}.png", clean, received, trained, poisoned,
                                           eps=EPS, title="a title", backend=backend)
        assert out[backend]["backend"] == backend
    assert decode(tmp_path / "torchvision.png").tobytes() == decode(tmp_path / "fallback.png").tobytes()
    same = {k: v for k, v in out["torchvision"].items() if k not in ("backend", "file")}
    assert same == {k: v for k, v in out["fallback"].items() if k not in ("backend", "file")}
    # on one canvas the two encoders also agree, byte for byte (both are Pillow's PNG writer)
    canvas, _ = batch_canvas(clean, received, trained, gain=GAIN, backend="fallback")
    assert encode_png(canvas, "torchvision") == encode_png(canvas, "fallback")


def test_the_auto_backend_is_torchvision_exactly_where_it_imports():
    try:
        import torchvision.utils  # noqa: F401
        expected = "torchvision"
    except Exception:
        expected = "fallback"
    clean, received, trained = batches(1, n=2)
    assert batch_canvas(clean, received, trained, gain=GAIN)[1]["backend"] == expected


# --- what the picture shows --------------------------------------------------------------------------

@pytest.mark.parametrize("channels, side", [(1, 28), (3, 32)])
def test_every_row_shows_its_batch_and_the_difference_rows_show_the_perturbation(channels, side, tmp_path):
    clean, received, trained = batches(channels, side=side)
    poisoned = torch.ones(8, dtype=torch.bool)
    path = tmp_path / "p.png"
    info = write_batch_picture(path, clean, received, trained, poisoned, eps=EPS, title="title line",
                               backend="fallback")
    pixels = decode(path)
    th, tw = info["tile"]
    assert th == tw == 3 * side and info["gain"] == GAIN and info["batch_rows"] == list(range(8))
    x0, y0 = info["origin"]
    assert pixels.shape == (y0 + 5 * info["pitch"][0], x0 + 8 * info["pitch"][1], 3)
    half = tw // 2
    for col in range(8):
        for row, image in (("clean", clean), ("received", received), ("trained on", trained)):
            assert np.array_equal(tile(pixels, info, row, col), as_pixels(image[col], th)), (row, col)
        diff = tile(pixels, info, "received - clean", col).astype(int)
        # channel 0 moved by +EPS on the left half (white), -EPS on the right half (black); others unmoved
        assert (diff[:, :half, 0] == 255).all() and (diff[:, half:, 0] == 0).all()
        if channels == 3:
            assert (diff[..., 1:] == 128).all()
        else:  # grayscale is drawn as gray RGB
            assert (diff == diff[..., :1]).all()
        correction = tile(pixels, info, "trained on - received", col).astype(int)
        expected = round(255 * (0.5 - GAIN * 0.1)) if col % 2 == 0 else 128
        assert (np.abs(correction - expected) <= 1).all(), col
    assert info["labels"][3].startswith("trained on\n(corrected)")


def test_an_uncorrected_batch_has_a_gray_correction_row_and_says_so(tmp_path):
    clean, received, _ = batches(3, n=4)
    info = write_batch_picture(tmp_path / "p.png", clean, received, received, torch.ones(4, dtype=torch.bool),
                               eps=EPS, backend="fallback")
    pixels = decode(tmp_path / "p.png")
    for col in range(4):
        assert (tile(pixels, info, "trained on - received", col) == 128).all()
    assert info["labels"][3] == "trained on\n(= received)"


def test_a_header_wider_than_a_small_grid_widens_the_labels_not_the_grid():
    clean, received, trained = batches(1, n=2)
    title = "a header line much wider than two tiles and their labels, " * 3
    canvas, layout = batch_canvas(clean, received, trained, gain=GAIN, title=title, backend="fallback")
    (x0, y0), (py, px) = layout["origin"], layout["pitch"]
    assert canvas.shape[1:] == (y0 + len(ROWS) * py, x0 + 2 * px)
    assert x0 > 200 and (canvas[:, :y0, -pictures.MARGIN:] == 1.0).all()  # the text ends inside the canvas


def test_poisoned_rows_come_first_then_clean_ones():
    poisoned = torch.tensor([False, True, False, True, True, False, False, False, False, True])
    assert pictures.pick_samples(poisoned).tolist() == [1, 3, 4, 9, 0, 2, 5, 6]
    assert pictures.pick_samples(poisoned[:3], 8).tolist() == [1, 0, 2]


def test_bad_inputs_are_errors_and_the_safe_writer_only_warns(tmp_path):
    clean, received, trained = batches(1, n=2)
    with pytest.raises(ValueError, match="clean/received/trained"):
        batch_canvas(clean, received[:1], trained, gain=GAIN)
    with pytest.raises(ValueError, match="gain"):
        batch_canvas(clean, received, trained, gain=0.0)
    with pytest.raises(ValueError, match="backend"):
        encode_png(torch.zeros(3, 2, 2), "matplotlib")
    path = tmp_path / "p.png"
    with pytest.warns(RuntimeWarning, match=rf"{path}: the batch picture was not written \(ValueError"):
        assert pictures.write_batch_picture_safely(path, clean, received[:1], trained, torch.ones(2, dtype=bool),
                                                   eps=EPS) is None
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# --- online runs -------------------------------------------------------------------------------------

BATCH = 32


@pytest.fixture(scope="module")
def burnin_dir(tiny_fashion_mnist, single_thread, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pictures") / "burnin"
    run_burnin(BurninConfig(data_dir=str(tiny_fashion_mnist), epochs=2, device="cpu", out=str(out)), progress=False)
    return out


def online_cfg(burnin: Path, out: Path, **kwargs) -> OnlineConfig:
    values = dict(burnin=str(burnin), history_epochs=[1], batch_size=BATCH, max_steps=3, eval_size=100,
                  val_size=32, heldout_size=64, checkpoint_every=1, device="cpu", out=str(out))
    values.update(kwargs)
    return OnlineConfig(**values)


def run_capturing_step0(cfg: OnlineConfig, monkeypatch) -> tuple[dict, dict]:
    """``run_online(cfg)`` and the attack's first call: clean x, poisoned x, the poisoned mask."""
    seen = {}
    poison = AccumulativeAttack.poison

    def capturing(self, model, x, y, step):
        batch = poison(self, model, x, y, step)
        if step == 0:
            seen.update(clean=x.clone(), received=batch.x.clone(), poisoned=batch.poisoned.clone())
        return batch

    with monkeypatch.context() as mp:
        mp.setattr(AccumulativeAttack, "poison", capturing)
        result = run_online(cfg, progress=False)
    return result, seen


def test_an_online_run_pictures_its_first_batch_with_the_attack_s_perturbation(burnin_dir, monkeypatch):
    cfg = online_cfg(burnin_dir, burnin_dir.parent / "run-ST", defense="ST", attack=AttackConfig(poison_scale=0.75))
    result, seen = run_capturing_step0(cfg, monkeypatch)
    path = Path(cfg.out) / PICTURE_NAME
    assert result.picture == {"file": PICTURE_NAME, "step": 0, "corrected": False} and path.is_file()
    assert json.loads((Path(cfg.out) / "result.json").read_text())["picture"] == result.picture
    pixels = decode(path)
    clean, received, poisoned = seen["clean"], seen["received"], seen["poisoned"]
    rows = pictures.pick_samples(poisoned)
    assert poisoned[rows].all() and len(rows) == 8  # 24 of 32 rows poisoned: all 8 shown are
    layout = run_layout(pixels, 28)
    th = layout["tile"][0]
    assert th == 84
    moved = 0
    for col, r in enumerate(rows.tolist()):
        assert np.array_equal(tile(pixels, layout, "clean", col), as_pixels(clean[r], th))
        assert np.array_equal(tile(pixels, layout, "received", col), as_pixels(received[r], th))
        assert np.array_equal(tile(pixels, layout, "trained on", col), as_pixels(received[r], th))  # ST
        expected = as_pixels((0.5 + GAIN * (received[r] - clean[r])).clamp(0, 1), th).astype(int)
        diff = tile(pixels, layout, "received - clean", col).astype(int)
        assert np.abs(diff - expected).max() <= 1
        assert (tile(pixels, layout, "trained on - received", col) == 128).all()
        moved += int((diff != 128).any())
    assert moved == 8  # the attack is visible in every poisoned column


@pytest.mark.parametrize("name, kwargs", [("control", dict(control=True)),
                                          ("DSC-batch", dict(defense="DSC-batch", stop_error=1.0))])
def test_the_control_and_a_dsc_run_write_a_picture(burnin_dir, name, kwargs):
    cfg = online_cfg(burnin_dir, burnin_dir.parent / f"run-{name}", max_steps=1, **kwargs)
    result = run_online(cfg, progress=False)
    assert result.picture["file"] == PICTURE_NAME
    pixels = decode(Path(cfg.out) / PICTURE_NAME)
    layout = run_layout(pixels, 28)
    diff = np.stack([tile(pixels, layout, "received - clean", col) for col in range(8)])
    if cfg.control:  # nothing received differs from the clean batch: a gray difference row
        assert (diff == 128).all()
    else:
        assert (diff != 128).any()


# DSC-batch against the start model itself (history epoch 2 = the burn-in's last) with a fixed threshold just
# above 0: the discrepancy is exactly 0 at step 0, so the first batch passes through and the second is corrected.
LATE_CORRECTION = dict(defense="DSC-batch", history_epochs=[2], dsc=DSCConfig(threshold="fixed", tau0=1e-9),
                       stop_error=1.0, max_steps=4)


def test_the_picture_moves_to_the_first_batch_the_defence_changed(burnin_dir):
    cfg = online_cfg(burnin_dir, burnin_dir.parent / "run-late", **LATE_CORRECTION)
    result = run_online(cfg, progress=False)
    fractions = result.curve["corrected_fraction"]
    assert fractions[0] == 0.0 and fractions[1] > 0.0
    assert result.picture == {"file": PICTURE_NAME, "step": 1, "corrected": True}
    pixels = decode(Path(cfg.out) / PICTURE_NAME)
    layout = run_layout(pixels, 28)
    correction = np.stack([tile(pixels, layout, "trained on - received", col) for col in range(8)])
    assert (correction != 128).any()


def _interrupted(cfg: OnlineConfig, at: int, monkeypatch) -> None:
    """Run cfg until it asks for the batch of step ``at``, then stop it as a kill would (KeyboardInterrupt)."""
    batch_at = BatchStream.batch_at

    def interrupt(self, step):
        if step == at:
            raise KeyboardInterrupt
        return batch_at(self, step)

    with monkeypatch.context() as mp:
        mp.setattr(BatchStream, "batch_at", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_online(cfg, progress=False)


@pytest.mark.slow
def test_a_resumed_run_writes_the_same_picture(burnin_dir, monkeypatch):
    reference = online_cfg(burnin_dir, burnin_dir.parent / "run-reference", **LATE_CORRECTION)
    expected_result = run_online(reference, progress=False).picture
    expected = (Path(reference.out) / PICTURE_NAME).read_bytes()

    # interrupted after the pictured step (1): resuming does not touch the picture
    cfg = online_cfg(burnin_dir, burnin_dir.parent / "run-after", **LATE_CORRECTION)
    _interrupted(cfg, 3, monkeypatch)
    path = Path(cfg.out) / PICTURE_NAME
    assert path.read_bytes() == expected
    written = path.stat().st_mtime_ns
    assert run_online(cfg, progress=False).picture == expected_result
    assert path.read_bytes() == expected and path.stat().st_mtime_ns == written

    # interrupted before it: the picture of step 0 until the resumed run reaches step 1
    cfg = online_cfg(burnin_dir, burnin_dir.parent / "run-before", **LATE_CORRECTION)
    _interrupted(cfg, 1, monkeypatch)
    path = Path(cfg.out) / PICTURE_NAME
    assert path.read_bytes() != expected
    assert run_online(cfg, progress=False).picture == expected_result
    assert path.read_bytes() == expected

    # killed before its first checkpoint: every step replays, to the same picture
    cfg = online_cfg(burnin_dir, burnin_dir.parent / "run-replayed", **LATE_CORRECTION)
    _interrupted(cfg, 3, monkeypatch)
    (Path(cfg.out) / "state.pt").unlink()
    (Path(cfg.out) / PICTURE_NAME).write_bytes(b"stale")
    assert run_online(cfg, progress=False).picture == expected_result
    assert (Path(cfg.out) / PICTURE_NAME).read_bytes() == expected


def test_a_failing_picture_does_not_stop_the_run(burnin_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pictures, "write_batch_picture", broken)
    cfg = online_cfg(burnin_dir, burnin_dir.parent / "run-broken", control=True, max_steps=1)
    with pytest.warns(RuntimeWarning, match="the batch picture was not written"):
        result = run_online(cfg, progress=False)
    assert result.picture == {"file": None, "step": 0, "corrected": False} and result.steps_run == 1


def test_an_rgb_online_run_pictures_colour_images(single_thread, tmp_path):
    make_cifar10(tmp_path / "cifar-10-batches-py", per_batch=20, n_test=40)
    burnin = tmp_path / "burnin"
    run_burnin(BurninConfig(dataset="cifar10", data_dir=str(tmp_path), model="cnn", epochs=1, batch_size=50,
                            device="cpu", out=str(burnin)), progress=False)
    cfg = OnlineConfig(burnin=str(burnin), history_epochs=[1], batch_size=10, max_steps=1, eval_size=20,
                       val_size=10, heldout_size=10, stop_error=1.0, device="cpu", out=str(tmp_path / "run"))
    result = run_online(cfg, progress=False)
    pixels = decode(Path(cfg.out) / PICTURE_NAME)
    assert result.picture["file"] == PICTURE_NAME
    layout = run_layout(pixels, 32)
    assert layout["tile"] == [96, 96]
    clean = tile(pixels, layout, "clean", 0).astype(int)
    assert (clean[..., 0] != clean[..., 1]).any()  # colour, not gray
    assert (tile(pixels, layout, "received - clean", 0) != 128).any()
