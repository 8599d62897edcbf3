"""The shapes dataset: deterministic, factors recorded and visible in the pixels, closed-form areas."""

import math

import numpy as np
import pytest

from rcdm.data import open_dataset
from rcdm.shapes import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    PRIMARY_SIZE,
    Scene,
    Shape,
    ShapesSource,
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
