"""PNG grids of images: one row per conditioning (the conditioning image first, then its samples).

Pixel values are written as they are (uint8), never contrast-stretched per image, so a grid shows what the
model produced. Used by ``rcdm merge-samples`` and the studies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from rcdm.io import atomic_path


def _as_uint8_hwc(image: np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"{where}: grid images must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{where}: expected an image [H, W, 3] or [H, W], got shape {arr.shape}")
    return arr


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` as ``size`` x ``size``: whole-number enlargements repeat pixels, other sizes are bicubic."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    if h == w and size % h == 0:
        return np.repeat(np.repeat(image, size // h, axis=0), size // h, axis=1)
    return np.asarray(Image.fromarray(image).resize((size, size), resample=Image.BICUBIC))


def make_grid(
    rows: Sequence[Sequence[np.ndarray]],
    *,
    cell: int | None = None,
    min_cell: int = 64,
    pad: int = 2,
    background: int = 255,
    separator: int | None = None,
) -> np.ndarray:
    """Tile ``rows`` (each a sequence of uint8 images [H, W, 3]) into one uint8 image [H', W', 3].

    Every image is placed in a ``cell`` x ``cell`` square (default: the first image's height, repeated a whole
    number of times up to at least ``min_cell`` pixels, so 16px samples stay visible); other sizes are
    resized bicubically. Rows may have different lengths; empty places show ``background``. ``separator``
    (a column index) widens the gap after that column, e.g. 1 to set the conditioning image apart.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("make_grid needs at least one image")
    first = _as_uint8_hwc(next(img for r in rows for img in r), "rows")
    cell = cell or first.shape[0] * max(1, -(-min_cell // first.shape[0]))
    n_cols = max(len(r) for r in rows)
    extra = 2 * pad if separator is not None and 0 < separator < n_cols else 0
    height = len(rows) * cell + (len(rows) + 1) * pad
    width = n_cols * cell + (n_cols + 1) * pad + extra
    grid = np.full((height, width, 3), background, dtype=np.uint8)
    for i, row in enumerate(rows):
        top = pad + i * (cell + pad)
        for j, image in enumerate(row):
            left = pad + j * (cell + pad) + (extra if separator is not None and j >= separator else 0)
            grid[top : top + cell, left : left + cell] = _fit(_as_uint8_hwc(image, f"row {i}, col {j}"), cell)
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a uint8 image [H, W, 3] as PNG atomically; returns the path."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(_as_uint8_hwc(image, str(path))).save(tmp, format="PNG")
    return path


def conditioning_grid(
    cond_images: Sequence[np.ndarray],
    samples: Sequence[Sequence[np.ndarray]],
    *,
    pad: int = 2,
    background: int = 255,
) -> np.ndarray:
    """Grid whose row i is ``cond_images[i]`` then its samples ``samples[i]``; first column set apart."""
    if len(cond_images) != len(samples):
        raise ValueError(f"{len(cond_images)} conditioning images but {len(samples)} rows of samples")
    rows = [[c, *s] for c, s in zip(cond_images, samples)]
    return make_grid(rows, pad=pad, background=background, separator=1)
