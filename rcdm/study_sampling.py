"""Sampling for the studies' figures: fixed initial noise shared by every conditioning.

Noise j (and, for stochastic samplers, the per-step noise of sample j) is a function of (seed, j) only, so
the rows of a figure, conditioned on different representations, differ only by their representation.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SamplingSettings:
    """How a study samples: sampler, steps, DDIM eta, x_0 clipping, batch size and the noise seed."""

    sampler: str = "dpm-solver++"
    steps: int | None = 15
    eta: float = 0.0
    clip: bool = True
    batch_size: int = 64
    seed: int = 0
    progress: bool = True


def fixed_noise(seed: int, k: int, image_size: int, channels: int = 3) -> torch.Tensor:
    """``k`` initial noises x_T [k, C, S, S], a function of (seed, index) only: noise j is the same for every
    conditioning, so rows of a figure differ only by their representation."""
    out = torch.empty(k, channels, image_size, image_size)
    for j in range(k):
        g = torch.Generator().manual_seed(seed * 1_000_003 + j)
        out[j] = torch.randn(channels, image_size, image_size, generator=g)
    return out


def sample_images(
    model,
    diffusion,
    feats: torch.Tensor,
    noise_index: Sequence[int] | torch.Tensor,
    noise_bank: torch.Tensor,
    settings: SamplingSettings,
    desc: str = "sampling",
) -> torch.Tensor:
    """Samples [M, 3, S, S] in [-1, 1] (CPU float32) for conditionings ``feats`` [M, D].

    Sample m starts from ``noise_bank[noise_index[m]]``; stochastic samplers also draw their per-step noise
    from a generator seeded by (seed, noise index), so equal indices mean equal randomness across conditions.
    """
    from tqdm import tqdm

    from rcdm.samplers import sample

    device = next(model.parameters()).device
    noise_index = torch.as_tensor(noise_index, dtype=torch.long)
    if len(noise_index) != len(feats):
        raise ValueError(f"{len(feats)} conditionings but {len(noise_index)} noise indices")
    if not torch.isfinite(feats).all():
        raise ValueError("conditioning representations contain NaN or infinite values")
    out = []
    bs = settings.batch_size
    for i in tqdm(range(0, len(feats), bs), desc=desc, disable=not settings.progress, file=sys.stderr):
        fb = feats[i : i + bs].to(device, torch.float32)
        nb = noise_index[i : i + bs]
        x_t = noise_bank[nb].to(device)
        gens = None
        if settings.sampler == "ddpm" or settings.eta > 0:
            gens = [_generator(settings.seed, int(j), device) for j in nb]
        x = sample(
            model,
            diffusion,
            tuple(x_t.shape),
            sampler=settings.sampler,
            steps=settings.steps,
            eta=settings.eta,
            noise=x_t,
            clip_denoised=settings.clip,
            model_kwargs={"feat": fb},
            generators=gens,
            progress=False,
            device=device,
        )
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def _generator(seed: int, j: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + j + 7_919)
