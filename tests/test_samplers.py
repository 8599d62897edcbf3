"""Samplers against mathematics: Gaussian data with its exact epsilon predictor, per-element generators.

For data x_0 ~ N(mu, s^2) (independent pixels) the exact noise predictor is
    eps*(x_t, t) = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t),
so a correct sampler driven by it must return samples with mean mu and standard deviation s, up to its
discretisation error. 16 x 1024 pixels per channel give a standard error of s/128 on the mean and about
0.6 % on the standard deviation.
"""

import numpy as np
import pytest
import torch

from rcdm.diffusion import create_gaussian_diffusion
from rcdm.samplers import SAMPLERS, dpm_solver_timesteps, sample, sample_ddim, sample_dpmpp_2m

MU = torch.tensor([-0.3, 0.1, 0.5]).view(1, 3, 1, 1)
S = torch.tensor([0.2, 0.5, 0.1]).view(1, 3, 1, 1)
SHAPE = (16, 3, 32, 32)


def gaussian_eps_model(diffusion, learn_sigma=False, steps_scale=1.0):
    """Exact epsilon predictor for N(MU, S^2) data; called with original (possibly rescaled) timesteps."""
    abar = torch.tensor(diffusion.base_diffusion().alphas_cumprod)

    def model(x, t, **kwargs):
        ab = abar[(t.double() * steps_scale).round().long()].view(-1, 1, 1, 1)
        eps = ((1 - ab).sqrt() * (x.double() - ab.sqrt() * MU) / (ab * S**2 + 1 - ab)).float()
        if learn_sigma:  # variance channels that would wreck any sampler that used them as epsilon
            return torch.cat([eps, torch.full_like(eps, 1e4)], dim=1)
        return eps

    return model


def channel_stats(x):
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))


def assert_gaussian(x, mean_tol, std_rel_tol):
    mean, std = channel_stats(x)
    assert (mean - MU.flatten()).abs().max().item() < mean_tol, mean
    assert ((std - S.flatten()) / S.flatten()).abs().max().item() < std_rel_tol, std


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_full_steps_samples_the_data_distribution(schedule):
    torch.manual_seed(0)
    d = create_gaussian_diffusion(steps=1000, noise_schedule=schedule)
    x = sample(gaussian_eps_model(d), d, SHAPE, sampler="ddpm", clip_denoised=False)
    assert_gaussian(x, mean_tol=0.012, std_rel_tol=0.03)  # measured: <= 0.009, <= 1.3 %


@pytest.mark.parametrize("steps", [15, 25])
def test_dpm_solver_pp_few_steps_samples_the_data_distribution(steps):
    torch.manual_seed(1)
    d = create_gaussian_diffusion(steps=1000)
    x = sample(gaussian_eps_model(d), d, SHAPE, sampler="dpm-solver++", steps=steps, clip_denoised=False)
    assert_gaussian(x, mean_tol=0.012, std_rel_tol=0.03)  # measured: <= 0.003, <= 1.9 %


def test_dpm_solver_pp_uses_only_the_epsilon_half_of_learned_sigma_output():
    d = create_gaussian_diffusion(steps=1000, learn_sigma=True, rescale_timesteps=True)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    plain_d = create_gaussian_diffusion(steps=1000, rescale_timesteps=True)
    learned, plain = gaussian_eps_model(d, learn_sigma=True), gaussian_eps_model(plain_d)
    x = sample(learned, d, SHAPE, sampler="dpm-solver++", steps=20, noise=noise, clip_denoised=False)
    y = sample(plain, plain_d, SHAPE, sampler="dpm-solver++", steps=20, noise=noise, clip_denoised=False)
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert_gaussian(x, mean_tol=0.012, std_rel_tol=0.03)


def ddim_std_recursion(abar_path, s):
    """Output std of deterministic DDIM on N(mu, s^2) data from x_T ~ N(0, 1), by the scalar affine map.

    Independent of the sampler code: x = m + c z; the exact posterior mean E[x_0|x_t] has slope
    sqrt(ab) s^2 / v and eps* slope sqrt(1-ab) / v (v = ab s^2 + 1 - ab); DDIM sets
    x_prev = sqrt(ab_prev) E[x_0|x_t] + sqrt(1 - ab_prev) eps*.
    """
    c = 1.0
    for ab, ab_prev in zip(abar_path, list(abar_path[1:]) + [1.0]):
        v = ab * s**2 + 1 - ab
        c = c * (np.sqrt(ab_prev) * np.sqrt(ab) * s**2 + np.sqrt(1 - ab_prev) * np.sqrt(1 - ab)) / v
    return c


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_few_steps_matches_its_exact_discrete_map(steps):
    """DDIM's mean is exact; its std shrinks by a known factor (Euler-like final x_0 step): check it."""
    torch.manual_seed(3)
    d = create_gaussian_diffusion(steps=1000)
    x = sample(gaussian_eps_model(d), d, SHAPE, sampler="ddim", steps=steps, clip_denoised=False)
    mean, std = channel_stats(x)
    assert (mean - MU.flatten()).abs().max().item() < 0.012
    path = d.alphas_cumprod[sorted(d.respaced(f"ddim{steps}").timestep_map, reverse=True)]
    expected = torch.tensor([ddim_std_recursion(path, s) for s in S.flatten().tolist()], dtype=torch.float32)
    torch.testing.assert_close(std, expected, rtol=0.02, atol=0)
    # ...and the discrete map converges to the data std at first order (error halves when steps double)
    errors = [abs(ddim_std_recursion(d.alphas_cumprod[::-k], 0.2) / 0.2 - 1) for k in (100, 10, 2, 1)]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 0.01
    assert 1.8 < errors[2] / errors[3] < 2.2


def test_ddim_many_steps_samples_the_data_distribution():
    torch.manual_seed(4)
    d = create_gaussian_diffusion(steps=1000)
    x = sample(gaussian_eps_model(d), d, SHAPE, sampler="ddim", steps=500, clip_denoised=False)
    assert_gaussian(x, mean_tol=0.012, std_rel_tol=0.04)  # measured: <= 2.1 %


def test_first_order_dpm_solver_is_ddim():
    d = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    model = gaussian_eps_model(d)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    spaced = d.respaced("ddim10")
    ddim = sample_ddim(model, spaced, noise, clip_denoised=True)
    first = sample_dpmpp_2m(model, d, noise, sorted(spaced.timestep_map, reverse=True), order=1)
    torch.testing.assert_close(first, ddim, rtol=1e-4, atol=1e-5)
    second = sample_dpmpp_2m(model, d, noise, sorted(spaced.timestep_map, reverse=True), order=2)
    assert (second - ddim).abs().max() > 1e-2  # the second-order correction does something


def test_dpm_solver_timesteps():
    abar = create_gaussian_diffusion(steps=1000).alphas_cumprod
    ts = dpm_solver_timesteps(abar, 10, "logsnr")
    assert ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    lam = 0.5 * np.log(abar[ts] / (1 - abar[ts]))
    steps = np.diff(lam)
    assert steps.max() / steps.min() < 1.3  # uniform in log-SNR up to integer rounding
    assert dpm_solver_timesteps(abar, 10, "time") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    # many steps near t=0 collide after rounding: they are pushed apart, still distinct and in range
    many = dpm_solver_timesteps(
        create_gaussian_diffusion(steps=1000, noise_schedule="cosine").alphas_cumprod, 200
    )
    assert len(set(many)) == 200 and many[0] == 999 and many[-1] == 0
    with pytest.raises(ValueError, match="spacing"):
        dpm_solver_timesteps(abar, 10, "karras")


def test_dpm_solver_calls_the_model_with_original_rescaled_timesteps():
    d = create_gaussian_diffusion(steps=500, rescale_timesteps=True, timestep_respacing="ddim5")
    seen = []

    def model(x, t, **kwargs):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    sample(model, d, (1, 3, 4, 4), sampler="dpm-solver++")  # steps None: the diffusion's own timesteps
    assert seen == [800.0, 600.0, 400.0, 200.0, 0.0]  # original 400, 300, ... scaled by 1000/500


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0), ("dpm-solver++", 0.0)])
def test_generators_make_each_sample_independent_of_its_batch(sampler, eta):
    d = create_gaussian_diffusion(steps=100, learn_sigma=True)
    model = gaussian_eps_model(d, learn_sigma=False)

    def learned(x, t, **kwargs):  # learned sigma with a mid-range variance, so ddpm noise matters
        return torch.cat([model(x, t), torch.zeros_like(x)], 1)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kw = {"sampler": sampler, "eta": eta, "steps": 20, "clip_denoised": False}
    batch = sample(learned, d, (3, 3, 8, 8), generators=gens([11, 12, 13]), **kw)
    alone = sample(learned, d, (1, 3, 8, 8), generators=gens([12]), **kw)
    other_batch = sample(learned, d, (2, 3, 8, 8), generators=gens([99, 12]), **kw)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(other_batch[1:2], alone, rtol=0, atol=1e-6)
    assert (batch[0] - batch[1]).abs().max() > 0.1  # different seeds, different samples


def test_ddpm_per_step_noise_comes_from_the_generators():
    """Same initial noise, different generators: ancestral samples must differ (the steps draw noise)."""
    d = create_gaussian_diffusion(steps=100)
    model = gaussian_eps_model(d)
    x_t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = sample(model, d, x_t.shape, sampler="ddpm", noise=x_t, generators=[torch.Generator().manual_seed(1)])
    b = sample(model, d, x_t.shape, sampler="ddpm", noise=x_t, generators=[torch.Generator().manual_seed(2)])
    c = sample(model, d, x_t.shape, sampler="ddpm", noise=x_t, generators=[torch.Generator().manual_seed(1)])
    assert (a - b).abs().max() > 1e-2
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_samples_are_normal_tensors_outside_inference_mode():
    d = create_gaussian_diffusion(steps=100)
    for sampler in SAMPLERS:
        x = sample(gaussian_eps_model(d), d, (1, 3, 4, 4), sampler=sampler, steps=5)
        assert not x.is_inference()
        x.add_(1.0)  # in-place use by the caller works


def test_bad_arguments_are_named():
    d = create_gaussian_diffusion(steps=100)
    model = gaussian_eps_model(d)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample(model, d, (1, 3, 4, 4), sampler="euler")
    with pytest.raises(ValueError, match="only applies to the ddim sampler"):
        sample(model, d, (1, 3, 4, 4), sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="noise shape"):
        sample(model, d, (2, 3, 4, 4), noise=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sample(model, d, (2, 3, 4, 4), generators=[torch.Generator()] * 3)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample(model, d, (1, 3, 4, 4), steps=0)
