"""The FID InceptionV3 (TF-ported weights of pytorch-fid): pool3 features and 1008-way logits in one pass.

The network is pytorch-fid's: torchvision's InceptionV3 with the blocks that TensorFlow's graph computes
differently patched (pytorch-fid's ``FIDInception*`` classes), inputs resized bilinearly to 299 x 299 and
scaled to [-1, 1]. Weights are read from ``pt_inception-2015-12-05-6726825d.pth`` in a weights directory,
never downloaded here (``rcdm fetch`` does that where there is internet).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid.inception import (
    FID_WEIGHTS_URL,
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionE_1,
    FIDInceptionE_2,
)
from torch import nn

from rcdm.io import safe_torch_load, sha256_file

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = FID_WEIGHTS_URL
POOL_DIM = 2048
NUM_LOGITS = 1008


class InceptionWeightsMissing(FileNotFoundError):
    """The FID Inception weights file is not in the weights directory."""


def build_fid_inception_v3() -> nn.Module:
    """Uninitialised FID InceptionV3 with pytorch-fid's module tree (its state-dict keys are the file's)."""
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=NUM_LOGITS, init_weights=False
    )
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


class FIDInception(nn.Module):
    """Frozen FID InceptionV3 returning ``(pool3 [N, 2048], logits [N, 1008])`` for images in [0, 1].

    ``logits`` are ``pool3 @ fc.weight.T`` without the bias, as the original Inception Score code (and the ADM
    evaluation suite) computes them from the TF graph's ``softmax/logits/MatMul`` input.
    """

    def __init__(self, net: nn.Module, weights_sha256: str | None = None, input_size: int = 299) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.weights_sha256 = weights_sha256
        #: the network's input resolution: 299 for FID; smaller (>= 75) only to keep unit tests fast
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for block in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1):
            x = block(x)
        for block in (
            n.Conv2d_4a_3x3,
            n.maxpool2,
            n.Mixed_5b,
            n.Mixed_5c,
            n.Mixed_5d,
            n.Mixed_6a,
            n.Mixed_6b,
        ):
            x = block(x)
        for block in (n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        logits = pool @ n.fc.weight.T
        return pool, logits

    def embed_uint8(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [N, H, W, 3] (any device) -> float32 ``(pool3, logits)`` on this module's device."""
        device = next(self.parameters()).device
        x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        return self(x)


def inception_weights_path(weights_dir: str | os.PathLike) -> Path:
    """Where the FID Inception weights file is expected inside ``weights_dir``."""
    return Path(weights_dir) / INCEPTION_FILE


def load_inception(weights_dir: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInception:
    """Load the FID InceptionV3 from ``weights_dir/pt_inception-2015-12-05-6726825d.pth``.

    Raises ``InceptionWeightsMissing`` (naming the file and its URL) when absent, ``ValueError`` listing the
    keys when the file is not a pytorch-fid Inception state dict.
    """
    path = inception_weights_path(weights_dir)
    if not path.is_file():
        raise InceptionWeightsMissing(
            f"Inception weights file {INCEPTION_FILE} not found at {path}: download it from {INCEPTION_URL} "
            f"into {Path(weights_dir)} (or run `rcdm fetch` on a machine with internet)"
        )
    state = safe_torch_load(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    net = build_fid_inception_v3()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} is not the pytorch-fid Inception state dict: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, mis-shaped {shapes[:8]} ({len(missing)}/{len(unexpected)}/{len(shapes)} keys)"
        )
    net.load_state_dict(state, strict=True)
    return FIDInception(net, weights_sha256=sha256_file(path)).to(device)
