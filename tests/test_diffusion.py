"""Gaussian diffusion maths against closed forms: schedules, respacing, posterior, losses, timestep maps."""

import math

import numpy as np
import pytest
import torch

from rcdm.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_gaussian_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)


# ------------------------------------------------------------------------------------------------ schedules
def test_linear_schedule_endpoints_scale_with_step_count():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    short = get_named_beta_schedule("linear", 250)  # scale 4: same total noise in fewer steps
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule_alpha_bar_is_the_closed_form():
    steps = 1000
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = np.cumprod(1 - get_named_beta_schedule("cosine", steps))
    expected = np.array([f((i + 1) / steps) / f(0) for i in range(steps)])
    # the product telescopes to f(t)/f(0) except where beta is capped at 0.999 (the very last step)
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-9)
    assert get_named_beta_schedule("cosine", steps).max() == pytest.approx(0.999)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'sigmoid'"):
        get_named_beta_schedule("sigmoid", 10)


def test_diffusion_tables_follow_their_definitions():
    d = create_gaussian_diffusion(steps=100)
    np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1 - d.betas))
    np.testing.assert_allclose(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])
    assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
    # posterior log variance is clipped at t=0 to the t=1 value (the t=0 variance is 0)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(d.posterior_variance[1]))


# ------------------------------------------------------------------------------------------------ respacing
def test_space_timesteps_section_strings():
    assert space_timesteps(1000, "") == set(range(1000))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and min(steps) == 0 and max(steps) == 999
    # sections of 10: 2 steps (stride 9), 3 steps (stride 4.5; Python rounds 4.5 to 4), 4 steps (stride 3)
    assert space_timesteps(30, "2,3,4") == {0, 9, 10, 14, 19, 20, 23, 26, 29}
    assert len(space_timesteps(1000, "10,15,20")) == 45
    assert space_timesteps(30, [2, 3, 4]) == space_timesteps(30, "2,3,4")


def test_space_timesteps_bad_requests_are_clear():
    with pytest.raises(ValueError, match="exactly 7 steps"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="section of 10 steps into 11"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="bad timestep_respacing"):
        space_timesteps(10, "fast")
    with pytest.raises(ValueError, match="needs a step count"):
        space_timesteps(10, "ddim")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_spaced_diffusion_keeps_alpha_bar_at_kept_steps(schedule):
    base = create_gaussian_diffusion(steps=1000, noise_schedule=schedule)
    spaced = create_gaussian_diffusion(steps=1000, noise_schedule=schedule, timestep_respacing="10,15,20")
    assert spaced.num_timesteps == 45 and spaced.original_num_steps == 1000
    assert spaced.timestep_map == sorted(space_timesteps(1000, "10,15,20"))
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-10)
    # respacing a spaced diffusion starts again from the original process
    again = spaced.respaced("ddim25")
    assert again.timestep_map == list(range(0, 1000, 40))
    np.testing.assert_allclose(again.alphas_cumprod, base.alphas_cumprod[again.timestep_map], rtol=1e-10)
    assert spaced.base_diffusion().num_timesteps == 1000


class RecordingModel:
    """Returns zeros and records the timesteps it was called with."""

    def __init__(self, channels=3):
        self.seen = []
        self.channels = channels

    def __call__(self, x, t, **kwargs):
        self.seen.append(t.clone())
        return torch.zeros(x.shape[0], self.channels, *x.shape[2:])


@pytest.mark.parametrize("rescale", [False, True])
def test_model_is_called_with_original_timesteps(rescale):
    d = create_gaussian_diffusion(steps=500, timestep_respacing="ddim5", rescale_timesteps=rescale)
    model = RecordingModel()
    d.ddim_sample_loop(model, (2, 3, 4, 4))
    seen = torch.stack([t[0] for t in model.seen])
    original = torch.tensor([400, 300, 200, 100, 0])
    if rescale:  # the published scaling: original timestep * 1000 / original steps, as floats
        assert seen.dtype == torch.float32
        torch.testing.assert_close(seen, original.float() * 2.0)
    else:
        assert seen.dtype == torch.long and torch.equal(seen, original)


# --------------------------------------------------------------------------------------- forward / posterior
def test_q_sample_and_posterior_match_bayes_rule():
    d = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 5, 5, generator=gen)
    t = torch.tensor([1, 10, 500, 999])
    xt = d.q_sample(x0, t, noise)
    ab = torch.tensor(d.alphas_cumprod)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float())

    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    # Gaussian product: q(x_{t-1}|x_0) N(sqrt(ab_prev) x0, 1-ab_prev) times q(x_t|x_{t-1}) N(sqrt(a) x, beta)
    ab_prev = torch.tensor(d.alphas_cumprod_prev)[t].view(-1, 1, 1, 1)
    beta = torch.tensor(d.betas)[t].view(-1, 1, 1, 1)
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    expected_mean = (
        ab_prev.sqrt() * x0.double() / (1 - ab_prev) + (1 - beta).sqrt() * xt.double() / beta
    ) / precision
    torch.testing.assert_close(var, (1 / precision).float().expand_as(var), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean, expected_mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logvar, var.log(), rtol=1e-5, atol=1e-6)


def test_p_mean_variance_with_perfect_epsilon_recovers_x0():
    d = create_gaussian_diffusion(steps=1000)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(3, 3, 6, 6, generator=gen) * 2 - 1, torch.randn(3, 3, 6, 6, generator=gen)
    t = torch.tensor([0, 300, 900])
    xt = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(lambda x, ts, **k: noise, xt, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, atol=2e-4, rtol=0)
    post_mean, _, _ = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(out["mean"], post_mean, atol=2e-4, rtol=0)
    # fixed large: beta_t (posterior variance at t=0 so the decoder likelihood is usable)
    expected_var = torch.tensor([d.posterior_variance[1], d.betas[300], d.betas[900]]).float()
    torch.testing.assert_close(out["variance"][:, 0, 0, 0], expected_var)


def test_learned_range_and_fixed_small_variances():
    learned = create_gaussian_diffusion(steps=100, learn_sigma=True)
    small = create_gaussian_diffusion(steps=100, sigma_small=True)
    x, t = torch.zeros(2, 3, 2, 2), torch.tensor([5, 50])
    for v, expected in [(-1.0, small.posterior_log_variance_clipped), (1.0, np.log(learned.betas))]:
        out = learned.p_mean_variance(lambda x, ts, v=v, **k: torch.cat([x, torch.full_like(x, v)], 1), x, t)
        torch.testing.assert_close(out["log_variance"][:, 0, 0, 0], torch.tensor(expected[[5, 50]]).float())
    mid = learned.p_mean_variance(lambda x, ts, **k: torch.cat([x, torch.zeros_like(x)], 1), x, t)
    geo = 0.5 * (small.posterior_log_variance_clipped[[5, 50]] + np.log(learned.betas[[5, 50]]))
    torch.testing.assert_close(mid["log_variance"][:, 0, 0, 0], torch.tensor(geo).float())
    out = small.p_mean_variance(lambda x, ts, **k: x, x, t)
    torch.testing.assert_close(
        out["variance"][:, 0, 0, 0], torch.tensor(small.posterior_variance[[5, 50]]).float()
    )


def test_x_start_and_previous_x_predictions():
    betas = get_named_beta_schedule("linear", 100)
    kw = {"betas": betas, "model_var_type": ModelVarType.FIXED_LARGE, "loss_type": LossType.MSE}
    xs = GaussianDiffusion(model_mean_type=ModelMeanType.START_X, **kw)
    prev = GaussianDiffusion(model_mean_type=ModelMeanType.PREVIOUS_X, **kw)
    gen = torch.Generator().manual_seed(2)
    x0, xt = torch.rand(2, 3, 4, 4, generator=gen) - 0.5, torch.randn(2, 3, 4, 4, generator=gen)
    t = torch.tensor([3, 70])
    out = xs.p_mean_variance(lambda x, ts, **k: x0, xt, t)
    torch.testing.assert_close(out["pred_xstart"], x0)
    posterior_mean = xs.q_posterior_mean_variance(x0, xt, t)[0]
    out = prev.p_mean_variance(lambda x, ts, **k: posterior_mean, xt, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["mean"], posterior_mean)


def test_wrong_output_shapes_are_explained():
    d = create_gaussian_diffusion(steps=100, learn_sigma=True)
    x, t = torch.zeros(2, 3, 4, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="learned-sigma model output must have shape"):
        d.p_mean_variance(lambda x, ts, **k: x, x, t)
    with pytest.raises(ValueError, match="needs learn_sigma=True"):
        create_gaussian_diffusion(steps=100).p_mean_variance(lambda x, ts, **k: torch.cat([x, x], 1), x, t)


# -------------------------------------------------------------------------------------------------- losses
def test_normal_kl_and_discretized_likelihood_closed_forms():
    zero, one = torch.zeros(1), torch.ones(1)
    assert normal_kl(zero, zero, zero, zero).item() == 0.0
    # KL(N(0,1) || N(1, e)) = 0.5 * (-1 + 1 - 0 + e^-1 + 1 * e^-1) = e^-1
    assert normal_kl(zero, zero, one, one).item() == pytest.approx(math.exp(-1), rel=1e-6)

    x = torch.tensor([-1.0, -0.2, 0.3, 1.0])
    means, log_scales = torch.tensor([-0.9, 0.0, 0.25, 0.8]), torch.full((4,), math.log(0.1))
    ll = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    from scipy.stats import norm

    m, s, xv = means.double().numpy(), 0.1, x.double().numpy()
    exact = np.log(norm.cdf((xv - m + 1 / 255) / s) - norm.cdf((xv - m - 1 / 255) / s))
    exact[0] = np.log(norm.cdf((xv[0] - m[0] + 1 / 255) / s))  # bottom bin takes (-inf, -1 + 1/255]
    exact[3] = np.log(1 - norm.cdf((xv[3] - m[3] - 1 / 255) / s))  # top bin takes [1 - 1/255, inf)
    np.testing.assert_allclose(ll.double().numpy(), exact, rtol=2e-3)  # tanh approximation of the cdf


def perfect_eps_model(diffusion, x0):
    """The model that returns exactly the noise of x_t = sqrt(ab) x0 + sqrt(1-ab) eps (given the true x0)."""
    abar = torch.tensor(diffusion.alphas_cumprod)

    def model(x, t, **kwargs):
        ab = abar[t].view(-1, 1, 1, 1)
        return ((x.double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()).float()

    return model


def test_mse_loss_is_zero_for_the_perfect_model_and_noise_power_for_zero():
    d = create_gaussian_diffusion(steps=1000)
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1, torch.randn(3, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 400, 999])
    terms = d.training_losses(perfect_eps_model(d, x0), x0, t, noise=noise)
    assert set(terms) == {"loss", "mse"}
    assert terms["loss"].shape == (3,) and terms["loss"].max().item() < 1e-8
    zero = d.training_losses(lambda x, ts, **k: torch.zeros_like(x), x0, t, noise=noise)
    torch.testing.assert_close(zero["mse"], noise.pow(2).mean(dim=(1, 2, 3)))


def test_hybrid_loss_trains_variance_only_through_vb_and_rescaling():
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1, torch.randn(2, 3, 4, 4, generator=gen)
    t = torch.tensor([0, 30])
    eps_out = torch.randn(2, 3, 4, 4, generator=gen).requires_grad_()
    var_out = (torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1).requires_grad_()
    model = lambda x, ts, **k: torch.cat([eps_out, var_out], 1)  # noqa: E731

    plain = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="250")
    terms = plain.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    torch.testing.assert_close(terms["mse"], (noise - eps_out).pow(2).mean(dim=(1, 2, 3)))
    terms["vb"].sum().backward()
    assert eps_out.grad is None or not eps_out.grad.any()  # the mean is stopped inside the vb term
    assert var_out.grad.abs().sum() > 0

    rescaled = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, timestep_respacing="250", rescale_learned_sigmas=True
    )
    vb_rescaled = rescaled.training_losses(model, x0, t, noise=noise)["vb"]
    torch.testing.assert_close(vb_rescaled, terms["vb"].detach() * 0.25)  # num_timesteps / 1000

    # at t = 0 the vb term is the decoder NLL in bits, else KL(q || p) in bits
    out = plain.p_mean_variance(model, plain.q_sample(x0, t, noise), t, clip_denoised=False)
    nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
    assert terms["vb"][0].item() == pytest.approx(nll[0].mean().item() / math.log(2), rel=1e-5)


def test_kl_loss_is_rescaled_by_num_timesteps():
    gen = torch.Generator().manual_seed(5)
    x0, noise = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1, torch.randn(2, 3, 4, 4, generator=gen)
    t = torch.tensor([5, 60])
    model = lambda x, ts, **k: torch.cat([x * 0.1, torch.zeros_like(x)], 1)  # noqa: E731
    kl = create_gaussian_diffusion(steps=100, learn_sigma=True, use_kl=True)
    assert kl.loss_type == LossType.RESCALED_KL
    loss = kl.training_losses(model, x0, t, noise=noise)["loss"]
    vb = kl._vb_terms_bpd(model, x0, kl.q_sample(x0, t, noise), t, clip_denoised=False)["output"]
    torch.testing.assert_close(loss, vb * 100)
    assert (loss > 0).all()


def test_spaced_diffusion_is_a_gaussian_diffusion_subclass():
    d = create_gaussian_diffusion(steps=100, timestep_respacing="ddim10")
    assert isinstance(d, SpacedDiffusion) and isinstance(d, GaussianDiffusion)
    assert d.timestep_map == list(range(0, 100, 10))


def test_invalid_betas_are_reported():
    with pytest.raises(ValueError, match=r"range \[0.01, 2\]"):
        create_gaussian_diffusion(steps=10)


def test_training_after_sampling_and_published_positional_calls():
    """Tables first built inside inference_mode stay usable by autograd; guided-diffusion call order works."""
    d = create_gaussian_diffusion(steps=100, learn_sigma=True)
    weight = torch.ones(1, requires_grad=True)
    model = lambda x, t, **k: torch.cat([x * weight, torch.tanh(x * weight)], 1)  # noqa: E731
    # published positional order: model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs
    noise = torch.randn(2, 3, 4, 4)
    x = d.ddim_sample_loop(model, (2, 3, 4, 4), noise, True, None, None, {})
    assert x.shape == (2, 3, 4, 4) and torch.isfinite(x).all()
    loss = d.training_losses(model, x, torch.tensor([0, 50]))["loss"].sum()
    loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    with pytest.raises(NotImplementedError, match="cond_fn"):
        d.p_sample_loop(model, (2, 3, 4, 4), cond_fn=lambda x, t: x)


@pytest.mark.parametrize(
    "respacing, message", [("1", "at least 2 timesteps"), ("ddim1", "cannot create exactly 1 steps")]
)
def test_single_step_respacing_is_a_clear_error(respacing, message):
    base = create_gaussian_diffusion(steps=1000)
    with pytest.raises(ValueError, match=message):
        base.respaced(respacing)
