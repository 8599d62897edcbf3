"""Labelled figures of the studies: a table of image tiles with row labels, column labels and a title.

Tiles are pasted as they are (uint8, never contrast-stretched), like :mod:`rcdm.grids`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rcdm.preprocess import center_crop_arr, to_uint8


def as_tiles(x, low: float = -1.0) -> np.ndarray:
    """Float images [N, 3, H, W] in [low, 1] as uint8 tiles [N, H, W, 3] (rcdm.preprocess.to_uint8)."""
    return to_uint8(x, low).cpu().numpy()


def resize_tiles(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 square images [N, H, H, 3] shown at ``size`` (``center_crop_arr``: a pure resize of a square)."""
    images = np.asarray(images)
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([center_crop_arr(Image.fromarray(im), size) for im in images])


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def labelled_table(
    rows: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    min_tile: int = 64,
    pad: int = 2,
) -> Image.Image:
    """A table of uint8 [H, W, 3] tiles (``None`` = blank cell) with row labels on the left, column labels on
    top and a title. Tiles are pasted unchanged (no contrast stretching); tiles smaller than ``min_tile``
    are enlarged by an integer factor with nearest-neighbour so 32 px samples stay readable."""
    tiles = [t for row in rows for t in row if t is not None]
    if not tiles:
        raise ValueError("a figure needs at least one tile")
    shape = tiles[0].shape
    for t in tiles:
        if t.shape != shape or t.dtype != np.uint8 or t.ndim != 3 or t.shape[2] != 3:
            raise ValueError(f"every tile must be uint8 {shape}, got {t.dtype} {t.shape}")
    h, w = shape[:2]
    scale = max(1, -(-min_tile // max(h, w)))
    th, tw = h * scale, w * scale
    ncols = max(len(r) for r in rows)
    font, title_font = _font(12), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((_text_size(probe, s, font)[0] for s in row_labels or []), default=0)
    label_w += 8 if label_w else 0
    head_h = max((_text_size(probe, s, font)[1] for s in col_labels or []), default=0)
    head_h += 8 if head_h else 0
    title_w, title_h = _text_size(probe, title, title_font)
    title_h += 10 if title else 0
    width = max(label_w + ncols * (tw + pad) + pad, title_w + 10)
    height = title_h + head_h + len(rows) * (th + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((5, 4), title, fill="black", font=title_font)
    for c, text in enumerate(col_labels or []):
        x = label_w + pad + c * (tw + pad) + max(0, (tw - _text_size(draw, text, font)[0]) // 2)
        draw.multiline_text((x, title_h + 2), text, fill="black", font=font, align="center")
    for r, row in enumerate(rows):
        y = title_h + head_h + pad + r * (th + pad)
        if row_labels and r < len(row_labels):
            ty = y + max(0, (th - _text_size(draw, row_labels[r], font)[1]) // 2)
            draw.multiline_text((4, ty), row_labels[r], fill="black", font=font)
        for c, tile in enumerate(row):
            if tile is not None:
                img = Image.fromarray(np.ascontiguousarray(tile), "RGB")
                if scale > 1:
                    img = img.resize((tw, th), Image.NEAREST)
                canvas.paste(img, (label_w + pad + c * (tw + pad), y))
    return canvas
