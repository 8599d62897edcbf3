"""The built-in ``shapes`` dataset: coloured geometric shapes on plain backgrounds, generated from a seed.

Each image has one *primary* shape, drawn last and larger than any other, and up to ``max_count - 1`` smaller
distractor shapes behind it. The recorded generative factors describe the primary shape and the scene:

- ``kind`` (index into ``KINDS``), ``colour`` (index into ``COLOURS``), ``background`` (index into
  ``BACKGROUNDS``): categorical;
- ``size``: diameter of the primary shape's circumscribed circle, as a fraction of the image side;
- ``x``, ``y``: its centre, as fractions of the width / height (y grows downwards);
- ``rotation``: degrees in [0, 360), counter-clockwise (meaningless for circles, periodic for symmetric ones);
- ``count``: number of shapes in the image (primary included).

A :class:`Style` narrows what a set draws (which kinds, how many shapes, how much rotation, how large); the
default draws everything above. Image ``i`` of a split depends only on ``(seed, split, i)`` and the style, so
any slice renders identically in any shard.
Rendering draws at 4x resolution with PIL and box-filters down (antialiased edges).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from rcdm.image_source import ImageSource

KINDS = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (245, 140, 20),
    "purple": (120, 50, 170),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "brown": (90, 60, 35),
}
FACTORS = ("kind", "colour", "size", "x", "y", "rotation", "background", "count")
PRIMARY_SIZE = (0.3, 0.7)
DISTRACTOR_SIZE = (0.12, 0.28)
DEFAULT_SPLIT_SIZES = {"train": 10000, "val": 1000}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Style:
    """What a shapes set draws: ``kinds`` (names from ``KINDS``), up to ``max_count`` shapes, rotations in
    ``[0, rotation)`` degrees (0: upright), primary diameters in ``size``. The default style draws what the
    set always drew (the same images); the demo narrows it so that a 16 px sample can show the kind."""

    kinds: tuple[str, ...] = KINDS
    max_count: int = 3
    rotation: float = 360.0
    size: tuple[float, float] = PRIMARY_SIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "size", (float(self.size[0]), float(self.size[1])))
        unknown = [k for k in self.kinds if k not in KINDS]
        problems = []
        if not self.kinds or unknown or len(set(self.kinds)) != len(self.kinds):
            problems.append(f"kinds {list(self.kinds)} (distinct names from {', '.join(KINDS)})")
        if self.max_count < 1:
            problems.append(f"max_count {self.max_count} (at least 1)")
        if not 0.0 <= self.rotation <= 360.0:
            problems.append(f"rotation {self.rotation} (degrees in [0, 360])")
        if not 0.0 < self.size[0] <= self.size[1] <= 1.0:
            problems.append(f"size {list(self.size)} (0 < min <= max <= 1, fractions of the image side)")
        if problems:
            raise ValueError("invalid shapes style: " + "; ".join(problems))

    def attrs(self) -> dict[str, object]:
        """The style as the images file records it (read back by :meth:`from_attrs`)."""
        return {
            "max_count": self.max_count,
            "shape_kinds": ",".join(self.kinds),
            "max_rotation": self.rotation,
            "primary_size_min": self.size[0],
            "primary_size_max": self.size[1],
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> Style:
        """The style an images file records; files written before styles existed hold the default one."""
        d = cls()
        kinds = str(attrs.get("shape_kinds", "") or ",".join(d.kinds))
        return cls(
            kinds=tuple(kinds.split(",")),
            max_count=int(attrs.get("max_count", d.max_count)),
            rotation=float(attrs.get("max_rotation", d.rotation)),
            size=(
                float(attrs.get("primary_size_min", d.size[0])),
                float(attrs.get("primary_size_max", d.size[1])),
            ),
        )


DEFAULT_STYLE = Style()


@dataclass(frozen=True)
class Shape:
    """One shape: ``size`` (circumscribed diameter), ``x``, ``y`` as fractions of the image side."""

    kind: int
    colour: int
    size: float
    x: float
    y: float
    rotation: float


@dataclass(frozen=True)
class Scene:
    """A full image: background index and shapes in drawing order (the primary shape last)."""

    background: int
    shapes: tuple[Shape, ...]

    @property
    def primary(self) -> Shape:
        return self.shapes[-1]

    def factors(self) -> dict[str, float | int]:
        p = self.primary
        return {
            "kind": p.kind,
            "colour": p.colour,
            "size": p.size,
            "x": p.x,
            "y": p.y,
            "rotation": p.rotation,
            "background": self.background,
            "count": len(self.shapes),
        }


def sample_scene(seed: int, split: str, index: int, style: Style = DEFAULT_STYLE) -> Scene:
    """Draw the scene of image ``index`` of ``split`` in ``style``; a pure function of its arguments."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    max_count = style.max_count
    count = 1 if max_count == 1 or rng.random() < 0.5 else int(rng.integers(2, max_count + 1))
    background = int(rng.integers(len(BACKGROUNDS)))
    kinds = [KINDS.index(k) for k in style.kinds]
    shapes = []
    for k in range(count):
        primary = k == count - 1
        low, high = style.size if primary else DISTRACTOR_SIZE
        size = float(rng.uniform(low, high))
        margin = size / 2 if primary else 0.0  # the primary shape stays fully inside the image
        shapes.append(
            Shape(
                kind=kinds[int(rng.integers(len(kinds)))],
                colour=int(rng.integers(len(COLOURS))),
                size=size,
                x=float(rng.uniform(margin, 1 - margin)),
                y=float(rng.uniform(margin, 1 - margin)),
                rotation=float(rng.uniform(0.0, 360.0)) * (style.rotation / 360.0),
            )
        )
    return Scene(background=background, shapes=tuple(shapes))


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    return [
        ((1.0 if j % 2 == 0 else inner) * math.cos(math.pi / 2 + j * math.pi / points),
         (1.0 if j % 2 == 0 else inner) * math.sin(math.pi / 2 + j * math.pi / points))
        for j in range(2 * points)
    ]  # fmt: skip


def _regular(n: int, start: float) -> list[tuple[float, float]]:
    return [(math.cos(start + 2 * math.pi * j / n), math.sin(start + 2 * math.pi * j / n)) for j in range(n)]


def _cross(half_width: float = 0.3) -> list[tuple[float, float]]:
    w = half_width
    arm = math.sqrt(1.0 - w * w)  # arm ends lie on the unit circle
    return [(w, w), (w, arm), (-w, arm), (-w, w), (-arm, w), (-arm, -w),
            (-w, -w), (-w, -arm), (w, -arm), (w, -w), (arm, -w), (arm, w)]  # fmt: skip


# unit-circumradius outlines, y up
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3, math.pi / 2),
    "star": _star(5, 0.45),
    "hexagon": _regular(6, 0.0),
    "cross": _cross(),
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, side: int) -> None:
    fill = tuple(COLOURS.values())[shape.colour]
    radius = shape.size * side / 2
    cx, cy = shape.x * side, shape.y * side
    kind = KINDS[shape.kind]
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        return
    c, s = math.cos(math.radians(shape.rotation)), math.sin(math.radians(shape.rotation))
    # rotate counter-clockwise in y-up coordinates, then flip y for the image grid
    points = [(cx + radius * (c * u - s * v), cy - radius * (s * u + c * v)) for u, v in _OUTLINES[kind]]
    draw.polygon(points, fill=fill)


def render_scene(scene: Scene, size: int) -> Image.Image:
    """Render ``scene`` as an antialiased RGB image of ``size`` x ``size`` pixels."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), tuple(BACKGROUNDS.values())[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, side)
    return image.reduce(SUPERSAMPLE)


class ShapesSource(ImageSource):
    """``num_images`` shapes images of one split at native resolution ``size``; label = primary kind."""

    factor_specs: dict[str, tuple[str, list[str] | None]] = {
        "kind": ("int64", list(KINDS)),
        "colour": ("int64", list(COLOURS)),
        "size": ("float32", None),
        "x": ("float32", None),
        "y": ("float32", None),
        "rotation": ("float32", None),
        "background": ("int64", list(BACKGROUNDS)),
        "count": ("int64", None),
    }

    def __init__(self, split: str = "train", num_images: int = 1000, seed: int = 0, size: int = 64,
                 style: Style = DEFAULT_STYLE):  # fmt: skip
        if num_images < 0 or size < 1:
            raise ValueError(f"invalid shapes settings: num_images={num_images}, size={size}")
        self.split, self.num_images, self.seed, self.size, self.style = split, num_images, seed, size, style
        self.name = "shapes"

    def __len__(self) -> int:
        return self.num_images

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.num_images:
            raise IndexError(f"shapes index {i} out of range [0, {self.num_images})")
        return sample_scene(self.seed, self.split, i, self.style)

    def key(self, i: int) -> str:
        return f"shapes/{self.split}/{i:07d}"

    def label(self, i: int) -> int:
        return self.scene(i).primary.kind

    def load(self, i: int) -> Image.Image:
        return render_scene(self.scene(i), self.size)

    def factors(self, i: int) -> dict[str, float | int]:
        return self.scene(i).factors()

    def attrs(self) -> dict[str, object]:
        return {"seed": self.seed, "native_size": self.size, **self.style.attrs()}
