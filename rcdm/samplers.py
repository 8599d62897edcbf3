"""Samplers selected by name: DDPM (ancestral), DDIM and DPM-Solver++(2M), one short function each.

:func:`sample` is the entry point used by the sampling stage. All samplers call the model with the original
integer timesteps of the trained process (rescaled to [0, 1000) when ``rescale_timesteps``), so one trained
model serves every sampler and step count. With ``generators`` (one ``torch.Generator`` per batch element),
the initial noise and every per-step noise of element i come from ``generators[i]`` only: a sample is then
reproducible and independent of the batch it is drawn in, which sharded sampling relies on.

``cuda_graph=True`` runs the model through :class:`CudaGraphModel`: one UNet evaluation is captured as a CUDA
graph with static input/output buffers and replayed at every step (no per-kernel launch overhead; the small
sampler arithmetic between evaluations stays eager). Off CUDA it warns and runs eagerly.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rcdm.diffusion import GaussianDiffusion, infer_device, randn_per_sample

__all__ = [
    "CudaGraphModel",
    "SAMPLERS",
    "SPACINGS",
    "dpm_solver_timesteps",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
]

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
SPACINGS = ("logsnr", "time")

Model = Callable[..., Tensor]
DenoisedFn = Callable[[Tensor], Tensor] | None


class CudaGraphModel:
    """Replays a captured CUDA graph of ``model(x, t, **kwargs)``; one graph per input signature.

    The first call with a given signature (shapes, dtypes, strides of the tensor inputs, values of the other
    keyword arguments) warms the model up on a side stream and captures one forward into static buffers;
    later calls copy their inputs into those buffers and replay. The output is returned as a copy, since
    the static output is overwritten by the next replay. Autocast, if active, is captured with its cast
    cache disabled (a requirement of graph capture).
    """

    def __init__(self, model: Model, warmup: int = 2) -> None:
        self.model = model
        self.warmup = warmup
        self.graphs: dict[tuple, tuple[dict[str, Tensor], Tensor, Any]] = {}

    @staticmethod
    def _signature(inputs: dict[str, Tensor], constants: dict[str, Any]) -> tuple:
        tensors = tuple((k, tuple(v.shape), v.dtype, v.stride(), v.device) for k, v in sorted(inputs.items()))
        return tensors, tuple(sorted((k, repr(v)) for k, v in constants.items()))

    def _capture(self, inputs: dict[str, Tensor], constants: dict[str, Any]):
        device = inputs["x"].device
        static = {k: v.clone() for k, v in inputs.items()}
        autocast = contextlib.nullcontext()
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
            autocast = torch.autocast(device.type, dtype=dtype, cache_enabled=False)

        def forward() -> Tensor:
            args = {k: v for k, v in static.items() if k not in ("x", "t")}
            return self.model(static["x"], static["t"], **args, **constants)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), autocast:
            for _ in range(self.warmup):
                forward()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast:
            out = forward()
        return static, out, graph

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        inputs = {"x": x, "t": t} | {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
        constants = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)}
        key = self._signature(inputs, constants)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs, constants)
        static, out, graph = entry
        for name, value in inputs.items():
            static[name].copy_(value)
        graph.replay()
        return out.clone()


def _maybe_graphed(model: Model, device: torch.device, cuda_graph: bool) -> Model:
    if not cuda_graph or isinstance(model, CudaGraphModel):  # a caller-held wrapper keeps its graphs
        return model
    if device.type != "cuda":
        warnings.warn(
            f"cuda_graph=True needs a CUDA device; sampling on {device} runs eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        return model
    return CudaGraphModel(model)


def sample_ddpm(
    model: Model,
    diffusion: GaussianDiffusion,
    x: Tensor,
    *,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn = None,
    model_kwargs: dict | None = None,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling from x_T = ``x`` over every timestep of ``diffusion`` (respace it for fewer)."""
    return diffusion.p_sample_loop(
        model, x.shape, noise=x, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
        model_kwargs=model_kwargs, device=x.device, progress=progress, generators=generators,
    )  # fmt: skip


def sample_ddim(
    model: Model,
    diffusion: GaussianDiffusion,
    x: Tensor,
    *,
    eta: float = 0.0,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn = None,
    model_kwargs: dict | None = None,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM from x_T = ``x`` over every timestep of ``diffusion``; ``eta`` > 0 adds DDPM-like noise."""
    return diffusion.ddim_sample_loop(
        model, x.shape, noise=x, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
        model_kwargs=model_kwargs, device=x.device, progress=progress, eta=eta, generators=generators,
    )  # fmt: skip


def dpm_solver_timesteps(alphas_cumprod: np.ndarray, steps: int, spacing: str = "logsnr") -> list[int]:
    """``steps`` distinct integer timesteps, decreasing from T-1 to 0, for DPM-Solver++.

    "logsnr" spaces them uniformly in lambda = log(alpha / sigma) (the step size h of the exponential
    integrator, so every step carries the same local error weight; the DPM-Solver authors' choice for
    low/medium resolution pixel-space models); "time" spaces them uniformly in t (their choice at >= 256 px).
    Each continuous target is rounded to the nearest trained timestep; collisions are pushed apart.
    """
    num = len(alphas_cumprod)
    if not 1 <= steps <= num:
        raise ValueError(f"steps must be in 1..{num}, got {steps}")
    if spacing == "time":
        ts = np.round(np.linspace(num - 1, 0, steps)).astype(int)
    elif spacing == "logsnr":
        lam = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # decreasing in t
        targets = np.linspace(lam[-1], lam[0], steps)
        ts = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    ts = [int(t) for t in ts]
    ts[0], ts[-1] = num - 1, 0
    for k in range(len(ts) - 2, -1, -1):  # strictly decreasing, from the low-noise end...
        ts[k] = max(ts[k], ts[k + 1] + 1)
    ts[0] = min(ts[0], num - 1)
    for k in range(1, len(ts)):  # ...then back within [0, T-1]
        ts[k] = min(ts[k], ts[k - 1] - 1)
    return ts if steps > 1 else [num - 1]


def sample_dpmpp_2m(
    model: Model,
    diffusion: GaussianDiffusion,
    x: Tensor,
    timesteps: Sequence[int],
    *,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
    order: int = 2,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction) from x_T = ``x``.

    ``timesteps`` are original-process timesteps, decreasing; one model evaluation each. Between them the
    second-order multistep update runs in lambda = log(alpha/sigma); the last evaluation's x_0 prediction is
    returned (a step to sigma = 0, where the update is exactly first order). Only the mean half of a
    learned-sigma output is used. ``order=1`` gives DDIM (eta 0) on the same timesteps.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    base = diffusion.base_diffusion()
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])) or not 0 <= ts[-1] <= ts[0] < base.num_timesteps:
        raise ValueError(f"timesteps must be strictly decreasing within 0..{base.num_timesteps - 1}: {ts}")
    abar = base.alphas_cumprod[ts]
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha) - np.log(sigma)
    # float64 step coefficients on the host: the loop only multiplies tensors by Python floats (no syncs)
    ratio = sigma[1:] / sigma[:-1]
    h = lam[1:] - lam[:-1]
    gain = -alpha[1:] * np.expm1(-h)

    steps = range(len(ts))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="dpm-solver++", leave=False)
    x0_prev = None
    for k in steps:
        with torch.inference_mode():
            t = torch.full((x.shape[0],), ts[k], device=x.device, dtype=torch.long)
            x0 = base.predict_xstart(model, x, t, clip_denoised, denoised_fn, model_kwargs)
            if k == len(ts) - 1:
                x = x0
                break
            if x0_prev is None or order == 1:
                d = x0
            else:
                r = float(h[k - 1] / h[k])
                d = x0 + (x0 - x0_prev) * (1.0 / (2.0 * r))
            x = float(ratio[k]) * x + float(gain[k]) * d
            x0_prev = x0
    return x.clone()


def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    noise: Tensor | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    denoised_fn: DenoisedFn = None,
    spacing: str = "logsnr",
    cuda_graph: bool = False,
) -> Tensor:
    """Samples of ``shape`` with the named sampler ("ddpm", "ddim" or "dpm-solver++").

    ``steps`` respaces the diffusion (ddpm: "N" evenly spaced steps, ddim: "ddimN") or, for dpm-solver++,
    picks N timesteps (``spacing`` "logsnr" or "time", see :func:`dpm_solver_timesteps`); None uses the
    diffusion's own timesteps. ``noise`` is x_T; otherwise it is drawn (per element from ``generators``).
    ``eta`` applies to ddim only. The model is always called with the original integer timesteps.
    ``cuda_graph`` replays a captured CUDA graph of the model (see :class:`CudaGraphModel`; CUDA only).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if steps is not None and (not isinstance(steps, int | np.integer) or steps < 1):
        raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} only applies to the ddim sampler, not {sampler!r}")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite non-negative number, got {eta}")
    shape = tuple(shape)
    device = torch.device(device) if device is not None else infer_device(model, noise)
    if noise is None:
        with torch.inference_mode():
            noise = randn_per_sample(shape, generators, device)
        noise = noise.clone()
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {shape}")
    x = noise.to(device)
    model = _maybe_graphed(model, device, cuda_graph)
    common = {"clip_denoised": clip_denoised, "denoised_fn": denoised_fn, "model_kwargs": model_kwargs}

    if sampler == "ddpm":
        spaced = diffusion if steps is None else diffusion.respaced(str(steps))
        return sample_ddpm(model, spaced, x, generators=generators, progress=progress, **common)
    if sampler == "ddim":
        spaced = diffusion if steps is None else diffusion.respaced(f"ddim{steps}")
        return sample_ddim(model, spaced, x, eta=eta, generators=generators, progress=progress, **common)
    if steps is None:
        timesteps = list(reversed(diffusion.timestep_map))
    else:
        timesteps = dpm_solver_timesteps(diffusion.base_diffusion().alphas_cumprod, steps, spacing)
    return sample_dpmpp_2m(model, diffusion, x, timesteps, progress=progress, **common)
