"""Gaussian diffusion maths: schedules, q/p distributions, training losses, DDPM/DDIM loops, respacing.

Numerically equal to the published guided-diffusion / RCDM implementation (same float64 schedules cast to
float32 after the timestep gather, same formula order), so published checkpoints and golden values carry
over. Differences are for speed only: schedule tables are uploaded once per device, sampling loops run under
``torch.inference_mode`` with no host synchronisation, and noise can come from one ``torch.Generator`` per
batch element so that a sample does not depend on the batch it was drawn in.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "betas_for_alpha_bar",
    "create_gaussian_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "infer_device",
    "mean_flat",
    "normal_kl",
    "randn_per_sample",
    "space_timesteps",
]

Model = Callable[..., Tensor]
DenoisedFn = Callable[[Tensor], Tensor] | None


# ----------------------------------------------------------------------------------------------- schedules
def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Float64 betas of a named schedule: "linear" (Ho et al., rescaled to any step count) or "cosine"."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown noise_schedule {schedule_name!r}; choose 'linear' or 'cosine'")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas discretising a continuous alpha_bar(t), t in [0, 1]; each beta capped at ``max_beta``."""
    betas = [
        min(
            1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps),
            max_beta,
        )
        for i in range(num_diffusion_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()
    START_X = enum.auto()
    EPSILON = enum.auto()


class ModelVarType(enum.Enum):
    """Where the reverse-step variance comes from; LEARNED_RANGE interpolates between the fixed ones."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE, plus the (unscaled) vb term when the variance is learned
    RESCALED_MSE = enum.auto()  # MSE, plus the vb term times num_timesteps / 1000
    KL = enum.auto()  # the variational bound term of one timestep
    RESCALED_KL = enum.auto()  # KL times num_timesteps: an estimate of the full bound

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# ------------------------------------------------------------------------------------------ loss helpers
def mean_flat(x: Tensor) -> Tensor:
    """Mean over all dimensions but the batch dimension."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    tensor = next(v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, Tensor))
    logvar1, logvar2 = (
        v if isinstance(v, Tensor) else torch.tensor(v).to(tensor) for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    # The tanh approximation of the published code (not erf), kept for identical likelihoods.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-likelihood (nats) of images in [-1, 1] quantised to 256 bins under a Gaussian."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def randn_per_sample(
    shape: Sequence[int],
    generators: Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of ``shape``; with ``generators``, row i is drawn from ``generators[i]`` only.

    Per-row generators make each sample reproducible independently of batch size and composition.
    """
    if generators is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}: need one per element")
    return torch.stack(
        [torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generators]
    )


# --------------------------------------------------------------------------------------------- respacing
def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Timesteps of the original process to keep.

    ``section_counts`` is "ddimN" (N steps with one integer stride, starting at 0), a comma list such as
    "10,15,20" (the process is cut into equal sections and each gets that many evenly spaced steps), a single
    count "250", or a sequence of ints; "" keeps every step.
    """
    if isinstance(section_counts, str):
        if section_counts == "":
            return set(range(num_timesteps))
        if section_counts.startswith("ddim"):
            count = section_counts[len("ddim") :]
            if not count.isdigit():
                raise ValueError(
                    f"bad timestep_respacing {section_counts!r}: 'ddim' needs a step count, e.g. 'ddim25'"
                )
            desired = int(count)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired} steps from {num_timesteps} with an integer stride"
            )
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError as err:
            raise ValueError(
                f"bad timestep_respacing {section_counts!r}: use '', 'N', 'ddimN' or 'a,b,c'"
            ) from err
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


# ------------------------------------------------------------------------------------------ the diffusion
class _WrappedModel:
    """Calls ``model`` with original timesteps: maps respaced indices, optionally rescales to [0, 1000)."""

    def __init__(self, model: Model, diffusion: GaussianDiffusion):
        self.model = model
        self.diffusion = diffusion

    def __call__(self, x: Tensor, ts: Tensor, **kwargs: Any) -> Tensor:
        d = self.diffusion
        if not d._identity_map:
            ts = d._tables(ts.device)["timestep_map"][ts].to(ts.dtype)
        if d.rescale_timesteps:
            ts = ts.float() * (1000.0 / d.original_num_steps)
        return self.model(x, ts, **kwargs)


class GaussianDiffusion:
    """Training and sampling utilities of a discrete-time Gaussian diffusion (guided-diffusion semantics).

    ``betas`` (float64) define the process; the model is always called through a wrapper that maps this
    process's timestep indices to the original ones (identity here, a subset in :class:`SpacedDiffusion`).
    """

    def __init__(
        self,
        *,
        betas: np.ndarray | Sequence[float],
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                f"betas must be a 1-D array with values in (0, 1], got shape {betas.shape}, range "
                f"[{betas.min():.4g}, {betas.max():.4g}] (the linear schedule needs steps >= 20)"
            )
        if len(betas) < 2:
            raise ValueError(
                f"a diffusion needs at least 2 timesteps, got {len(betas)} (respacing to 1 step leaves no "
                "posterior to sample from; use 2 or more steps, or dpm-solver++ for a single evaluation)"
            )
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        if not hasattr(self, "timestep_map"):  # not already set by SpacedDiffusion
            self.timestep_map = list(range(self.num_timesteps))
            self.original_num_steps = self.num_timesteps
            self.original_betas = betas
        self._identity_map = self.timestep_map == list(range(self.num_timesteps))

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # posterior q(x_{t-1} | x_t, x_0); its variance is 0 at t=0, so the log is clipped to the t=1 value
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}
        self._base: GaussianDiffusion | None = None

    # ---- tables ----------------------------------------------------------------------------------
    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        """Every per-timestep coefficient as float32 on ``device``, uploaded once per device."""
        tables = self._device_tables.get(device)
        if tables is None:
            fixed_large = np.append(self.posterior_variance[1], self.betas[1:])
            arrays = {
                "alphas_cumprod": self.alphas_cumprod,
                "alphas_cumprod_prev": self.alphas_cumprod_prev,
                "alphas_cumprod_next": self.alphas_cumprod_next,
                "one_minus_alphas_cumprod": 1.0 - self.alphas_cumprod,
                "sqrt_alphas_cumprod": self.sqrt_alphas_cumprod,
                "sqrt_one_minus_alphas_cumprod": self.sqrt_one_minus_alphas_cumprod,
                "log_one_minus_alphas_cumprod": self.log_one_minus_alphas_cumprod,
                "sqrt_recip_alphas_cumprod": self.sqrt_recip_alphas_cumprod,
                "sqrt_recipm1_alphas_cumprod": self.sqrt_recipm1_alphas_cumprod,
                "posterior_variance": self.posterior_variance,
                "posterior_log_variance_clipped": self.posterior_log_variance_clipped,
                "posterior_mean_coef1": self.posterior_mean_coef1,
                "posterior_mean_coef2": self.posterior_mean_coef2,
                "recip_posterior_mean_coef1": 1.0 / self.posterior_mean_coef1,
                "posterior_mean_coef2_over_coef1": self.posterior_mean_coef2 / self.posterior_mean_coef1,
                "log_betas": np.log(self.betas),
                "fixed_large_variance": fixed_large,
                "fixed_large_log_variance": np.log(fixed_large),
            }
            with torch.inference_mode(False):  # normal tensors: autograd may use them after a sampling run
                tables = {
                    k: torch.from_numpy(v).to(device=device, dtype=torch.float32) for k, v in arrays.items()
                }
                tables["timestep_map"] = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            self._device_tables[device] = tables
        return tables

    def _extract(self, name: str, t: Tensor, ndim: int) -> Tensor:
        """Coefficient ``name`` at timesteps ``t``, shaped [N, 1, ..., 1] to broadcast over ``ndim`` dims."""
        return self._tables(t.device)[name][t].view(-1, *([1] * (ndim - 1)))

    # ---- forward process -------------------------------------------------------------------------
    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        n = x_start.ndim
        mean = self._extract("sqrt_alphas_cumprod", t, n) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, n).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, n).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) (``noise`` is the standard normal draw, if given)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        n = x_start.ndim
        return (
            self._extract("sqrt_alphas_cumprod", t, n) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, n) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        n = x_t.ndim
        mean = (
            self._extract("posterior_mean_coef1", t, n) * x_start
            + self._extract("posterior_mean_coef2", t, n) * x_t
        )
        variance = self._extract("posterior_variance", t, n).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, n).expand_as(x_t)
        return mean, variance, log_variance

    # ---- model predictions -----------------------------------------------------------------------
    def _wrap_model(self, model: Model) -> Model:
        return model if isinstance(model, _WrappedModel) else _WrappedModel(model, self)

    def _call_model(self, model: Model, x: Tensor, t: Tensor, model_kwargs: dict | None) -> Tensor:
        out = self._wrap_model(model)(x, t, **(model_kwargs or {}))
        return out if out.dtype == x.dtype else out.to(x.dtype)  # autocast may hand back bf16

    def _split_output(self, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean-type output, variance values or None) from a raw model output."""
        b, c = x.shape[:2]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if out.shape != (b, 2 * c, *x.shape[2:]):
                raise ValueError(
                    f"learned-sigma model output must have shape {(b, 2 * c, *x.shape[2:])}, "
                    f"got {tuple(out.shape)}"
                )
            mean_part, var_part = torch.split(out, c, dim=1)
            return mean_part, var_part
        if out.shape != x.shape:
            raise ValueError(
                f"model output shape {tuple(out.shape)} != input shape {tuple(x.shape)} "
                "(a 6-channel output needs learn_sigma=True)"
            )
        return out, None

    def _pred_xstart(
        self, x: Tensor, t: Tensor, mean_part: Tensor, clip_denoised: bool, denoised_fn: DenoisedFn
    ) -> Tensor:
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred = self._predict_xstart_from_xprev(x, t, mean_part)
        elif self.model_mean_type == ModelMeanType.START_X:
            pred = mean_part
        else:
            pred = self._predict_xstart_from_eps(x, t, mean_part)
        if denoised_fn is not None:
            pred = denoised_fn(pred)
        return pred.clamp(-1, 1) if clip_denoised else pred

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        n = x_t.ndim
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, n) * eps
        )

    def _predict_xstart_from_xprev(self, x_t: Tensor, t: Tensor, xprev: Tensor) -> Tensor:
        n = x_t.ndim
        return (
            self._extract("recip_posterior_mean_coef1", t, n) * xprev
            - self._extract("posterior_mean_coef2_over_coef1", t, n) * x_t
        )

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        n = x_t.ndim
        return (self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, n
        )

    def predict_xstart(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: dict | None = None,
    ) -> Tensor:
        """The model's x_0 prediction at x_t (variance channels of a learned-sigma output ignored)."""
        mean_part, _ = self._split_output(self._call_model(model, x, t, model_kwargs), x)
        return self._pred_xstart(x, t, mean_part, clip_denoised, denoised_fn)

    def p_mean_variance(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from the model: dict of "mean", "variance", "log_variance", "pred_xstart"."""
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        n = x.ndim
        mean_part, var_part = self._split_output(self._call_model(model, x, t, model_kwargs), x)
        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = var_part
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = self._extract("posterior_log_variance_clipped", t, n)
            max_log = self._extract("log_betas", t, n)
            frac = (var_part + 1) / 2  # model value in [-1, 1] spans [posterior variance, beta]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            name = "fixed_large" if self.model_var_type == ModelVarType.FIXED_LARGE else "posterior"
            log_name = (
                "fixed_large_log_variance" if name == "fixed_large" else "posterior_log_variance_clipped"
            )
            variance = self._extract(f"{name}_variance", t, n).expand_as(x)
            log_variance = self._extract(log_name, t, n).expand_as(x)

        pred_xstart = self._pred_xstart(x, t, mean_part, clip_denoised, denoised_fn)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            mean = mean_part
        else:
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # ---- single reverse steps --------------------------------------------------------------------
    def p_sample(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: None = None,
        model_kwargs: dict | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> dict[str, Tensor]:
        """One ancestral (DDPM) step x_t -> x_{t-1}: dict of "sample" and "pred_xstart"."""
        _refuse_cond_fn(cond_fn)
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = randn_per_sample(x.shape, generators, x.device, x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # no noise at the last step
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        generators: Sequence[torch.Generator] | None = None,
    ) -> dict[str, Tensor]:
        """One DDIM step (Song et al. eq. 12) x_t -> x_{t-1}; ``eta`` = 0 is deterministic."""
        _refuse_cond_fn(cond_fn)
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        n = x.ndim
        alpha_bar = self._extract("alphas_cumprod", t, n)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, n)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        if eta == 0.0:  # sigma is exactly 0: the noise term would add nothing
            return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}
        noise = randn_per_sample(x.shape, generators, x.device, x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (n - 1)))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
    ) -> dict[str, Tensor]:
        """One deterministic DDIM inversion step x_t -> x_{t+1}."""
        if eta != 0.0:
            raise ValueError("the reverse DDIM ODE is deterministic: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.ndim)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ---- sampling loops --------------------------------------------------------------------------
    def _loop(
        self,
        step: Callable[..., dict[str, Tensor]],
        model: Model,
        shape: Sequence[int],
        noise: Tensor | None,
        device: torch.device | str | None,
        progress: bool,
        generators: Sequence[torch.Generator] | None,
        desc: str,
        **step_kwargs: Any,
    ) -> Iterator[dict[str, Tensor]]:
        shape = tuple(shape)
        device = torch.device(device) if device is not None else infer_device(model, noise)
        if generators is not None and len(generators) != shape[0]:
            raise ValueError(
                f"got {len(generators)} generators for a batch of {shape[0]}: need one per element"
            )
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {shape}")
            img = noise.to(device)
        else:
            with torch.inference_mode():
                img = randn_per_sample(shape, generators, device)
        wrapped = self._wrap_model(model)
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=desc, leave=False)
        for i in indices:
            # inference_mode is entered per step so it is not left active while the caller holds the generator
            with torch.inference_mode():
                t = torch.full((shape[0],), i, device=device, dtype=torch.long)
                out = step(wrapped, img, t, generators=generators, **step_kwargs)
            yield out
            img = out["sample"]

    @staticmethod
    def _last(outputs: Iterator[dict[str, Tensor]]) -> Tensor:
        final = None
        for final in outputs:  # noqa: B007
            pass
        if final is None:
            raise ValueError("the diffusion has no timesteps")
        return final["sample"].clone()  # a normal tensor, usable outside inference mode

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield p_sample's output at every timestep of ancestral sampling from x_T (``noise``) to x_0."""
        _refuse_cond_fn(cond_fn)
        return self._loop(
            self.p_sample, model, shape, noise, device, progress, generators, "ddpm",
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        )  # fmt: skip

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Ancestral (DDPM) samples of ``shape``; ``generators`` gives per-element reproducible noise."""
        return self._last(
            self.p_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
                generators=generators,
            )
        )  # fmt: skip

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield ddim_sample's output at every timestep of DDIM sampling."""
        _refuse_cond_fn(cond_fn)
        return self._loop(
            self.ddim_sample, model, shape, noise, device, progress, generators, "ddim",
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta,
        )  # fmt: skip

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """DDIM samples of ``shape`` over this diffusion's timesteps (respace with "ddimN" for few steps)."""
        return self._last(
            self.ddim_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
                generators=generators,
            )
        )  # fmt: skip

    # ---- losses ----------------------------------------------------------------------------------
    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """One term of the variational bound in bits/dim: decoder NLL at t=0, else KL(q || p)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(
            2.0
        )
        nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-example losses at timesteps ``t``: "loss", and "mse" / "vb" depending on the loss type.

        With a learned variance and an MSE loss this is the hybrid loss: MSE on the mean output plus the
        variational bound computed with the mean output detached, so the bound trains only the variance.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, Tensor] = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, False, model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        raw = self._call_model(model, x_t, t, model_kwargs)
        mean_part, var_part = self._split_output(raw, x_t)
        if var_part is not None:
            frozen = torch.cat([mean_part.detach(), var_part], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *_, r=frozen: r, x_start, x_t, t, False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - mean_part) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def base_diffusion(self) -> GaussianDiffusion:
        """The unspaced process over all original timesteps (same types and rescaling); itself if unspaced."""
        if self._identity_map and self.num_timesteps == self.original_num_steps:
            return self
        if self._base is None:
            self._base = GaussianDiffusion(
                betas=self.original_betas,
                model_mean_type=self.model_mean_type,
                model_var_type=self.model_var_type,
                loss_type=self.loss_type,
                rescale_timesteps=self.rescale_timesteps,
            )
        return self._base

    # ---- respacing -------------------------------------------------------------------------------
    def respaced(self, section_counts: str | Sequence[int]) -> SpacedDiffusion:
        """This process (same types and rescaling) on ``space_timesteps(original steps, section_counts)``."""
        return SpacedDiffusion(
            use_timesteps=space_timesteps(self.original_num_steps, section_counts),
            betas=self.original_betas,
            model_mean_type=self.model_mean_type,
            model_var_type=self.model_var_type,
            loss_type=self.loss_type,
            rescale_timesteps=self.rescale_timesteps,
        )


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of the timesteps of a base process (same alpha_bar at the kept steps).

    Its timestep i stands for original timestep ``timestep_map[i]``; models are called with the original one.
    """

    def __init__(
        self, use_timesteps: Sequence[int] | set[int], *, betas: np.ndarray | Sequence[float], **kwargs: Any
    ):
        base_betas = np.array(betas, dtype=np.float64)
        use = set(int(i) for i in use_timesteps)
        if not use or min(use) < 0 or max(use) >= len(base_betas):
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{len(base_betas) - 1}")
        alphas_cumprod = np.cumprod(1.0 - base_betas)
        last, new_betas, timestep_map = 1.0, [], []
        for i, alpha_cumprod in enumerate(alphas_cumprod):
            if i in use:
                new_betas.append(1 - alpha_cumprod / last)
                last = alpha_cumprod
                timestep_map.append(i)
        self.use_timesteps = use
        self.timestep_map = timestep_map
        self.original_num_steps = len(base_betas)
        self.original_betas = base_betas
        super().__init__(betas=np.array(new_betas), **kwargs)


def _refuse_cond_fn(cond_fn: object) -> None:
    # Kept in the signatures so positional calls written for guided-diffusion still line up.
    if cond_fn is not None:
        raise NotImplementedError(
            "cond_fn (classifier guidance) is not supported: RCDM conditions on the representation through "
            "model_kwargs={'feat': ...}, and sampling runs under torch.inference_mode (no gradients)"
        )


def infer_device(model: Model, noise: Tensor | None = None) -> torch.device:
    """Device to sample on: that of ``noise``, else of the model's first parameter, else the CPU."""
    if noise is not None:
        return noise.device
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str | Sequence[int] = "",
) -> SpacedDiffusion:
    """The diffusion for guided-diffusion's flags (same names, same meaning)."""
    betas = get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or ""),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )
