"""Samples ``.npz`` in the ADM evaluation format (guided-diffusion's ``evaluations/evaluator.py`` reads it).

``arr_0`` uint8 [N, S, S, 3] (the samples), ``cond_index`` and ``sample_index`` int64 [N], ``settings_json``
(the shards' common settings), and ``cond_ids`` / ``cond_features`` when the samples were conditioned on
images. It is written uncompressed and streamed chunk by chunk, so memory stays bounded by one chunk;
:func:`iter_npz_array` reads it back the same way.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rcdm.io import atomic_path

CHUNK_ROWS = 1024


def write_npz(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
    settings: dict[str, Any],
    cond_features: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Stream ``chunks`` (images, cond_index, sample_index) into an uncompressed ``.npz`` atomically.

    ``cond_features`` = (cond_ids [m], features [m, D]) of image conditionings, stored when given.
    """
    path = Path(path)
    n = shape[0]
    cond = np.empty(n, dtype=np.int64)
    samp = np.empty(n, dtype=np.int64)
    with atomic_path(path, suffix=".npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False,
            "shape": shape,
        }
        done = 0
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for images, c, s in chunks:
                if images.dtype != np.uint8 or images.shape[1:] != shape[1:]:
                    raise ValueError(
                        f"shard chunk is {images.dtype} {images.shape}, expected uint8 {shape[1:]}"
                    )
                f.write(np.ascontiguousarray(images).tobytes())
                cond[done : done + len(c)] = c
                samp[done : done + len(s)] = s
                done += len(images)
        if done != n:
            raise ValueError(f"wrote {done} samples, expected {n}")
        extra = (
            {} if cond_features is None else {"cond_ids": cond_features[0], "cond_features": cond_features[1]}
        )
        for name, arr in {
            "cond_index": cond,
            "sample_index": samp,
            "settings_json": np.array(json.dumps(settings, sort_keys=True)),
            **extra,
        }.items():
            with zf.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    return path


def _open_member(zf: zipfile.ZipFile, key: str, path: Path):
    name = f"{key}.npy"
    if name not in zf.namelist():
        raise KeyError(f"{path}: no array {key!r} (has {[n[:-4] for n in zf.namelist()]})")
    f = zf.open(name)
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(f)
    if fortran:
        raise ValueError(f"{path}: {key} is stored in Fortran order; rewrite it C-contiguous")
    return f, shape, dtype


def npz_array_shape(path: str | os.PathLike, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an ``.npz`` without reading its data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    with zipfile.ZipFile(path) as zf:
        f, shape, dtype = _open_member(zf, key, path)
        f.close()
    return tuple(shape), dtype


def npz_sample_count(path: str | os.PathLike) -> int:
    """The number of images in an ADM sample file; its ``arr_0`` must be uint8 [N, H, W, 3] (ValueError)."""
    shape, dtype = npz_array_shape(path)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"{path}: arr_0 is {dtype} {shape}, expected uint8 [N, H, W, 3]")
    return int(shape[0])


def iter_npz_array(
    path: str | os.PathLike, key: str = "arr_0", chunk: int = CHUNK_ROWS
) -> Iterator[np.ndarray]:
    """Chunks of ``chunk`` rows of one array of an ``.npz`` (compressed or not), read sequentially."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    with zipfile.ZipFile(path) as zf:
        f, shape, dtype = _open_member(zf, key, path)
        with f:
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for lo in range(0, shape[0], chunk):
                rows = min(chunk, shape[0] - lo)
                buf = f.read(rows * row_bytes)
                if len(buf) != rows * row_bytes:
                    raise ValueError(f"{path}: {key} is truncated at row {lo}")
                yield np.frombuffer(buf, dtype=dtype).reshape(rows, *shape[1:])


def read_npz_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Everything but ``arr_0`` of a samples ``.npz``: ``cond_index``, ``sample_index``, ``settings`` (dict),
    and ``cond_ids`` / ``cond_features`` when the samples were conditioned on images; absent keys are None.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        out = {
            k: (z[k] if k in z.files else None)
            for k in ("cond_index", "sample_index", "cond_ids", "cond_features")
        }
        out["settings"] = json.loads(str(z["settings_json"])) if "settings_json" in z.files else {}
    return out
