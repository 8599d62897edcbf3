"""A study's conditioning images: which ones, their stored crops, and the encoder's crops of the originals.

Which images (:class:`Selection`): explicit positions, explicit names (paths as the images file records
them, or their file names), or by default a seeded random draw over the whole set, stratified by class when
the set has labels (:func:`rcdm.subsets.stratified_draw`); never the first N.

What each image is (:class:`Sources`): ``show``, the crop at the model resolution S (the stored crop of an
images file, ``center_crop_arr`` of the original for a dataset), and ``enc``, the crop at the encoder's input
size E of the same original when its recorded path is readable (under ``image_root``), else the stored crop
resized to E. ``enc`` is read on first use: studies that take the clean representations from a features file
never need it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image

from rcdm.formats import hdf5
from rcdm.preprocess import center_crop_arr
from rcdm.subsets import stratified_draw


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [0, 1] (the range augmentations and attacks work in)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    return x.permute(0, 3, 1, 2).float().div(255.0)


# ------------------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """Which images of a set: ``indices``, else ``names``, else a seeded stratified draw of ``num``."""

    num: int = 4
    seed: int = 0
    indices: list[int] | None = None
    names: list[str] | None = None

    def choose(self, labels: np.ndarray, keys: Callable[[], Sequence[str]], what: str) -> list[int]:
        """Positions in a set of ``len(labels)`` images; ``keys()`` gives every image's name (read only when
        names are asked for); ``what`` names the set in errors."""
        n = len(labels)
        if self.indices is not None:
            bad = [i for i in self.indices if not 0 <= i < n]
            if bad:
                raise IndexError(f"image indices {bad} outside [0, {n}) of {what}")
            return list(self.indices)
        if self.names:
            return match_names(self.names, list(keys()), what)
        if self.num < 1:
            raise ValueError(f"the number of images must be positive, got {self.num}")
        return [int(i) for i in stratified_draw(labels, self.num, self.seed)]


def match_names(names: Sequence[str], keys: Sequence[str], what: str) -> list[int]:
    """Positions of ``names`` among ``keys``: an exact key, else the one key that it names without its
    extension, or by its file name (with or without extension)."""
    exact = {k: i for i, k in enumerate(keys)}
    short: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        base = k.rsplit("/", 1)[-1]
        for alias in {k.rsplit(".", 1)[0], base, base.rsplit(".", 1)[0]} - {k}:
            short.setdefault(alias, []).append(i)
    out = []
    for name in names:
        if name in exact:
            out.append(exact[name])
            continue
        found = short.get(name, [])
        if len(found) != 1:
            why = "matches several images" if found else "is not one of its images"
            raise ValueError(f"image name {name!r} {why} in {what} (give the path as recorded)")
        out.append(found[0])
    return out


# ------------------------------------------------------------------------------------------------ sources


@dataclass
class Sources:
    """Conditioning images: ``show`` at the model resolution S, ``enc`` at the encoder's input size E."""

    show: np.ndarray  # uint8 [N, S, S, 3]
    names: list[str]
    labels: np.ndarray  # int64 [N]
    factors: dict[str, np.ndarray] = field(default_factory=dict)
    factor_names: dict[str, list[str] | None] = field(default_factory=dict)
    features: torch.Tensor | None = None  # [N, D] precomputed clean representations (features file)
    indices: list[int] = field(default_factory=list)  # positions in the images file / dataset
    crops: Callable[[], np.ndarray] | None = None  # -> enc, on first use
    _enc: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.show)

    @property
    def enc(self) -> np.ndarray:
        """uint8 [N, E, E, 3]: each original's centre crop at the encoder's input size."""
        if self._enc is None:
            if self.crops is None:
                raise ValueError("these sources have no encoder-resolution crops")
            self._enc = self.crops()
        return self._enc


def from_images_file(
    images_path: str | Path,
    features_path: str | Path | None,
    selection: Selection,
    image_size: int,
    encoder_size: int,
    *,
    image_root: str | Path | None = None,
) -> Sources:
    """The selected images of an images file (and their rows of ``features_path``, when given)."""
    path = Path(images_path)
    if not path.is_file():
        raise FileNotFoundError(f"images file not found: {path}")
    attrs = hdf5.check_images_file(path, deep=False)
    if int(attrs["image_size"]) != image_size:
        raise ValueError(
            f"{path} holds {attrs['image_size']}px images but the model generates {image_size}px"
        )
    with h5py.File(path, "r") as f:
        labels_all = np.asarray(f[hdf5.LABELS][:], dtype=np.int64)
        idx = selection.choose(labels_all, lambda: hdf5.read_strings(f[hdf5.PATHS]), str(path))
        show = hdf5.read_rows(f[hdf5.IMAGES], idx)
        labels = labels_all[idx]
        paths = [_str(f[hdf5.PATHS][i]) for i in idx]
        factors, factor_names = read_factors(f, idx)
    features = read_features(features_path, idx, attrs) if features_path else None

    names = [f"{i}" for i in idx]
    return Sources(
        show,
        names,
        labels,
        factors,
        factor_names,
        features,
        idx,
        lambda: encoder_crops(show, paths, encoder_size, image_root),
    )


def from_dataset(spec: str, split: str, selection: Selection, image_size: int, encoder_size: int) -> Sources:
    """The selected images of a dataset (``photos``, ``shapes``, a folder): both crops from the original."""
    from rcdm.data import open_dataset

    source = open_dataset(spec, split=split, native_size=max(image_size, encoder_size))
    labels_all = np.asarray([source.label(i) for i in range(len(source))], np.int64)
    idx = selection.choose(labels_all, lambda: [source.key(i) for i in range(len(source))], f"dataset {spec}")
    show, enc, factors = [], [], {}
    for i in idx:
        im = source.load(i)
        show.append(center_crop_arr(im, image_size))
        enc.append(center_crop_arr(im, encoder_size))
        for k, v in source.factors(i).items():
            factors.setdefault(k, []).append(v)
    names = [_short_name(source.key(i)) for i in idx]
    enc_arr = np.stack(enc)
    return Sources(
        np.stack(show),
        names,
        labels_all[idx],
        {k: np.asarray(v) for k, v in factors.items()},
        factor_names_of(source),
        indices=idx,
        crops=lambda: enc_arr,
    )


def read_features(
    features_path: str | Path, idx: Sequence[int], images_attrs: dict[str, Any] | None = None
) -> torch.Tensor:
    """``features[idx, 0]`` (the un-mirrored images) as float32; with ``images_attrs`` (the images file's
    attributes) the features file must record the same ``paths_sha256``, i.e. belong to the same images."""
    path = Path(features_path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path}")
    attrs = hdf5.check_features_file(path, deep=False)
    if images_attrs is not None and attrs.get("paths_sha256") != images_attrs.get("paths_sha256"):
        raise ValueError(
            f"{path} was extracted from other images than --images (paths_sha256 differs): "
            "pass the features file made from the same images file"
        )
    with h5py.File(path, "r") as f:
        feats = torch.from_numpy(hdf5.read_rows(f[hdf5.FEATURES], idx)[:, 0].astype(np.float32))
    if not torch.isfinite(feats).all():
        raise ValueError(f"{path}: features of the chosen images contain NaN or infinite values")
    return feats


def read_factors(
    f: h5py.File, idx: Sequence[int]
) -> tuple[dict[str, np.ndarray], dict[str, list[str] | None]]:
    """Rows ``idx`` of every generative factor of an open images file (``shapes``), with category names."""
    if hdf5.FACTORS not in f:
        return {}, {}
    group = f[hdf5.FACTORS]
    factors, names = {}, {}
    for key in group:
        ds = group[key]
        factors[key] = hdf5.read_rows(ds, idx)
        cats = ds.attrs.get(hdf5.CATEGORIES)
        names[key] = [_str(c) for c in cats] if cats is not None else None
    return factors, names


def factor_names_of(source) -> dict[str, list[str] | None]:
    """Category names of each recorded factor of a dataset (None for continuous factors)."""
    specs = getattr(source, "factor_specs", None) or {}
    return {name: (list(cats) if cats else None) for name, (_, cats) in specs.items()}


def _str(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _short_name(key: str) -> str:
    """A figure label for a dataset key: the file stem, or the last dotted part (``skimage.data.coffee``)."""
    stem = key.rsplit("/", 1)[-1]
    for ext in (".jpg", ".jpeg", ".png", ".webp", ".bmp"):
        if stem.lower().endswith(ext):
            return stem[: -len(ext)]
    return stem.rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------- encoder-resolution crops


def encoder_crops(
    show: np.ndarray, paths: Sequence[str], encoder_size: int, image_root: str | Path | None = None
) -> np.ndarray:
    """uint8 [N, E, E, 3]: each original's centre crop at E when its recorded path is readable (under
    ``image_root``), else the stored crop resized to E."""
    from rcdm.data import decode_image

    enc = []
    for im, p in zip(show, paths):
        file = Path(image_root) / p if image_root else Path(p)
        try:
            if not file.is_file():
                raise OSError(str(file))
            enc.append(center_crop_arr(decode_image(file), encoder_size))
        except (OSError, ValueError):
            enc.append(_resize_uint8(im, encoder_size))
    return np.stack(enc)


def _resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
