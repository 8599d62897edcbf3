"""A study's conditioning images: which ones, their stored crops, and the encoder's crops of the originals.

Which images (:class:`Selection`): explicit positions, explicit names (paths as the images file records
them, or their file names), or by default a seeded random draw over the whole set, stratified by class when
the set has labels (:func:`rcdm.subsets.stratified_draw`); never the first N.

What each image is (:class:`Sources`): ``show``, the crop at the model resolution S (the stored crop of an
images file, ``center_crop_arr`` of the original for a dataset), and ``enc``, the crop at the encoder's input
size E of the SAME original, exactly what extraction encoded. When E == S the two are the same crop. When
E != S, ``enc`` needs the original image: from ``image_root`` (the folder the recorded paths are relative
to), else from the folder the images file records (attribute ``root``), else by regenerating a registered
dataset (``shapes``, ``photos``) from its recorded settings; every original found is checked against the
stored crop. An original that cannot be found is an error (:class:`SourceImageError`) naming the image and
the settings to fix; only with ``allow_upsampled`` is the stored S px crop upsampled to E instead, and
``upsampled`` then says for which images. ``enc`` is read on first use: studies that take the clean
representations from a features file never need the originals.
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

#: largest mean absolute difference (uint8 units) between an original's crop at S and the stored crop for
#: the original to count as the stored image (decoders of different versions may differ by a unit or so)
SAME_IMAGE_TOLERANCE = 2.0


class SourceImageError(FileNotFoundError):
    """The original of a conditioning image, needed for its encoder-resolution crop, cannot be used."""


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
    crops: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None  # -> (enc, upsampled), on first use
    _enc: np.ndarray | None = None
    upsampled: np.ndarray | None = None  # bool [N] once ``enc`` was read: stored crop upsampled, no original

    def __len__(self) -> int:
        return len(self.show)

    @property
    def enc(self) -> np.ndarray:
        """uint8 [N, E, E, 3]: each original's centre crop at the encoder's input size."""
        if self._enc is None:
            if self.crops is None:
                raise ValueError("these sources have no encoder-resolution crops")
            self._enc, self.upsampled = self.crops()
        return self._enc

    @property
    def any_upsampled(self) -> bool:
        return self.upsampled is not None and bool(self.upsampled.any())


def from_images_file(
    images_path: str | Path,
    features_path: str | Path | None,
    selection: Selection,
    image_size: int,
    encoder_size: int,
    *,
    image_root: str | Path | None = None,
    allow_upsampled: bool = False,
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
        paths = [_str(f[hdf5.PATHS][i]) for i in idx]
        factors, factor_names = read_factors(f, idx)
    features = read_features(features_path, idx, attrs) if features_path else None

    def crops() -> tuple[np.ndarray, np.ndarray]:
        return encoder_crops(
            path,
            attrs,
            show,
            paths,
            idx,
            encoder_size,
            image_root=image_root,
            allow_upsampled=allow_upsampled,
        )

    names = [f"{i}" for i in idx]
    return Sources(show, names, labels_all[idx], factors, factor_names, features, idx, crops)


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
        crops=lambda: (enc_arr, np.zeros(len(idx), bool)),
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
    images_path: Path,
    attrs: dict[str, Any],
    show: np.ndarray,
    paths: Sequence[str],
    idx: Sequence[int],
    encoder_size: int,
    *,
    image_root: str | Path | None = None,
    allow_upsampled: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, E, E, 3] crops of the originals, bool [N] "stored crop upsampled instead")."""
    if show.shape[1] == encoder_size:  # extraction cropped the same original at the same size
        return show, np.zeros(len(show), bool)
    find = original_finder(attrs, image_root)
    out, upsampled = [], []
    for crop, key, i in zip(show, paths, idx):
        try:
            original = find(key)
            check_same_image(original, crop, key)
            out.append(center_crop_arr(original, encoder_size))
            upsampled.append(False)
        except (OSError, ValueError) as err:
            if not allow_upsampled:
                raise SourceImageError(
                    f"{images_path}: image {i} ({key!r}) is needed at the encoder's {encoder_size} px "
                    f"input, cropped from its original as extraction did (the file stores {show.shape[1]} px "
                    f"crops), but {err}. Pass --image-root FOLDER (the folder the images file's paths "
                    "are relative to), or --allow-upsampled-crops to upsample the stored "
                    f"{show.shape[1]} px crop instead (the CSV and the figure then say so)"
                ) from err
            out.append(center_crop_arr(Image.fromarray(crop), encoder_size))
            upsampled.append(True)
    return np.stack(out), np.asarray(upsampled, bool)


def original_finder(attrs: dict[str, Any], image_root: str | Path | None) -> Callable[[str], Image.Image]:
    """``key -> original image`` for an images file: under ``image_root``, else under its recorded folder
    (``root``), else regenerated from its registered dataset (``shapes``, ``photos``)."""
    from rcdm.data import decode_image

    root = image_root or attrs.get("root") or None
    if root:
        where = "--image-root" if image_root else "the folder the images file records (attribute root)"

        def from_folder(key: str) -> Image.Image:
            file = Path(root) / key
            if not file.is_file():
                raise FileNotFoundError(f"it is not at {file} (looked under {where})")
            return decode_image(file)

        return from_folder
    try:
        return _dataset_finder(attrs)
    except (OSError, ValueError) as err:
        reason = (
            "the images file records no folder its paths are relative to (attribute root), and its dataset "
            f"{attrs.get('dataset')!r} cannot be regenerated ({err})"
        )

    def nowhere(key: str) -> Image.Image:
        raise FileNotFoundError(reason)

    return nowhere


def _recorded_options(attrs: dict[str, Any]) -> dict[str, Any]:
    """The dataset settings an images file records: the shapes style (the default one for older files)."""
    if attrs.get("dataset") != "shapes":
        return {}
    from dataclasses import asdict

    from rcdm.shapes import Style

    return asdict(Style.from_attrs(attrs))


def _dataset_finder(attrs: dict[str, Any]) -> Callable[[str], Image.Image]:
    """Originals of a registered dataset, regenerated from the settings the images file records."""
    from rcdm.data import open_dataset

    requested = int(attrs.get("num_images_requested", -1))
    source = open_dataset(
        attrs["dataset"],
        attrs.get("split") or "train",
        None if requested < 0 else requested,
        int(attrs.get("selection_seed", 0)),
        int(attrs.get("native_size", 64)),
        options=_recorded_options(attrs),
    )
    keys = {source.key(i): i for i in range(len(source))}

    def from_dataset(key: str) -> Image.Image:
        if key not in keys:
            raise FileNotFoundError(
                f"dataset {attrs['dataset']!r} regenerated from its settings has no {key!r}"
            )
        return source.load(keys[key])

    return from_dataset


def check_same_image(original: Image.Image, crop: np.ndarray, key: str) -> None:
    """ValueError unless ``original`` cropped at the stored size gives the stored ``crop`` (to tolerance)."""
    again = center_crop_arr(original, crop.shape[0]).astype(np.int16)
    diff = float(np.abs(again - crop.astype(np.int16)).mean()) if again.shape == crop.shape else float("inf")
    if diff > SAME_IMAGE_TOLERANCE:
        raise ValueError(
            f"the original found for {key!r} is not the stored image (its crop differs by {diff:.1f} grey "
            "levels on average)"
        )
