"""Stage ``rcdm merge-samples``: sample shards -> ``samples.npz`` (ADM evaluation format) and PNG grids.

``samples.npz`` holds ``arr_0`` (uint8 [N, S, S, 3], what the ADM evaluation suite reads), ``cond_index`` and
``sample_index`` (int64 [N]) and ``settings_json`` (the shards' common settings). It is written uncompressed
and streamed shard by shard, so memory stays bounded by one chunk; :func:`iter_npz_array` reads it back the
same way. Grid rows show the conditioning image (from the images file, or the shards' own ``cond_images``
when conditioned on an image folder) followed by its samples, without any contrast stretching.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from rcdm import h5schema
from rcdm.io import atomic_path
from rcdm.sample import (
    COND_FEATURES,
    COND_IDS,
    COND_IMAGES,
    COND_INDEX,
    SAMPLE_INDEX,
    SAMPLES,
    SHARD_KEYS,
    check_samples_file,
)

CHUNK_ROWS = 1024


# ----------------------------------------------------------------------------------------------- shards


def shard_paths(out: str | os.PathLike, num_shards: int) -> list[Path]:
    """The shard files ``rcdm sample --out OUT --num-shards k`` writes."""
    return [h5schema.part_path(out, i, num_shards) for i in range(num_shards)]


def common_settings(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Validate that ``paths`` are the complete shards 0..k-1 of one sample set; return the shared settings.

    Raises ``FileNotFoundError`` for a missing shard and ``ValueError`` naming any disagreement.
    """
    if not paths:
        raise ValueError("no sample shards given")
    settings = [check_samples_file(p)["settings"] for p in paths]
    k = settings[0]["num_shards"]
    got = sorted(s["shard"] for s in settings)
    if got != list(range(k)) or any(s["num_shards"] != k for s in settings):
        raise ValueError(f"expected shards 0..{k - 1} of {k} exactly once, got shard numbers {got}")
    base = {key: v for key, v in settings[0].items() if key not in SHARD_KEYS}
    for p, s in zip(paths, settings):
        rest = {key: v for key, v in s.items() if key not in SHARD_KEYS}
        if rest != base:
            diff = sorted(key for key in set(rest) | set(base) if rest.get(key) != base.get(key))
            raise ValueError(f"{p} was sampled with other settings than {paths[0]}: {', '.join(diff)}")
    return base


def _ordered(paths: Sequence[str | os.PathLike]) -> list[Path]:
    with_shard = []
    for p in paths:
        with h5py.File(p, "r") as h5:
            with_shard.append((json.loads(h5.attrs["settings_json"])["shard"], Path(p)))
    return [p for _, p in sorted(with_shard)]


def iter_shard_samples(
    paths: Sequence[str | os.PathLike], chunk: int = CHUNK_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(images uint8 [b, S, S, 3], cond_index [b], sample_index [b])`` chunks over shards in shard order."""
    for p in _ordered(paths):
        with h5py.File(p, "r") as h5:
            n = h5[SAMPLES].shape[0]
            for lo in range(0, n, chunk):
                yield (
                    h5[SAMPLES][lo : lo + chunk],
                    h5[COND_INDEX][lo : lo + chunk],
                    h5[SAMPLE_INDEX][lo : lo + chunk],
                )


# ----------------------------------------------------------------------------------------------- npz


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


def shard_cond_features(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(cond_ids, cond_features)`` of image-conditioned shards (None when conditioned on features)."""
    ids, feats = [], []
    for p in _ordered(paths):
        with h5py.File(p, "r") as h5:
            if COND_FEATURES not in h5:
                return None
            ids.append(h5[COND_IDS][:])
            feats.append(h5[COND_FEATURES][:])
    return np.concatenate(ids), np.concatenate(feats)


# ----------------------------------------------------------------------------------------------- grids


def _cond_image_lookup(
    paths: Sequence[Path], settings: dict[str, Any], images_file: str | os.PathLike | None
) -> tuple[Any, str]:
    """A function cond_index -> uint8 image, and where the images come from."""
    shard_images: dict[int, np.ndarray] = {}
    if images_file is None and settings.get("cond_source") == "images":
        for p in paths:
            with h5py.File(p, "r") as h5:
                if COND_IMAGES in h5:
                    ids = h5[COND_IDS][:]
                    for i, cid in enumerate(ids):
                        shard_images[int(cid)] = i, p

        def from_shards(cid: int) -> np.ndarray:
            i, p = shard_images[cid]
            with h5py.File(p, "r") as h5:
                return h5[COND_IMAGES][i]

        return from_shards, "shards' cond_images"
    images_file = images_file or settings.get("images_file") or None
    if images_file is None or not Path(images_file).is_file():
        raise FileNotFoundError(
            f"conditioning images file not found ({images_file!r}): pass --images (the images file the "
            "features were extracted from), or --no-grid"
        )
    h5schema.check_images_file(images_file, deep=False)

    def from_images(cid: int) -> np.ndarray:
        with h5py.File(images_file, "r") as h5:
            return h5[h5schema.IMAGES][cid]

    return from_images, str(images_file)


def sample_grid(
    paths: Sequence[str | os.PathLike],
    *,
    rows: int = 8,
    cols: int = 8,
    images_file: str | os.PathLike | None = None,
) -> np.ndarray:
    """Grid of the first ``rows`` conditionings (sample order): the conditioning, then <= ``cols`` samples."""
    from rcdm.grids import conditioning_grid

    paths = _ordered(paths)
    settings = common_settings(paths)
    lookup, _ = _cond_image_lookup(paths, settings, images_file)
    picked: dict[int, list[tuple[int, np.ndarray]]] = {}
    for images, cond, samp in iter_shard_samples(paths, chunk=256):
        for img, c, s in zip(images, cond, samp):
            c = int(c)
            if c not in picked and len(picked) == rows:
                continue
            picked.setdefault(c, [])
            if len(picked[c]) < cols:
                picked[c].append((int(s), img))
        if len(picked) == rows and all(
            len(v) == min(cols, settings["samples_per_image"]) for v in picked.values()
        ):
            break
    cond_ids = list(picked)
    return conditioning_grid(
        [lookup(c) for c in cond_ids],
        [[img for _, img in sorted(picked[c], key=lambda t: t[0])] for c in cond_ids],
    )


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="the --out name given to `rcdm sample` (X.h5)")
    parser.add_argument("--num-shards", type=int, required=True)
    parser.add_argument("--out", required=True, help="samples .npz to write")
    parser.add_argument("--grid", help="PNG grid to write (default: next to --out, <stem>_grid.png)")
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument("--grid-rows", type=int, default=8)
    parser.add_argument("--grid-cols", type=int, default=8, help="samples per grid row")
    parser.add_argument(
        "--images", help="images file holding the conditioning images (default: from settings)"
    )


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from rcdm.grids import save_png

    paths = shard_paths(args.input, args.num_shards)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"rcdm merge-samples: {len(missing)} shard(s) missing: {', '.join(missing[:5])}")
    settings = common_settings(paths)
    n = 0
    size = int(settings["image_size"])
    for p in paths:
        with h5py.File(p, "r") as h5:
            n += h5[SAMPLES].shape[0]
    bar = tqdm(total=n, unit="img", desc="merge-samples")

    def chunks():
        for images, c, s in iter_shard_samples(paths):
            yield images, c, s
            bar.update(len(images))

    write_npz(args.out, (n, size, size, 3), chunks(), settings, cond_features=shard_cond_features(paths))
    bar.close()
    print(args.out)
    if not args.no_grid:
        grid_path = (
            Path(args.grid) if args.grid else Path(args.out).with_name(Path(args.out).stem + "_grid.png")
        )
        grid = sample_grid(paths, rows=args.grid_rows, cols=args.grid_cols, images_file=args.images)
        save_png(grid_path, grid)
        print(grid_path, file=sys.stderr)
    return 0
