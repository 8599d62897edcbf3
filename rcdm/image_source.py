"""The dataset interface every image source implements (folders, ``photos``, the built-in ``shapes``)."""

from __future__ import annotations

from typing import Any

from PIL import Image


class ImageSource:
    """Base class of datasets: a fixed, deterministic list of images."""

    name: str = "source"
    #: generative factor -> (numpy dtype name, category names or None); empty when none are recorded
    factor_specs: dict[str, tuple[str, list[str] | None]] = {}

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        raise NotImplementedError

    def label(self, i: int) -> int:
        return -1

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def factors(self, i: int) -> dict[str, float | int]:
        return {}

    def attrs(self) -> dict[str, Any]:
        """Extra metadata recorded as HDF5 attributes of the images file."""
        return {}
