"""The shapes dataset: deterministic, factors recorded and visible in the pixels, closed-form areas."""

import math

import numpy as np
import pytest

from rcdm.data import open_dataset
from rcdm.shapes import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_STYLE,
    KINDS,
    PRIMARY_SIZE,
    Scene,
    Shape,
    ShapesSource,
    Style,
    render_scene,
    sample_scene,
)


def test_deterministic_per_seed_split_and_index():
    a = ShapesSource("train", 20, seed=3, size=32)
    b = ShapesSource("train", 20, seed=3, size=32)
    for i in (0, 7, 19):
        np.testing.assert_array_equal(np.asarray(a.load(i)), np.asarray(b.load(i)))
        assert a.factors(i) == b.factors(i)
    other_seed = ShapesSource("train", 20, seed=4, size=32)
    val = ShapesSource("val", 20, seed=3, size=32)
    assert [a.factors(i) for i in range(20)] != [other_seed.factors(i) for i in range(20)]
    assert [a.factors(i) for i in range(20)] != [val.factors(i) for i in range(20)]
    # an image does not depend on how many images the split has (shards render identically)
    assert ShapesSource("train", 5, seed=3, size=32).factors(4) == a.factors(4)


def test_factors_are_in_range_and_varied():
    src = ShapesSource("train", 300, seed=0, size=64)
    f = [src.factors(i) for i in range(len(src))]
    assert set(f[0]) == {"kind", "colour", "size", "x", "y", "rotation", "background", "count"}
    for d in f:
        r = d["size"] / 2
        assert PRIMARY_SIZE[0] <= d["size"] <= PRIMARY_SIZE[1]
        assert r - 1e-9 <= d["x"] <= 1 - r + 1e-9 and r - 1e-9 <= d["y"] <= 1 - r + 1e-9
        assert 0 <= d["rotation"] < 360 and 1 <= d["count"] <= 3
    assert {d["kind"] for d in f} == set(range(len(KINDS)))
    assert {d["colour"] for d in f} == set(range(len(COLOURS)))
    assert {d["background"] for d in f} == set(range(len(BACKGROUNDS)))
    assert {d["count"] for d in f} == {1, 2, 3}
    assert [src.label(i) for i in range(10)] == [d["kind"] for d in f[:10]]


def test_pixels_show_the_recorded_factors():
    size = 64
    src = ShapesSource("val", 60, seed=1, size=size)
    for i in range(len(src)):
        f = src.factors(i)
        arr = np.asarray(src.load(i))
        assert arr.shape == (size, size, 3) and arr.dtype == np.uint8
        centre = arr[int(f["y"] * size), int(f["x"] * size)]
        assert tuple(centre) == list(COLOURS.values())[f["colour"]], (i, f)
        background = np.array(list(BACKGROUNDS.values())[f["background"]], dtype=np.uint8)
        assert (arr == background).all(axis=-1).mean() > 0.3, (i, f)


@pytest.mark.parametrize(
    "kind, area",
    [
        ("circle", math.pi),
        ("square", 2.0),
        ("triangle", 3 * math.sqrt(3) / 4),
        ("hexagon", 3 * math.sqrt(3) / 2),
    ],
)
def test_shape_area_matches_closed_form(kind, area):
    size, diameter = 64, 0.6
    radius_px = diameter * size / 2
    scene = Scene(background=0, shapes=(Shape(KINDS.index(kind), 0, diameter, 0.5, 0.5, 17.0),))
    arr = np.asarray(render_scene(scene, size)).astype(np.float64)
    coverage = arr[..., 0].sum() / list(COLOURS.values())[0][0]  # red on black: antialiased area
    assert coverage == pytest.approx(area * radius_px**2, rel=0.03)


def test_rotation_by_180_flips_a_centred_triangle_upside_down():
    def tri(rotation: float) -> np.ndarray:
        scene = Scene(background=1, shapes=(Shape(KINDS.index("triangle"), 2, 0.6, 0.5, 0.5, rotation),))
        return np.asarray(render_scene(scene, 64)).astype(np.float64)

    up, down = tri(0.0), tri(180.0)
    assert np.abs(up - down).mean() > 5
    assert np.abs(up[::-1] - down).mean() < 2


def test_rendering_is_antialiased_and_fast():
    import time

    src = ShapesSource("train", 64, seed=0, size=64)
    t0 = time.perf_counter()
    images = [np.asarray(src.load(i)) for i in range(64)]
    assert time.perf_counter() - t0 < 2.0
    palette = {*COLOURS.values(), *BACKGROUNDS.values()}
    edge = sum(tuple(p) not in palette for im in images for p in im.reshape(-1, 3))
    assert edge > 0  # blended edge pixels exist


def test_open_dataset_shapes_and_scene_function():
    src = open_dataset("shapes", split="val", num_images=12, seed=5, native_size=40)
    assert len(src) == 12 and src.key(3) == "shapes/val/0000003"
    assert np.asarray(src.load(0)).shape == (40, 40, 3)
    assert sample_scene(5, "val", 3).factors() == src.factors(3)
    with pytest.raises(IndexError):
        src.factors(12)


# ------------------------------------------------------------------------------------------------ style
def test_default_style_draws_the_images_it_always_drew():
    """Golden: the factors the generator gave before styles existed (the default style keeps every draw)."""
    assert sample_scene(7, "val", 11).factors() == {
        "kind": 4, "colour": 2, "size": 0.3916146484399579, "x": 0.5367762054586122, "y": 0.6474490029199732,
        "rotation": 57.33849776522645, "background": 0, "count": 1,
    }  # fmt: skip
    assert sample_scene(7, "val", 11, Style()) == sample_scene(7, "val", 11, DEFAULT_STYLE)


def test_a_style_draws_only_its_kinds_counts_rotations_and_sizes():
    style = Style(kinds=("circle", "square", "cross"), max_count=1, rotation=0, size=(0.5, 0.8))
    src = ShapesSource("train", 300, seed=0, size=32, style=style)
    f = [src.factors(i) for i in range(len(src))]
    assert {d["kind"] for d in f} == {KINDS.index(k) for k in style.kinds}
    assert {d["count"] for d in f} == {1} and {d["rotation"] for d in f} == {0.0}
    assert all(0.5 <= d["size"] <= 0.8 for d in f)
    # upright: an upright square fills its bounding box, so the colour reaches the corner of its circumscribed
    # square's inscribed box (half diagonal 0.35 of the diameter from the centre along both axes)
    squares = [i for i, d in enumerate(f) if d["kind"] == KINDS.index("square")][:10]
    for i in squares:
        d, arr = f[i], np.asarray(ShapesSource("train", 300, seed=0, size=128, style=style).load(i))
        off = 0.3 * d["size"] * 128
        for sx in (-1, 1):
            for sy in (-1, 1):
                px = arr[int(d["y"] * 128 + sy * off), int(d["x"] * 128 + sx * off)]
                assert tuple(px) == list(COLOURS.values())[d["colour"]], (i, sx, sy)
    # the rotation range scales every draw: half the range halves each rotation, the rest unchanged
    half = ShapesSource("train", 20, seed=0, size=16, style=Style(rotation=180))
    full = ShapesSource("train", 20, seed=0, size=16)
    for i in range(20):
        a, b = half.factors(i), full.factors(i)
        assert a["rotation"] == pytest.approx(b["rotation"] / 2) and {**a, "rotation": 0} == {
            **b,
            "rotation": 0,
        }


def test_style_is_recorded_and_read_back():
    style = Style(kinds=("triangle", "cross"), max_count=2, rotation=45.0, size=(0.4, 0.9))
    src = ShapesSource("val", 4, seed=1, size=16, style=style)
    attrs = src.attrs()
    assert attrs["shape_kinds"] == "triangle,cross" and attrs["max_rotation"] == 45.0
    assert Style.from_attrs(attrs) == style
    assert Style.from_attrs({"seed": 0, "native_size": 64, "max_count": 3}) == DEFAULT_STYLE  # an older file
    options = {"kinds": ["triangle", "cross"], "max_count": 2, "rotation": 45.0, "size": [0.4, 0.9]}
    via_registry = open_dataset("shapes", "val", 4, 1, 16, options=options)
    assert [via_registry.factors(i) for i in range(4)] == [src.factors(i) for i in range(4)]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"kinds": ("circle", "blob")}, "kinds"),
        ({"kinds": ()}, "kinds"),
        ({"kinds": ("circle", "circle")}, "kinds"),
        ({"max_count": 0}, "max_count 0"),
        ({"rotation": 400}, "rotation 400"),
        ({"size": (0.8, 0.5)}, "size"),
        ({"size": (0.0, 0.5)}, "size"),
    ],
)
def test_a_bad_style_is_refused_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        Style(**fields)


def test_only_shapes_take_style_options(tmp_path):
    with pytest.raises(ValueError, match="photos dataset has no settings max_count"):
        open_dataset("photos", options={"max_count": 1})
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="is a folder: it has no settings kinds"):
        open_dataset(str(tmp_path), options={"kinds": ["circle"]})
