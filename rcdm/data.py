"""Datasets as indexable image sources: image folders, scikit-image's ``photos``, the built-in ``shapes``.

A source has a fixed, deterministic order and exposes, per index ``i``: ``key(i)`` (a stable identifier, the
relative path for folders), ``label(i)`` (class index or -1), ``load(i)`` (an RGB PIL image, or
``BadImageError``) and ``factors(i)`` (generative factors; empty except for ``shapes``).
``open_dataset(spec)`` picks one from a spec string: ``shapes``, ``photos``, or a folder path; more can be
registered.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from rcdm.image_source import ImageSource

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
BAD_IMAGE_POLICIES = ("skip", "error")


class BadImageError(ValueError):
    """An image file that cannot be decoded (empty, truncated, not an image)."""


class EmptyDatasetError(ValueError):
    """A dataset spec that resolves to no images."""


# ----------------------------------------------------------------------------------------------- decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent images (RGBA, LA, PA, palette with transparency) are composited on white; 16-bit grayscale
    (``I;16*``, and ``I`` holding values above 255) is rescaled from [0, 65535]; float images are clipped to
    [0, 255]; everything else (L, 1, P, CMYK, YCbCr, ...) goes through PIL's own conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64))
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file fully into an RGB PIL image; raise ``BadImageError`` saying why it cannot be.

    EXIF orientation is not applied, like the published data loaders (so crops match theirs).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except BadImageError:
        raise
    except UnidentifiedImageError as err:
        raise BadImageError(f"{path}: not an image PIL can identify") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{path}: unreadable ({type(err).__name__}: {err})") from err


def array_to_rgb(arr: np.ndarray) -> Image.Image:
    """An in-memory image array (grayscale, RGB or RGBA; uint8, bool or float in [0, 1]) -> RGB PIL image."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise TypeError(f"unsupported image array dtype {arr.dtype}")
    return to_rgb(Image.fromarray(arr))


# ----------------------------------------------------------------------------------------------- sources


class FolderSource(ImageSource):
    """All images under ``root``, recursively, in sorted order (hidden files and folders ignored).

    ImageNet layout: each top-level sub-folder that contains images is a class (label = its index in sorted
    order); images directly in ``root`` get label -1 (a flat folder has only those).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        self.name = str(root)
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(self.root)
            files.extend(
                (rel / f).as_posix()
                for f in filenames
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
            )
        self.files = sorted(files)
        top = sorted({f.split("/", 1)[0] for f in self.files if "/" in f})
        self.classes = top
        index = {c: k for k, c in enumerate(top)}
        self.labels = np.array([index[f.split("/", 1)[0]] if "/" in f else -1 for f in self.files], np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def key(self, i: int) -> str:
        return self.files[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def load(self, i: int) -> Image.Image:
        return decode_image(self.root / self.files[i])

    def attrs(self) -> dict[str, Any]:
        return {"root": str(self.root.resolve()), "num_classes": len(self.classes)}


#: skimage.data photographs, in order; those the installed scikit-image cannot load offline are left out
PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "cell",
    "retina",
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "clock",
    "colorwheel",
    "logo",
    "microaneurysms",
    "stereo_motorcycle",
)


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    arr = getattr(skimage.data, name)()
    return arr[0] if isinstance(arr, tuple) else arr


def available_photos(names: Sequence[str] = PHOTO_NAMES) -> list[str]:
    """The photos of ``names`` that load from the installed scikit-image without a download."""
    import skimage.data

    found = []
    for name in names:
        if not hasattr(skimage.data, name):
            continue
        try:
            _skimage_photo(name)
        except Exception as err:  # noqa: BLE001 -- optional data: missing files, no pooch, no network
            log.info("photos: %s not available offline (%s)", name, type(err).__name__)
            continue
        found.append(name)
    return found


class PhotosSource(ImageSource):
    """scikit-image's bundled photographs (out-of-distribution conditioning); grayscale ones become RGB."""

    name = "photos"

    def __init__(self, names: Sequence[str] | None = None):
        self.names = available_photos(PHOTO_NAMES if names is None else names)

    def __len__(self) -> int:
        return len(self.names)

    def key(self, i: int) -> str:
        return f"skimage.data.{self.names[i]}"

    def load(self, i: int) -> Image.Image:
        return array_to_rgb(_skimage_photo(self.names[i]))


class SubsetSource(ImageSource):
    """A view of ``base`` restricted to ``indices`` (in the given order)."""

    def __init__(self, base: ImageSource, indices: Sequence[int]):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = base.name
        self.factor_specs = base.factor_specs

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, i: int) -> str:
        return self.base.key(int(self.indices[i]))

    def label(self, i: int) -> int:
        return self.base.label(int(self.indices[i]))

    def load(self, i: int) -> Image.Image:
        return self.base.load(int(self.indices[i]))

    def factors(self, i: int) -> dict[str, float | int]:
        return self.base.factors(int(self.indices[i]))

    def attrs(self) -> dict[str, Any]:
        return self.base.attrs()


def select_subset(source: ImageSource, num_images: int | None, seed: int = 0) -> ImageSource:
    """At most ``num_images`` images of ``source``: a seeded random subset kept in the source's order.

    A random (not leading) subset keeps classes balanced in class-sorted folders such as ImageNet.
    """
    if num_images is None or num_images >= len(source):
        return source
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    picked = np.sort(np.random.default_rng(seed).choice(len(source), size=num_images, replace=False))
    return SubsetSource(source, picked)


# ----------------------------------------------------------------------------------------------- registry

DatasetFactory = Callable[..., ImageSource]
_REGISTRY: dict[str, DatasetFactory] = {}


def register_dataset(name: str, factory: DatasetFactory) -> None:
    """Register ``factory(split=, num_images=, seed=, native_size=, **options) -> ImageSource`` under
    ``name`` (``options``: the dataset's own settings, e.g. the shapes style; unknown ones are refused)."""
    _REGISTRY[name] = factory


def _shapes_factory(
    split: str, num_images: int | None, seed: int, native_size: int, **style: Any
) -> ImageSource:
    from rcdm.shapes import DEFAULT_SPLIT_SIZES, ShapesSource, Style

    n = DEFAULT_SPLIT_SIZES.get(split, DEFAULT_SPLIT_SIZES["val"]) if num_images is None else num_images
    return ShapesSource(split=split, num_images=n, seed=seed, size=native_size, style=Style(**style))


def _photos_factory(
    split: str, num_images: int | None, seed: int, native_size: int, **options: Any
) -> ImageSource:
    if options:
        raise ValueError(f"the photos dataset has no settings {', '.join(sorted(options))}")
    return select_subset(PhotosSource(), num_images, seed)


register_dataset("shapes", _shapes_factory)
register_dataset("photos", _photos_factory)


def open_dataset(
    spec: str,
    split: str = "train",
    num_images: int | None = None,
    seed: int = 0,
    native_size: int = 64,
    options: dict[str, Any] | None = None,
) -> ImageSource:
    """Resolve a dataset spec: a registered name (``shapes``, ``photos``) or an image folder path.

    For folders ``split`` is only recorded (point ``spec`` at the split's folder); ``num_images`` keeps a
    seeded random subset. For ``shapes``, ``split``/``seed``/``native_size`` and ``options`` (the fields of
    :class:`rcdm.shapes.Style`) define the generated images. Raises ``EmptyDatasetError`` when nothing is
    found.
    """
    if spec in _REGISTRY:
        source = _REGISTRY[spec](
            split=split, num_images=num_images, seed=seed, native_size=native_size, **(options or {})
        )
    elif options:
        raise ValueError(f"dataset {spec!r} is a folder: it has no settings {', '.join(sorted(options))}")
    elif Path(spec).is_dir():
        source = select_subset(FolderSource(spec), num_images, seed)
    else:
        raise FileNotFoundError(
            f"dataset {spec!r} is neither a registered dataset ({', '.join(sorted(_REGISTRY))}) nor a folder"
        )
    if len(source) == 0:
        raise EmptyDatasetError(
            f"dataset {spec!r} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, any case)"
        )
    return source


def open_dataset_input(spec: str, *args: Any, option: str = "--dataset", **kwargs: Any) -> ImageSource:
    """:func:`open_dataset` for a stage's input: a folder that does not exist or holds no images is an
    :class:`rcdm.errors.InputFileError` naming it and what to do (``option``: where the spec came from)."""
    from rcdm.errors import InputFileError

    try:
        return open_dataset(spec, *args, **kwargs)
    except FileNotFoundError as err:  # neither a registered name nor a folder
        raise InputFileError(
            spec,
            f"no such folder (nor a registered dataset: {', '.join(sorted(_REGISTRY))})",
            f"check {option} (the data folders of the config)",
        ) from err
    except EmptyDatasetError as err:
        raise InputFileError(
            spec,
            f"holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in it and its sub-folders)",
            f"put the images there, or point {option} at the folder that holds them",
        ) from err


def check_dataset_input(spec: str, option: str = "--dataset") -> None:
    """For a folder spec, the error :func:`open_dataset_input` gives when it is missing or holds no images
    (a registered name passes): a stage checks its inputs before it starts."""
    if spec not in _REGISTRY:
        open_dataset_input(spec, option=option)
