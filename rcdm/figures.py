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


def comparison_figure(
    inputs: np.ndarray,
    groups: Sequence[tuple[str, np.ndarray]],
    row_labels: Sequence[str],
    *,
    title: str = "",
    input_label: str = "conditioning",
    caption: Sequence[str] = (),
    table: Sequence[Sequence[str]] = (),
    tile: int = 96,
    gap: int = 14,
) -> Image.Image:
    """A figure for a reader: each row an input image, then groups of samples (``groups``: (heading, uint8
    [N, K, H, W, 3])) side by side, separated by a gap; column ``j`` of every group is labelled ``noise j``
    (the studies draw it from the same initial noise). Tiles are enlarged by an integer factor with
    nearest-neighbour to about ``tile`` px (pixels stay square and sharp); ``caption`` lines go below, then
    ``table`` (rows of cells, the first row a header), its columns aligned."""
    inputs = np.asarray(inputs)
    n, h, w = inputs.shape[:3]
    if inputs.dtype != np.uint8 or inputs.ndim != 4 or inputs.shape[3] != 3:
        raise ValueError(f"inputs must be uint8 [N, H, W, 3], got {inputs.dtype} {inputs.shape}")
    for name, g in groups:
        if g.dtype != np.uint8 or g.ndim != 5 or g.shape[0] != n or g.shape[2:] != (h, w, 3):
            raise ValueError(f"group {name!r} must be uint8 [{n}, K, {h}, {w}, 3], got {g.dtype} {g.shape}")
    if len(row_labels) != n:
        raise ValueError(f"{n} rows but {len(row_labels)} row labels")
    scale = max(1, round(tile / max(h, w)))
    th, tw, pad = h * scale, w * scale, 3
    font, head_font, title_font = _font(13), _font(15), _font(17)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((_text_size(probe, s, font)[0] for s in row_labels), default=0) + 12
    blocks = [(input_label, 1)] + [(name, g.shape[1]) for name, g in groups]
    xs, x = [], label_w
    for _, k in blocks:
        xs.append(x)
        x += k * (tw + pad) + gap
    width = x - gap + pad + 6
    title_h = _text_size(probe, title, title_font)[1] + 14 if title else 0
    head_h = max(_text_size(probe, b[0], head_font)[1] for b in blocks) + 8
    sub_h = _text_size(probe, "noise 1", font)[1] + 6
    cap_h = sum(_text_size(probe, c, font)[1] + 6 for c in caption) + (10 if caption else 0)
    line_h = _text_size(probe, "Ag", font)[1] + 7
    col_w = [
        max(_text_size(probe, row[c], font)[0] for row in table if c < len(row)) + 18
        for c in range(max(map(len, table), default=0))
    ]
    cap_h += len(table) * line_h + (6 if table else 0)
    grid_top = title_h + head_h + sub_h
    height = grid_top + n * (th + pad) + pad + cap_h
    width = max(
        width,
        _text_size(probe, title, title_font)[0] + 12,
        *[_text_size(probe, c, font)[0] + 24 for c in caption],
        sum(col_w) + 24,
    )
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 5), title, fill="black", font=title_font)
    for (name, k), x0 in zip(blocks, xs):
        span = k * (tw + pad) - pad
        tx = x0 + pad + max(0, (span - _text_size(draw, name, head_font)[0]) // 2)
        draw.text((tx, title_h + 2), name, fill="black", font=head_font)
        if k > 1 or name != input_label:
            draw.line((x0 + pad, title_h + head_h - 3, x0 + pad + span, title_h + head_h - 3), fill="grey")
            for j in range(k):
                text = f"noise {j + 1}"
                cx = x0 + pad + j * (tw + pad) + max(0, (tw - _text_size(draw, text, font)[0]) // 2)
                draw.text((cx, title_h + head_h), text, fill="dimgray", font=font)

    def paste(img: np.ndarray, x0: int, y0: int) -> None:
        im = Image.fromarray(np.ascontiguousarray(img), "RGB")
        canvas.paste(im.resize((tw, th), Image.NEAREST) if scale > 1 else im, (x0, y0))

    for r in range(n):
        y = grid_top + pad + r * (th + pad)
        ty = y + max(0, (th - _text_size(draw, row_labels[r], font)[1]) // 2)
        draw.multiline_text((6, ty), row_labels[r], fill="black", font=font)
        paste(inputs[r], xs[0] + pad, y)
        for (_, g), x0 in zip(groups, xs[1:]):
            for j in range(g.shape[1]):
                paste(g[r, j], x0 + pad + j * (tw + pad), y)
    y = grid_top + n * (th + pad) + pad + 10
    for c in caption:
        draw.text((6, y), c, fill="black", font=font)
        y += _text_size(draw, c, font)[1] + 6
    y += 4 if table else 0
    for r, row in enumerate(table):
        x = 18
        for c, cell in enumerate(row):
            draw.text((x, y), cell, fill="black" if r else "dimgray", font=font)
            x += col_w[c]
        if r == 0:
            draw.line((18, y + line_h - 3, 18 + sum(col_w) - 18, y + line_h - 3), fill="grey")
        y += line_h
    return canvas
