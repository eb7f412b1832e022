"""Pictures of what the attack did to one online batch, and what the defence trained on.

Every online run (``memdisc.training.online``) writes ``OUT/attack_batch.png`` (:data:`PICTURE_NAME`)
at its first online step, and replaces it once, at the first step whose batch the defence
changed (DSC often passes the first batches through; ST, GC and the control never change one,
so theirs stays the first batch).  The choice is a function of the run's seeded trajectory and
is kept in its resumable state, so a resumed run writes the same picture: a step is replayed
only from the last checkpoint, to the same batch and the same pixels.  Layout (white
background)::

    header: defence, attack, seed, step, which batch rows are shown, the difference scale
    +---------------------+---- N sample columns (N = min(8, B)), poisoned rows first ----+
    | clean               |  the stream's batch as drawn                                    |
    | received            |  what the attacker sent (= clean for the no-attack control)     |
    | received - clean    |  0.5 + gain * (received - clean), per channel: gray = 0         |
    | trained on          |  what the defence trained on (= received for ST, GC)            |
    | trained on -        |  0.5 + gain * (trained on - received): the correction          |
    |   received          |                                                                 |
    +---------------------+-----------------------------------------------------------------+

The grid fills the bottom right corner: the label column is widened when the header is wider.

``gain = 0.5 / eps`` (eps: the attack's L-inf radius), so a pixel moved by +eps is white and
by -eps black; larger moves (a correction with a wider radius) are clipped.  For the
accumulative attack the perturbation itself is the trigger-carrying signal: the third row.
Tiles are the images magnified by an integer factor (nearest neighbour; 28 x 28 and
32 x 32 images become 84 x 84 and 96 x 96), grayscale images are drawn as gray RGB.

The tile grid is ``torchvision.utils.make_grid`` and the file ``torchvision.utils.save_image``
when torchvision imports; otherwise :func:`make_grid` and :func:`save_png` here, which give
the same pixels (tested).  The row labels and the header are drawn with Pillow (a dependency
of matplotlib and of torchvision) on both paths.  Writing costs a few milliseconds, at most
twice per run; a failure is a warning, never the end of the run (:func:`write_batch_picture_safely`).
"""
from __future__ import annotations

import functools
import io
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from memdisc.artifacts import atomic_write_bytes

__all__ = ["PICTURE_NAME", "ROWS", "BACKENDS", "pick_samples", "difference_tile", "make_grid",
           "save_png", "batch_canvas", "encode_png", "write_batch_picture", "write_batch_picture_safely"]

PICTURE_NAME = "attack_batch.png"
SAMPLES = 8
ROWS = ("clean", "received", "received - clean", "trained on", "trained on - received")
BACKENDS = ("auto", "torchvision", "fallback")

PADDING = 2          # make_grid's padding between tiles, px
PAD_VALUE = 1.0      # white: Fashion-MNIST images have black backgrounds
MIN_TILE = 84        # tiles are magnified by the smallest integer factor reaching this height
FONT_SIZE = 13
MARGIN = 8           # around the header and the labels, px
LINE = 16            # text line height, px


@functools.lru_cache(maxsize=1)
def _torchvision_utils():
    """``torchvision.utils`` or None where torchvision is missing or cannot import beside this torch."""
    try:
        import torchvision.utils
    except Exception:  # ImportError, or a binary built for another torch (RuntimeError, OSError)
        return None
    return torchvision.utils


def _backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    utils = None if backend == "fallback" else _torchvision_utils()
    if backend == "torchvision" and utils is None:
        raise ImportError("backend='torchvision': torchvision does not import here")
    return utils


def pick_samples(poisoned: torch.Tensor, n: int = SAMPLES) -> torch.Tensor:
    """``[min(n, B)]`` int64 batch rows to show: the poisoned rows in batch order, then clean ones.

    poisoned: ``[B]`` bool, True where the attacker perturbed the row.
    """
    poisoned = poisoned.detach().to("cpu", torch.bool)
    order = torch.cat([torch.nonzero(poisoned).flatten(), torch.nonzero(~poisoned).flatten()])
    return order[:min(n, poisoned.numel())]


def difference_tile(a: torch.Tensor, b: torch.Tensor, gain: float) -> torch.Tensor:
    """``clamp(0.5 + gain * (a - b), 0, 1)``: a signed difference as pixels, gray where equal."""
    return (0.5 + gain * (a - b)).clamp(0.0, 1.0)


def make_grid(tiles: torch.Tensor, nrow: int = 8, padding: int = PADDING, pad_value: float = 0.0) -> torch.Tensor:
    """torchvision's ``make_grid`` without normalisation: ``[N, C, H, W]`` -> ``[3 or C, rows*(H+p)+p,
    cols*(W+p)+p]``, tiles row-major, 1-channel images repeated to 3 channels."""
    if tiles.dim() != 4:
        raise ValueError(f"tiles: expected [N, C, H, W], got shape {tuple(tiles.shape)}")
    if tiles.size(1) == 1:
        tiles = torch.cat((tiles, tiles, tiles), 1)
    if tiles.size(0) == 1:
        return tiles.squeeze(0)
    n, c, h, w = tiles.shape
    cols = min(nrow, n)
    rows = int(math.ceil(n / cols))
    grid = tiles.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, cols)
        top, left = y * (h + padding) + padding, x * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = tiles[k]
    return grid


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` floats in [0, 1] -> ``[H, W, C]`` uint8, rounded as torchvision's save_image."""
    return image.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def save_png(image: torch.Tensor) -> bytes:
    """PNG bytes of a ``[3, H, W]`` image in [0, 1] (the pixels torchvision's save_image writes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_uint8(image.clone())).save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(text: str) -> int:
    return max(math.ceil(_font().getlength(line)) for line in text.split("\n"))


def _text_image(size: tuple[int, int], texts: Sequence[tuple[int, int, str]]) -> torch.Tensor:
    """``[3, H, W]`` white image of ``size`` (w, h) with black ``texts`` (x, y, text) drawn on it."""
    from PIL import Image, ImageDraw

    im = Image.new("L", size, 255)
    draw = ImageDraw.Draw(im)
    for x, y, text in texts:
        draw.multiline_text((x, y), text, fill=0, font=_font(), spacing=LINE - FONT_SIZE)
    gray = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    return gray.expand(3, -1, -1).clone()


def _magnify(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` magnified by the integer factor ceil(MIN_TILE / H) (nearest neighbour)."""
    k = max(1, math.ceil(MIN_TILE / x.shape[-2]))
    return x.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def _row_labels(gain: float, attacked: bool, corrected: bool) -> list[str]:
    scale = f"x{gain:g}, gray = 0"
    return ["clean",
            "received\n(poisoned)" if attacked else "received\n(no attack: = clean)",
            f"received - clean\n{scale}",
            "trained on\n(corrected)" if corrected else "trained on\n(= received)",
            f"trained on - received\n{scale}"]


def batch_canvas(clean: torch.Tensor, received: torch.Tensor, trained: torch.Tensor, *, gain: float,
                 title: str = "", attacked: bool = True, backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """The whole picture as a ``[3, H, W]`` float image in [0, 1], and its geometry.

    clean, received, trained: ``[N, C, h, w]`` the N samples to show (C = 1 or 3, pixels in
    [0, 1]; any device and floating dtype).  gain: the difference amplification (module
    docstring).  Returns ``(canvas, layout)``; ``layout`` gives ``tile`` (magnified h, w),
    ``origin`` (x, y of the top-left tile's first pixel in the canvas), ``pitch`` (tile size
    plus padding), ``rows`` (the row names), ``labels`` (their text) and ``backend``.
    """
    shape = clean.shape
    if clean.dim() != 4 or shape[1] not in (1, 3) or received.shape != shape or trained.shape != shape:
        raise ValueError(f"clean/received/trained: expected three [N, 1 or 3, H, W] batches of one shape, got "
                         f"{tuple(clean.shape)}, {tuple(received.shape)}, {tuple(trained.shape)}")
    if not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"gain: expected a finite number > 0, got {gain}")
    utils = _backend(backend)
    c, r, t = (v.detach().to("cpu", torch.float32).contiguous() for v in (clean, received, trained))
    corrected = not torch.equal(t, r)
    tiles = torch.cat([c, r, difference_tile(r, c, gain), t, difference_tile(t, r, gain)]).clamp(0.0, 1.0)
    tiles = _magnify(tiles)
    n = shape[0]
    grid_fn = utils.make_grid if utils is not None else make_grid
    grid = grid_fn(tiles, nrow=n, padding=PADDING, pad_value=PAD_VALUE)
    th, tw = tiles.shape[-2:]
    labels = _row_labels(gain, attacked, corrected)
    lines = [line for line in title.split("\n") if line]
    header_w = max(map(_text_width, lines)) + 2 * MARGIN if lines else 0
    label_w = max(max(map(_text_width, labels)) + 2 * MARGIN, header_w - grid.shape[2])
    label_col = _text_image((label_w, grid.shape[1]), [
        (MARGIN, PADDING + i * (th + PADDING) + (th - LINE * (text.count("\n") + 1)) // 2, text)
        for i, text in enumerate(labels)])
    body = torch.cat([label_col, grid], dim=2)
    if lines:
        header = _text_image((body.shape[2], 2 * MARGIN + LINE * len(lines)), [(MARGIN, MARGIN, "\n".join(lines))])
        canvas = torch.cat([header, body], dim=1)
    else:
        canvas = body
    top = canvas.shape[1] - body.shape[1]
    layout = {"tile": [th, tw], "origin": [label_w + PADDING, top + PADDING], "pitch": [th + PADDING, tw + PADDING],
              "rows": list(ROWS), "labels": labels, "backend": "torchvision" if utils is not None else "fallback"}
    return canvas, layout


def encode_png(canvas: torch.Tensor, backend: str = "auto") -> bytes:
    """PNG bytes of a ``[3, H, W]`` canvas: ``torchvision.utils.save_image`` or :func:`save_png`."""
    utils = _backend(backend)
    if utils is None:
        return save_png(canvas)
    buf = io.BytesIO()
    utils.save_image(canvas, buf, format="PNG")
    return buf.getvalue()


def write_batch_picture(path: str | Path, clean: torch.Tensor, received: torch.Tensor, trained: torch.Tensor,
                        poisoned: torch.Tensor, *, eps: float, title: str = "", attacked: bool = True,
                        samples: int = SAMPLES, backend: str = "auto") -> dict:
    """Write the picture of one batch to ``path`` atomically; returns its description.

    clean, received, trained: ``[B, C, H, W]`` the batch as drawn, as the attacker sent it and
    as the defence trained on it; poisoned: ``[B]`` bool.  eps: the attack's L-inf radius
    (gain = 0.5 / eps; 1 when eps is 0).  The description holds the batch rows shown, which
    of them were poisoned, the gain and the layout of :func:`batch_canvas`.
    """
    if not (clean.shape == received.shape == trained.shape) or poisoned.shape != clean.shape[:1]:
        raise ValueError(f"clean/received/trained/poisoned: expected three [B, C, H, W] batches of one shape and "
                         f"a [B] mask, got {tuple(clean.shape)}, {tuple(received.shape)}, {tuple(trained.shape)}, "
                         f"{tuple(poisoned.shape)}")
    idx = pick_samples(poisoned, samples)
    gain = 0.5 / eps if eps > 0 else 1.0
    picked = [v.detach()[idx.to(v.device)] for v in (clean, received, trained)]
    shown = poisoned.detach().cpu()[idx]
    head = f"{title}\n" if title else ""
    head += (f"batch rows {', '.join(map(str, idx.tolist()))} ({int(shown.sum())} of {idx.numel()} poisoned); "
             f"differences x{gain:g} around gray (white = +{0.5 / gain:g}, black = -{0.5 / gain:g}, per channel)")
    canvas, layout = batch_canvas(*picked, gain=gain, title=head, attacked=attacked, backend=backend)
    atomic_write_bytes(path, encode_png(canvas, backend))
    return {"file": Path(path).name, "batch_rows": idx.tolist(), "poisoned": shown.tolist(), "gain": gain,
            **layout}


def write_batch_picture_safely(path: str | Path, *args, **kwargs) -> dict | None:
    """:func:`write_batch_picture`, with any failure turned into a warning (the run goes on): None then."""
    try:
        return write_batch_picture(path, *args, **kwargs)
    except Exception as exc:  # a picture must never end a run
        warnings.warn(f"{path}: the batch picture was not written ({type(exc).__name__}: {exc}); the run goes on",
                      RuntimeWarning, stacklevel=2)
        return None
