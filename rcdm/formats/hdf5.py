"""The HDF5 layout of extraction outputs, a chunked appending writer, and validation of finished files.

Images file (one per dataset split and resolution; ``kind = "images"``)
    ``images``     uint8 [N, S, S, 3]  centre crops at the model resolution S (``center_crop_arr``)
    ``labels``     int64 [N]           class index, -1 when the dataset has none
    ``paths``      utf-8 [N]           image identifiers (path relative to the folder root, or a name)
    ``factors/<name>`` [N]             ``shapes`` only: one dataset per generative factor; categorical ones
                                       are int64 with attribute ``categories`` (the names), others
                                       float32 or int64
    ``bad_paths``  utf-8 [B]           files skipped as unreadable, with the reason (``path: reason``)
Features file (one per encoder and layer; ``kind = "features"``)
    ``features``   float32|float16 [N, 2, D]  index 0: the image, 1: its horizontal mirror
    ``paths``, ``bad_paths``           as above, so a features file can be matched to its images file
Attributes of both: ``kind``, ``format_version``, ``num_images`` (N), ``paths_sha256`` (digest of the
``paths`` list: equal digests = same images in the same order), ``num_bad``, ``dataset``, ``split``,
``selection`` settings, shard settings; then per kind ``image_size``, ``crop_method`` or ``encoder``,
``layer``, ``input_norm``, ``input_size``, ``dim``, ``encoder_sha256`` (the encoder file),
``images_file``, ``precision`` (the encoder's compute precision: ``fp32``, or ``bf16`` autocast when asked
for; files made before it was recorded ran bf16 autocast on CUDA and fp32 elsewhere). ``complete`` is
written last: with atomic renames a file under its final name is always complete; the flag double-checks.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1
KIND_IMAGES = "images"
KIND_FEATURES = "features"

IMAGES = "images"
LABELS = "labels"
PATHS = "paths"
BAD_PATHS = "bad_paths"
FACTORS = "factors"
FEATURES = "features"
CATEGORIES = "categories"

FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}
#: attributes that differ between the shards of one output (everything else must agree to merge)
SHARD_ATTRS = ("shard", "num_shards", "shard_start", "shard_stop", "num_images", "paths_sha256", "num_bad")
#: ... plus the bookkeeping a merge adds
SHARD_ATTRS_ALL = (*SHARD_ATTRS, "merged_parts", "complete")
STR = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 15  # ~32 KiB chunks: random row reads (training) stay cheap, the index stays small

_PART_RE = re.compile(r"^(?P<stem>.+)\.part-(?P<shard>\d+)-of-(?P<num>\d+)(?P<suffix>\.[^.]*)$")


class H5SchemaError(ValueError):
    """An HDF5 file that breaks this layout (missing dataset, wrong shape or dtype, incomplete...)."""


def part_path(path: str | os.PathLike, shard: int, num_shards: int) -> Path:
    """Name of shard ``shard`` of ``num_shards`` of output ``path``: ``X.h5 -> X.part-0003-of-0008.h5``."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    path = Path(path)
    width = max(4, len(str(num_shards - 1)))
    return path.with_name(f"{path.stem}.part-{shard:0{width}d}-of-{num_shards:0{width}d}{path.suffix}")


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``n`` items that shard ``shard`` of ``num_shards`` covers."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"invalid shard {shard} of {num_shards}")
    return shard * n // num_shards, (shard + 1) * n // num_shards


class PathsDigest:
    """Incremental sha256 of a list of paths (each utf-8 encoded and newline terminated)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, paths: Iterable[str]) -> None:
        for p in paths:
            self._h.update(p.encode("utf-8") + b"\n")

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _chunk_rows(row_shape: Sequence[int], itemsize: int) -> int:
    return max(1, CHUNK_BYTES // max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize))


class ChunkedWriter:
    """Appends rows to resizable, chunked datasets of an open ``h5py.File`` (memory bounded by one batch).

    ``specs`` maps a dataset name (``"group/name"`` allowed) to ``(row_shape, dtype)``; every ``append`` must
    give all of them with the same number of rows. String datasets use ``hdf5.STR``.
    """

    def __init__(self, h5: h5py.File, specs: Mapping[str, tuple[Sequence[int], Any]]):
        self.h5 = h5
        self.rows = 0
        self.datasets: dict[str, h5py.Dataset] = {}
        for name, (row_shape, dtype) in specs.items():
            itemsize = 16 if dtype is STR else np.dtype(dtype).itemsize
            self.datasets[name] = h5.create_dataset(
                name,
                shape=(0, *row_shape),
                maxshape=(None, *row_shape),
                dtype=dtype,
                chunks=(_chunk_rows(row_shape, itemsize), *row_shape),
            )

    def append(self, arrays: Mapping[str, Any]) -> None:
        if set(arrays) != set(self.datasets):
            raise KeyError(f"append needs exactly {sorted(self.datasets)}, got {sorted(arrays)}")
        counts = {name: len(a) for name, a in arrays.items()}
        n = next(iter(counts.values()))
        if any(c != n for c in counts.values()):
            raise ValueError(f"append with unequal row counts: {counts}")
        if n == 0:
            return
        for name, a in arrays.items():
            ds = self.datasets[name]
            ds.resize(self.rows + n, axis=0)
            ds[self.rows : self.rows + n] = a
        self.rows += n


def write_strings(h5: h5py.File, name: str, values: Sequence[str]) -> None:
    """A (small) utf-8 string dataset written in one go."""
    h5.create_dataset(name, data=np.array(list(values), dtype=object), dtype=STR)


def read_strings(ds: h5py.Dataset, start: int = 0, stop: int | None = None) -> list[str]:
    """Rows of a utf-8 string dataset as Python ``str``."""
    return list(ds.asstr()[start:stop])


def set_attrs(h5: h5py.File, attrs: Mapping[str, Any]) -> None:
    """Write attributes, storing ``None`` as an empty string (HDF5 has no null)."""
    for key, value in attrs.items():
        h5.attrs[key] = "" if value is None else value


def read_attrs(h5: h5py.File | h5py.Dataset) -> dict[str, Any]:
    """Attributes as plain Python values (numpy scalars unwrapped, bytes decoded)."""
    out = {}
    for key, value in h5.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def read_rows(ds: h5py.Dataset, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """``ds[rows]`` for any row indices (any order, repeats allowed), read as contiguous runs.

    h5py's own fancy indexing on multi-dimensional datasets is some 100x slower (one hyperslab per row);
    this reads each run of consecutive rows with one slice into a preallocated array.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(rows), *ds.shape[1:]), dtype=ds.dtype)
    if len(rows) == 0:
        return out
    if rows.min() < 0 or rows.max() >= ds.shape[0]:
        raise IndexError(f"row indices out of range [0, {ds.shape[0]}) for {ds.name}")
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    breaks = np.flatnonzero(np.diff(sorted_rows) > 1) + 1
    for run in np.split(np.arange(len(rows)), breaks):
        lo, hi = sorted_rows[run[0]], sorted_rows[run[-1]] + 1
        block = ds[lo:hi]
        out[order[run]] = block[sorted_rows[run] - lo]
    return out


def paths_digest(ds: h5py.Dataset, block: int = 65536) -> str:
    """Recompute ``paths_sha256`` from a ``paths`` dataset, streaming."""
    digest = PathsDigest()
    for start in range(0, ds.shape[0], block):
        digest.update(read_strings(ds, start, start + block))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- checks


def _open(path: str | os.PathLike) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HDF5 file not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise H5SchemaError(f"{path}: not a readable HDF5 file ({err})") from err


def _need(h5: h5py.File, name: str, path: Path) -> h5py.Dataset:
    if name not in h5 or not isinstance(h5[name], h5py.Dataset):
        raise H5SchemaError(f"{path}: missing dataset {name!r} (has {sorted(h5.keys())})")
    return h5[name]


def _check_common(h5: h5py.File, path: Path, kind: str, deep: bool) -> dict[str, Any]:
    attrs = read_attrs(h5)
    if attrs.get("kind") != kind:
        raise H5SchemaError(f"{path}: attribute kind is {attrs.get('kind')!r}, expected {kind!r}")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise H5SchemaError(
            f"{path}: format_version {attrs.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    if not attrs.get("complete"):
        raise H5SchemaError(f"{path}: not marked complete (an interrupted or foreign write)")
    paths = _need(h5, PATHS, path)
    n = paths.shape[0]
    if attrs.get("num_images") != n:
        raise H5SchemaError(f"{path}: num_images attribute {attrs.get('num_images')} but {n} paths")
    if paths.ndim != 1 or paths.dtype.kind != "O":
        raise H5SchemaError(f"{path}: 'paths' must be a 1-d string dataset, got {paths.dtype} {paths.shape}")
    if deep and paths_digest(paths) != attrs.get("paths_sha256"):
        raise H5SchemaError(f"{path}: paths_sha256 attribute does not match the stored paths")
    return attrs


def check_images_file(path: str | os.PathLike, deep: bool = True) -> dict[str, Any]:
    """Validate a finished images file; return its attributes. Raises ``H5SchemaError`` naming the problem.

    ``deep`` also recomputes the paths digest.
    """
    path = Path(path)
    with _open(path) as h5:
        attrs = _check_common(h5, path, KIND_IMAGES, deep)
        n, s = attrs["num_images"], attrs.get("image_size")
        images = _need(h5, IMAGES, path)
        if images.dtype != np.uint8 or images.shape != (n, s, s, 3):
            raise H5SchemaError(
                f"{path}: 'images' is {images.dtype} {images.shape}, expected uint8 {(n, s, s, 3)}"
            )
        labels = _need(h5, LABELS, path)
        if labels.dtype != np.int64 or labels.shape != (n,):
            raise H5SchemaError(f"{path}: 'labels' is {labels.dtype} {labels.shape}, expected int64 ({n},)")
        if FACTORS in h5:
            for name, ds in h5[FACTORS].items():
                if ds.shape != (n,):
                    raise H5SchemaError(f"{path}: factor {name!r} has shape {ds.shape}, expected ({n},)")
        return attrs


def check_features_file(
    path: str | os.PathLike, images_path: str | os.PathLike | None = None, deep: bool = True
) -> dict[str, Any]:
    """Validate a finished features file (and, given ``images_path``, that it matches that images file).

    ``deep`` also recomputes the paths digest and scans the features for NaN/inf (in blocks). Returns the
    attributes; raises ``H5SchemaError`` naming the problem.
    """
    path = Path(path)
    with _open(path) as h5:
        attrs = _check_common(h5, path, KIND_FEATURES, deep)
        n, d = attrs["num_images"], attrs.get("dim")
        feats = _need(h5, FEATURES, path)
        if feats.dtype not in (np.float32, np.float16) or feats.shape != (n, 2, d):
            raise H5SchemaError(
                f"{path}: 'features' is {feats.dtype} {feats.shape}, expected float32/float16 {(n, 2, d)}"
            )
        if deep:
            block = max(1, (64 << 20) // max(1, 2 * d * feats.dtype.itemsize))
            for start in range(0, n, block):
                if not np.isfinite(feats[start : start + block]).all():
                    raise H5SchemaError(
                        f"{path}: NaN or infinite features in rows [{start}, {start + block})"
                    )
    if images_path is not None:
        images_attrs = check_images_file(images_path, deep=deep)
        if images_attrs["num_images"] != n or images_attrs["paths_sha256"] != attrs["paths_sha256"]:
            raise H5SchemaError(
                f"{path} does not belong to {images_path}: {n} vs {images_attrs['num_images']} images, "
                f"paths digest {attrs['paths_sha256'][:12]} vs {images_attrs['paths_sha256'][:12]}"
            )
    return attrs


def check_file(path: str | os.PathLike, deep: bool = True) -> dict[str, Any]:
    """Validate an images or features file, whichever its ``kind`` attribute says."""
    with _open(path) as h5:
        kind = read_attrs(h5).get("kind")
    if kind == KIND_IMAGES:
        return check_images_file(path, deep=deep)
    if kind == KIND_FEATURES:
        return check_features_file(path, deep=deep)
    raise H5SchemaError(f"{path}: unknown kind {kind!r} (expected {KIND_IMAGES!r} or {KIND_FEATURES!r})")


def parse_part_path(path: str | os.PathLike) -> tuple[Path, int, int] | None:
    """Inverse of ``part_path``: ``(final path, shard, num_shards)``, or None for a non-part name."""
    path = Path(path)
    m = _PART_RE.match(path.name)
    if m is None:
        return None
    return path.with_name(m["stem"] + m["suffix"]), int(m["shard"]), int(m["num"])


# ------------------------------------------------------------------------------------ small in-memory writers


def _write_small(path, kind: str, arrays: Mapping[str, Any], paths: Sequence[str], attrs: Mapping[str, Any]):
    from rcdm.io import atomic_path

    digest = PathsDigest()
    digest.update(paths)
    with atomic_path(path, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as h5:
        for name, value in arrays.items():
            h5.create_dataset(name, data=value)
        write_strings(h5, PATHS, paths)
        write_strings(h5, BAD_PATHS, [])
        set_attrs(h5, {"num_bad": 0, **attrs})
        set_attrs(h5, {"kind": kind, "format_version": FORMAT_VERSION, "num_images": len(paths),
                       "paths_sha256": digest.hexdigest()})  # fmt: skip
        h5.attrs["complete"] = True


def write_images_file(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    paths: Sequence[str] | None = None,
    factors: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write a complete images file from in-memory uint8 ``images`` [N, S, S, 3] (tests, small sets).

    Defaults: labels -1, paths ``"0"``, ``"1"``, ...; ``attrs`` adds or overrides attributes.
    """
    images = np.asarray(images)
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1] != images.shape[2]
        or images.shape[3] != 3
    ):
        raise ValueError(f"images must be uint8 [N, S, S, 3], got {images.dtype} {images.shape}")
    n = len(images)
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    paths = [str(i) for i in range(n)] if paths is None else list(paths)
    if len(labels) != n or len(paths) != n:
        raise ValueError(f"{n} images but {len(labels)} labels and {len(paths)} paths")
    arrays = {IMAGES: images, LABELS: labels} | {
        f"{FACTORS}/{k}": np.asarray(v) for k, v in (factors or {}).items()
    }
    base = {"image_size": images.shape[1], "dataset": "", "split": "", "crop_method": ""}
    _write_small(path, KIND_IMAGES, arrays, paths, base | dict(attrs or {}))


def write_features_file(
    path: str | os.PathLike,
    features: np.ndarray,
    paths: Sequence[str] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write a complete features file from in-memory ``features`` [N, 2, D] (float32 or float16).

    Use the ``paths`` of the matching images file (default ``"0"``, ``"1"``, ...) so the two pair up.
    """
    features = np.asarray(features)
    if features.dtype not in (np.float32, np.float16) or features.ndim != 3 or features.shape[1] != 2:
        raise ValueError(f"features must be float32/float16 [N, 2, D], got {features.dtype} {features.shape}")
    paths = [str(i) for i in range(len(features))] if paths is None else list(paths)
    if len(paths) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(paths)} paths")
    base = {
        "dim": features.shape[2],
        "encoder": "",
        "layer": "",
        "input_norm": "none",
        "dataset": "",
        "split": "",
    }
    _write_small(path, KIND_FEATURES, {FEATURES: features}, paths, base | dict(attrs or {}))
