"""Image folders (layout, order, odd modes, broken files), the photos set, subsets and the registry."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcdm.data import (
    BadImageError,
    EmptyDatasetError,
    FolderSource,
    PhotosSource,
    decode_image,
    open_dataset,
    select_subset,
)

RED_HALF = (255, 0, 0, 128)


def _png16_rgb(path: Path, arr: np.ndarray) -> None:
    """Write a 16-bit RGB PNG by hand (PIL cannot write one)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def build_odd_folder(root: Path) -> dict[str, tuple[int, int, int] | None]:
    """A class-layout folder of odd-mode and broken files.

    Returns key -> expected RGB of pixel (0, 0), or None for files that must be skipped as bad.
    """
    a, b = root / "animals", root / "broken"
    a.mkdir(parents=True)
    b.mkdir()
    expected: dict[str, tuple[int, int, int] | None] = {}

    Image.new("L", (20, 16), 100).save(a / "gray.png")
    expected["animals/gray.png"] = (100, 100, 100)
    Image.new("CMYK", (20, 16), (0, 0, 0, 0)).save(a / "cmyk.jpg", quality=100)
    expected["animals/cmyk.jpg"] = (255, 255, 255)
    rgba = Image.new("RGBA", (20, 16), (0, 0, 255, 0))  # fully transparent blue -> white
    rgba.putpixel((1, 0), RED_HALF)
    rgba.save(a / "rgba.png")
    expected["animals/rgba.png"] = (255, 255, 255)
    pal = Image.new("P", (20, 16), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(a / "palette.PNG")
    expected["animals/palette.PNG"] = (10, 20, 30)
    Image.fromarray(np.full((16, 20), 257 * 200, dtype=np.uint16)).save(a / "gray16.png")
    expected["animals/gray16.png"] = (200, 200, 200)
    _png16_rgb(a / "rgb16.png", np.full((16, 20, 3), [0x1234, 0xABCD, 0xFFFF], dtype=np.uint16))
    expected["animals/rgb16.png"] = (0x12, 0xAB, 0xFF)
    Image.new("1", (20, 16), 1).save(a / "bits.bmp")
    expected["animals/bits.bmp"] = (255, 255, 255)
    Image.new("RGB", (20, 16), (1, 2, 3)).save(a / "lossless.webp", lossless=True)
    expected["animals/lossless.webp"] = (1, 2, 3)
    Image.new("RGB", (20, 16), (9, 8, 7)).save(root / "loose.png")
    expected["loose.png"] = (9, 8, 7)

    (b / "zero.jpg").write_bytes(b"")
    expected["broken/zero.jpg"] = None
    full = root / "tmp_full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    (b / "truncated.jpg").write_bytes(full.read_bytes()[:700])
    full.unlink()
    expected["broken/truncated.jpg"] = None
    (b / "text.jpg").write_text("this is not an image\n")
    expected["broken/text.jpg"] = None

    (a / "notes.txt").write_text("ignored: not an image extension")
    (a / ".hidden.png").write_bytes(b"")  # hidden files (e.g. partial writes) are ignored
    return expected


def test_folder_layout_order_and_labels(tmp_path):
    expected = build_odd_folder(tmp_path)
    src = FolderSource(tmp_path)
    assert src.files == sorted(expected)
    assert src.classes == ["animals", "broken"]
    labels = {src.key(i): src.label(i) for i in range(len(src))}
    assert labels["loose.png"] == -1
    assert labels["animals/gray.png"] == 0 and labels["broken/zero.jpg"] == 1


def test_odd_modes_convert_and_bad_files_raise(tmp_path):
    expected = build_odd_folder(tmp_path)
    src = FolderSource(tmp_path)
    for i in range(len(src)):
        key, want = src.key(i), expected[src.key(i)]
        if want is None:
            with pytest.raises(BadImageError, match=key.split("/")[-1]):
                src.load(i)
            continue
        image = src.load(i)
        assert image.mode == "RGB" and image.size == (20, 16), key
        got = image.getpixel((0, 0))
        tol = 6 if key.endswith(".jpg") else 0
        assert np.abs(np.subtract(got, want)).max() <= tol, (key, got, want)
    # half-transparent red over white
    assert decode_image(tmp_path / "animals/rgba.png").getpixel((1, 0)) == (255, 127, 127)


def test_bad_file_reasons(tmp_path):
    build_odd_folder(tmp_path)
    with pytest.raises(BadImageError, match="empty file"):
        decode_image(tmp_path / "broken/zero.jpg")
    with pytest.raises(BadImageError, match="not an image"):
        decode_image(tmp_path / "broken/text.jpg")
    with pytest.raises(BadImageError, match="unreadable"):
        decode_image(tmp_path / "broken/truncated.jpg")


def test_flat_folder_gets_label_minus_one_and_any_extension_case(tmp_path):
    for name in ("b.JPEG", "a.Png", "c.bmp"):
        Image.new("RGB", (8, 8)).save(
            tmp_path / name, format={"JPEG": "JPEG", "Png": "PNG", "bmp": "BMP"}[name[2:]]
        )
    src = open_dataset(str(tmp_path))
    assert [src.key(i) for i in range(3)] == ["a.Png", "b.JPEG", "c.bmp"]
    assert {src.label(i) for i in range(3)} == {-1}


def test_empty_and_missing_datasets_are_clear_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(EmptyDatasetError, match="no images"):
        open_dataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a registered dataset"):
        open_dataset(str(tmp_path / "nope"))


def test_subset_is_seeded_sorted_and_spread(tmp_path):
    for c in range(4):
        (tmp_path / f"class{c}").mkdir()
        for k in range(10):
            Image.new("RGB", (4, 4)).save(tmp_path / f"class{c}" / f"{k}.png")
    full = FolderSource(tmp_path)
    sub = select_subset(full, 8, seed=1)
    again = select_subset(full, 8, seed=1)
    keys = [sub.key(i) for i in range(8)]
    assert keys == [again.key(i) for i in range(8)] and keys == sorted(keys)
    assert keys != [select_subset(full, 8, seed=2).key(i) for i in range(8)]
    assert len({sub.label(i) for i in range(8)}) > 1
    assert select_subset(full, 100) is full


def test_photos_load_offline_as_rgb():
    src = open_dataset("photos")
    names = [src.key(i) for i in range(len(src))]
    assert len(src) >= 8 and "skimage.data.astronaut" in names and "skimage.data.camera" in names
    by_name = {n: i for i, n in enumerate(names)}
    camera = np.asarray(src.load(by_name["skimage.data.camera"]))  # grayscale source
    assert camera.ndim == 3 and camera.shape[2] == 3
    assert (camera[..., 0] == camera[..., 1]).all() and (camera[..., 1] == camera[..., 2]).all()
    for i in range(len(src)):
        assert src.load(i).mode == "RGB"
    assert src.label(0) == -1
    assert len(PhotosSource(["astronaut", "no_such_photo"])) == 1
