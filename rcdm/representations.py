"""Representations in the studies: scale-free distances and spreads, and the two ways an image reaches the
encoder.

- :func:`encode_images`: generated samples and stored images, through :func:`rcdm.preprocess.encoder_view`
  (the one sample-to-encoder-input function: what extraction feeds the encoder for an image file).
- :func:`encoder_forward` / :func:`encode_inputs`: images already AT the encoder's input resolution, in
  [0, 1] (an original's encoder-size crop, its augmentations, an adversarial perturbation of it), passed
  as they are: differentiable, with no resize in the gradient path. Another size is an error, never resized.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rcdm.preprocess import apply_input_norm, encoder_view


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``1 - cos(a_i, b_i)`` (broadcasting)."""
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).clamp_min(0.0)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``|a_i - b_i| / |b_i|``: a scale-free distance to the reference ``b``."""
    return (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1).clamp_min(1e-12)


def spread(x: torch.Tensor) -> float:
    """Mean per-coordinate variance across the rows of ``x`` [k, ...] (population variance)."""
    return float(x.float().flatten(1).var(dim=0, unbiased=False).mean()) if len(x) > 1 else 0.0


def direction_spread(emb: torch.Tensor) -> float:
    """Total variance of the L2-normalised rows, ``1 - |mean of unit vectors|^2`` in [0, 1].

    Scale free, so trunk (2048-d) and head (128..8192-d) spaces are comparable.
    """
    if len(emb) < 2:
        return 0.0
    u = F.normalize(emb.float(), dim=-1)
    return float(1.0 - u.mean(0).pow(2).sum())


def _device(encoder: torch.nn.Module) -> torch.device:
    return next(encoder.parameters()).device


def encoder_forward(encoder, x_unit: torch.Tensor) -> torch.Tensor:
    """Differentiable encoder pass on images [N, 3, R, R] in [0, 1] at the encoder's input size R.

    The input is mapped to [-1, 1] and the encoder's input normalisation, nothing else: perturb or augment
    the image at the encoder's resolution (its original's crop), so no resize sits between them.
    """
    size = int(encoder.input_size)
    if x_unit.ndim != 4 or x_unit.shape[1] != 3 or tuple(x_unit.shape[-2:]) != (size, size):
        raise ValueError(
            f"the encoder takes [N, 3, {size}, {size}] inputs, got {tuple(x_unit.shape)}: crop the original "
            f"at {size} px instead of resizing (rcdm.preprocess.encoder_view for samples)"
        )
    return encoder(apply_input_norm(x_unit * 2.0 - 1.0, getattr(encoder, "input_norm", "none")))


def encode_inputs(encoder, x_unit: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Representations (CPU float32 [N, D]) of encoder-size images in [0, 1] (:func:`encoder_forward`)."""
    device = _device(encoder)
    out = []
    with torch.inference_mode():
        for i in range(0, len(x_unit), batch_size):
            out.append(encoder_forward(encoder, x_unit[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def encode_images(encoder, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Representations (CPU float32 [N, D]) of samples (float [N, 3, S, S] in [-1, 1]) or uint8 images
    [N, H, W, 3], each brought to the encoder by :func:`rcdm.preprocess.encoder_view`."""
    device = _device(encoder)
    size, norm = int(encoder.input_size), getattr(encoder, "input_norm", "none")
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = encoder_view(images[i : i + batch_size], size, norm, device=device)
            out.append(encoder(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def typical_distance(feats: torch.Tensor) -> float:
    """Median Euclidean distance between the representations [N, D] of different images (N >= 2)."""
    if len(feats) < 2:
        raise ValueError(f"a typical distance needs at least two images, got {len(feats)}")
    d = torch.cdist(feats.double(), feats.double())
    return float(d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)].median())


def normalised_distance(a: torch.Tensor, b: torch.Tensor, typical: float) -> torch.Tensor:
    """Row-wise ``|a_i - b_i| / typical`` (float32): a distance in units of the typical distance between
    different images of the same space (:func:`typical_distance`), so spaces of any dimension, scale or
    sparsity read the same way: 0 = the same representation, 1 = as far apart as two different images."""
    if not typical > 0:
        raise ValueError(f"the typical distance must be positive, got {typical}")
    return ((a.double() - b.double()).norm(dim=-1) / typical).float()
