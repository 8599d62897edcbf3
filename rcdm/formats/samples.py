"""Samples shard files (HDF5), written by ``rcdm sample`` and read by ``rcdm merge-samples``.

Shard file (``kind = "samples"``): ``samples`` uint8 [n, S, S, 3], ``cond_index`` int64 [n] (row of the
features file / index in the dataset), ``sample_index`` int64 [n]; with image conditioning also
``cond_images`` uint8 [m, S, S, 3] and ``cond_features`` float32 [m, D] for the shard's m conditionings
(``cond_ids`` int64 [m]); settings as attributes (``settings_json`` holds all of them). Samples are written
conditioning-major. Progress is flushed after every batch to ``<shard>.partial``; the final name appears (by
rename) only when the shard is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from rcdm.formats import hdf5

KIND = "samples"


FORMAT_VERSION = 1


SAMPLES = "samples"


COND_INDEX = "cond_index"


SAMPLE_INDEX = "sample_index"


COND_IDS = "cond_ids"


COND_IMAGES = "cond_images"


COND_FEATURES = "cond_features"


class ShardSettingsMismatch(RuntimeError):
    """An existing shard file was written with different settings."""


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The ``settings_json`` attribute of a (partial or complete) shard file."""
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["settings_json"])


def check_samples_file(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a finished samples shard; return its attributes (``settings`` decoded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples shard not found: {path}")
    with h5py.File(path, "r") as h5:
        attrs = hdf5.read_attrs(h5)
        if attrs.get("kind") != KIND or not attrs.get("complete"):
            raise hdf5.H5SchemaError(f"{path}: not a complete samples shard (kind={attrs.get('kind')!r})")
        n = int(attrs["num_samples"])
        s = int(attrs["image_size"])
        for name, shape in ((SAMPLES, (n, s, s, 3)), (COND_INDEX, (n,)), (SAMPLE_INDEX, (n,))):
            if name not in h5 or h5[name].shape != shape:
                got = h5[name].shape if name in h5 else "missing"
                raise hdf5.H5SchemaError(f"{path}: dataset {name!r} is {got}, expected {shape}")
    attrs["settings"] = json.loads(attrs["settings_json"])
    return attrs


def create_partial(
    path: Path, settings: dict, n: int, m: int, size: int, dim: int, with_images: bool
) -> None:
    with h5py.File(path, "w") as h5:
        rows = max(1, min(n, 64))
        h5.create_dataset(SAMPLES, shape=(n, size, size, 3), dtype=np.uint8, chunks=(rows, size, size, 3))
        h5.create_dataset(COND_INDEX, shape=(n,), dtype=np.int64)
        h5.create_dataset(SAMPLE_INDEX, shape=(n,), dtype=np.int64)
        if with_images:
            h5.create_dataset(COND_IDS, shape=(m,), dtype=np.int64)
            h5.create_dataset(COND_IMAGES, shape=(m, size, size, 3), dtype=np.uint8)
            h5.create_dataset(COND_FEATURES, shape=(m, dim), dtype=np.float32)
        flat = {k: v for k, v in settings.items() if isinstance(v, str | int | float | bool)}
        hdf5.set_attrs(h5, flat)
        h5.attrs["kind"] = KIND
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["num_samples"] = n
        h5.attrs["settings_json"] = json.dumps(settings, sort_keys=True)
        h5.attrs["done"] = 0
        h5.attrs["complete"] = False


SHARD_KEYS = ("shard", "num_shards", "shard_start", "shard_stop")


CHUNK_ROWS = 1024


def shard_paths(out: str | os.PathLike, num_shards: int) -> list[Path]:
    """The shard files ``rcdm sample --out OUT --num-shards k`` writes."""
    return [hdf5.part_path(out, i, num_shards) for i in range(num_shards)]


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


def ordered_shards(paths: Sequence[str | os.PathLike]) -> list[Path]:
    with_shard = []
    for p in paths:
        with h5py.File(p, "r") as h5:
            with_shard.append((json.loads(h5.attrs["settings_json"])["shard"], Path(p)))
    return [p for _, p in sorted(with_shard)]


def iter_shard_samples(
    paths: Sequence[str | os.PathLike], chunk: int = CHUNK_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(images uint8 [b, S, S, 3], cond_index [b], sample_index [b])`` chunks over shards in shard order."""
    for p in ordered_shards(paths):
        with h5py.File(p, "r") as h5:
            n = h5[SAMPLES].shape[0]
            for lo in range(0, n, chunk):
                yield (
                    h5[SAMPLES][lo : lo + chunk],
                    h5[COND_INDEX][lo : lo + chunk],
                    h5[SAMPLE_INDEX][lo : lo + chunk],
                )


def shard_cond_features(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(cond_ids, cond_features)`` of image-conditioned shards (None when conditioned on features)."""
    ids, feats = [], []
    for p in ordered_shards(paths):
        with h5py.File(p, "r") as h5:
            if COND_FEATURES not in h5:
                return None
            ids.append(h5[COND_IDS][:])
            feats.append(h5[COND_FEATURES][:])
    return np.concatenate(ids), np.concatenate(feats)
