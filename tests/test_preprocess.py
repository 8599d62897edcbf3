"""center_crop_arr follows guided-diffusion step by step; value ranges and input normalisation are exact."""

import numpy as np
import pytest
import torch
from PIL import Image

from rcdm.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_input_norm,
    center_crop_arr,
    encoder_input,
    to_model_range,
)


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_box_halving_then_bicubic_then_centre_crop():
    image = _random_image(300, 200)
    # shorter side 200 >= 2*64: one BOX halving to 150x100; 100 < 128 stops; BICUBIC to 96x64; crop x 16..80
    expected = np.asarray(
        image.resize((150, 100), resample=Image.BOX).resize((96, 64), resample=Image.BICUBIC)
    )[0:64, 16:80]
    out = center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_repeated_halving_uses_floor_and_stops_below_twice_the_size():
    image = _random_image(1001, 513, seed=1)
    # 513 >= 256 -> 500x256 (floors); 256 >= 256 -> 250x128; 128 < 256 stops; scale 1.0; crop x (250-128)//2
    halved = image.resize((500, 256), resample=Image.BOX).resize((250, 128), resample=Image.BOX)
    expected = np.asarray(halved.resize((250, 128), resample=Image.BICUBIC))[:, 61 : 61 + 128]
    np.testing.assert_array_equal(center_crop_arr(image, 128), expected)


def test_resize_rounds_half_to_even_like_python_round():
    # 6x4 to size 3: scale 0.75 -> width round(4.5) = 4 (half-up would give 5 and shift the crop by one)
    image = _random_image(6, 4, seed=2)
    expected = np.asarray(image.resize((4, 3), resample=Image.BICUBIC))[:, 0:3]
    np.testing.assert_array_equal(center_crop_arr(image, 3), expected)


def test_small_images_are_upsampled_and_cropped():
    image = _random_image(10, 7, seed=3)
    # scale 16/7: 10 -> round(22.857) = 23, 7 -> 16; crop x (23-16)//2 = 3
    expected = np.asarray(image.resize((23, 16), resample=Image.BICUBIC))[:, 3:19]
    np.testing.assert_array_equal(center_crop_arr(image, 16), expected)


@pytest.mark.parametrize("size", [(5, 300), (300, 5), (224, 224), (37, 91)])
def test_output_is_always_square(size):
    assert center_crop_arr(_random_image(*size), 24).shape == (24, 24, 3)


def test_constant_image_stays_constant():
    image = Image.new("RGB", (123, 77), (10, 200, 30))
    out = center_crop_arr(image, 32)
    assert (out == np.array([10, 200, 30], dtype=np.uint8)).all()


def test_to_model_range_endpoints_and_layout():
    arr = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    arr[0, 1, 2] = (0, 255, 51)
    x = to_model_range(arr)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert x[0, :, 1, 2].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    assert to_model_range(arr[0]).shape == (3, 4, 5)
    with pytest.raises(TypeError):
        to_model_range(arr.astype(np.float32))


def test_imagenet_norm_applied_on_top_of_minus_one_one():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 3, 1, 1)
    out = apply_input_norm(x, "imagenet")
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 0, 0], (0 - mean) / std)
    torch.testing.assert_close(out[1, :, 0, 0], (0.5 - mean) / std)
    torch.testing.assert_close(out[2, :, 0, 0], (1 - mean) / std)
    assert apply_input_norm(x, "none") is x
    with pytest.raises(ValueError, match="input_norm"):
        apply_input_norm(x, "bogus")


def test_encoder_input_combines_both():
    arr = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    torch.testing.assert_close(
        encoder_input(torch.from_numpy(arr), "imagenet"), apply_input_norm(to_model_range(arr), "imagenet")
    )
