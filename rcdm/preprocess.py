"""Image preprocessing with the published semantics: guided-diffusion's centre crop and the [-1, 1] range.

The generation target is ``center_crop_arr(image, image_size)`` and the encoder input is
``center_crop_arr(image, encoder.input_size)`` of the same ORIGINAL image, both scaled to [-1, 1]. Encoders
trained on mean/std-normalised inputs additionally get ``input_norm="imagenet"`` applied on top.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np
import torch
from PIL import Image

CROP_METHOD = "center_crop_arr: BOX halving while shorter side >= 2*size, BICUBIC to size, centre crop"
INPUT_NORMS = ("none", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def center_crop_arr(pil_image: Image.Image, size: int) -> np.ndarray:
    """Square centre crop of side ``size`` as uint8 [size, size, C], exactly as guided-diffusion computes it.

    While the shorter side is at least ``2 * size`` the image is halved with BOX filtering (floor of each
    side); then one BICUBIC resize brings the shorter side to ``size`` (each side scaled and rounded with
    Python's ``round``, i.e. half to even); finally the centre is cropped with floor offsets.
    """
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    image = pil_image
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.array(arr[top : top + size, left : left + size])  # own, writable, contiguous copy


def to_model_range(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 images [N, H, W, 3] (or one [H, W, 3]) -> float32 [N, 3, H, W] (or [3, H, W]) in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"expected images shaped [N, H, W, 3] or [H, W, 3], got {tuple(x.shape)}")
    return x.movedim(-1, -3).float().div_(127.5).sub_(1.0)


def apply_input_norm(x: torch.Tensor, input_norm: str) -> torch.Tensor:
    """Apply an encoder's input normalisation to [-1, 1] images [N, 3, H, W].

    ``"none"`` (the published RCDM encoders) returns ``x`` unchanged; ``"imagenet"`` maps back to [0, 1] and
    standardises with the ImageNet channel mean/std.
    """
    if input_norm == "none":
        return x
    if input_norm == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * 0.5 + 0.5 - mean) / std
    raise ValueError(f"unknown input_norm {input_norm!r}; choose from {', '.join(INPUT_NORMS)}")


def encoder_input(images: torch.Tensor, input_norm: str) -> torch.Tensor:
    """uint8 crops [N, R, R, 3] (any device) -> the encoder's float32 input [N, 3, R, R]."""
    return apply_input_norm(to_model_range(images), input_norm)


def to_uint8(x: torch.Tensor, low: float = -1.0) -> torch.Tensor:
    """float [N, 3, H, W] in [low, 1] (-1: model range, 0: unit range) -> uint8 [N, H, W, 3] on x's device.

    Truncates after clamping, as guided-diffusion's sample script converts samples: the one conversion used
    for stored samples, figures and re-encoded samples alike.
    """
    scale = 255.0 / (1.0 - low)
    y = ((x.detach().float() - low) * scale).clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous()


def encoder_view(
    images: np.ndarray | torch.Tensor,
    size: int,
    input_norm: str,
    device: torch.device | str | None = None,
    pool: Executor | None = None,
) -> torch.Tensor:
    """The encoder's input for generated or stored images: what extraction feeds it for an image file.

    ``images``: uint8 [N, H, W, 3] (stored samples, crops), or float [N, 3, H, W] in [-1, 1] (samples in
    memory, converted first with :func:`to_uint8`, so a sample is encoded identically before and after it
    is stored). Each image goes through :func:`center_crop_arr` at the encoder's input ``size`` (BOX halving,
    PIL bicubic; on a square sample a pure resize), then to [-1, 1] and the encoder's ``input_norm``. Rank,
    MRR and FD_rep of samples (``rcdm evaluate``), the tradeoff and every study use this one function, so
    a sample and its conditioning image reach the encoder by the same path. ``pool`` parallelises the crops
    (PIL releases the GIL).
    """
    if isinstance(images, torch.Tensor) and images.dtype != torch.uint8:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected float images [N, 3, H, W], got {tuple(images.shape)}")
        images = to_uint8(images)
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {arr.dtype} {arr.shape}")
    if arr.shape[1] == size and arr.shape[2] == size:
        crops = arr
    else:

        def crop(a: np.ndarray) -> np.ndarray:
            return center_crop_arr(Image.fromarray(a), size)

        crops = np.stack(list(pool.map(crop, arr) if pool is not None else map(crop, arr)))
    x = torch.from_numpy(np.ascontiguousarray(crops))
    if device is not None:
        x = x.to(device)
    return encoder_input(x, input_norm)
