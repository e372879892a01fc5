"""Guidance and the ELBO against the closed forms of a linear-Gaussian model."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, ScoreSdeVeScheduler
from linear_gaussian import IMAGE_SHAPE, LinearGaussian

from sami_adapter import LatentPosterior, apply_guidance, noise_level, posterior_score, sami_loss
from sami_adapter.guidance import add_noise, alpha_sigma_from_alphas_cumprod, encoder_noise_level


def _as_prediction(eps, x_t, abar, prediction_type):
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    x0 = (x_t - s * eps) / a
    return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]


class ExactEncoder:
    """The analytic posterior p(z | x_t) of the model, as a SAMI encoder. ``abar_of`` maps t -> abar."""

    def __init__(self, model, abar_of):
        self.model, self.abar_of = model, abar_of

    def __call__(self, x, t):
        abar = self.abar_of(torch.as_tensor(t).expand(x.shape[0]))
        p = self.model.posterior(x, abar)
        return LatentPosterior(torch.cat([p.mean, p.logvar], dim=-1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_guided_output_equals_analytic_conditional(scheduler_cls, prediction_type):
    model = LinearGaussian()
    scheduler = scheduler_cls(num_train_timesteps=1000, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0 = model.sample(16, g)
    z = torch.randn(16, model.k, generator=g, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        if hasattr(scheduler, "sigmas"):
            sigma = scheduler.sigmas[i].double()
            abar = torch.full((16,), 1.0 / (1.0 + sigma.item() ** 2), dtype=torch.float64)
        else:
            abar = scheduler.alphas_cumprod[int(t)].double().expand(16)
        # the scheduler's own state: VP x_t for DDIM/DPM-Solver, x_t / a_t for Euler
        x_t = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        state = x_t if scheduler.init_noise_sigma == 1.0 else x_t / abar.sqrt().view(-1, 1, 1, 1)
        model_input = scheduler.scale_model_input(state, t)
        torch.testing.assert_close(model_input, x_t)
        unguided = _as_prediction(model.eps_unconditional(model_input, abar), model_input, abar, prediction_type)
        encoder = ExactEncoder(model, lambda _t, abar=abar: abar)
        score = posterior_score(encoder, z, model_input, t)
        guided = apply_guidance(unguided, score, scheduler, t, model_input)
        expected = _as_prediction(model.eps_conditional(model_input, z, abar), model_input, abar, prediction_type)
        torch.testing.assert_close(guided, expected, atol=1e-4, rtol=1e-4)
        if hasattr(scheduler, "_step_index") and scheduler.step_index is not None:
            scheduler._step_index += 1  # advance as step() would


def test_score_is_difference_of_conditional_and_marginal_scores():
    model = LinearGaussian()
    g = torch.Generator().manual_seed(1)
    abar = torch.full((8,), 0.5, dtype=torch.float64)
    x_t = model.sample(8, g) * abar.sqrt()[0] + (1 - abar).sqrt()[0] * torch.randn(8, *IMAGE_SHAPE, generator=g, dtype=torch.float64)
    z = torch.randn(8, model.k, generator=g, dtype=torch.float64)
    score = posterior_score(ExactEncoder(model, lambda _t: abar), z, x_t, 500)
    s = (1 - abar).sqrt().view(-1, 1, 1, 1)
    expected = -(model.eps_conditional(x_t, z, abar) - model.eps_unconditional(x_t, abar)) / s
    torch.testing.assert_close(score, expected, atol=1e-8, rtol=1e-6)


def test_elbo_is_an_upper_bound_on_negative_log_likelihood():
    """E_x[SAMI bound] >= E_x[-log p(x)] (Gibbs), and it is not vacuous."""
    model = LinearGaussian()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    # t = 0 is the clean image for the encoder, as in sami_loss
    encoder = ExactEncoder(model, lambda t: torch.where(t == 0, torch.ones(()), alphas_cumprod[t]).double())
    unet = lambda x, t: model.eps_unconditional(x, alphas_cumprod[t])  # noqa: E731
    g = torch.Generator().manual_seed(2)
    n, num_t = 256, 1000
    x0 = model.sample(n, g)
    timesteps = torch.arange(num_t).repeat(n)  # every timestep of every image: the sum over t exactly
    out = sami_loss(unet, encoder, scheduler, x0.repeat_interleave(num_t, 0), beta=1.0, weighting="elbo", timesteps=timesteps, generator=g)
    bound = out.negative_elbo.double().view(n, num_t).mean(dim=1)
    gap = bound - model.neg_log_marginal(x0)
    stderr = gap.std() / n**0.5
    assert gap.mean() > 3 * stderr, (gap.mean(), stderr)
    assert gap.mean() < 4.0, "the bound should be close to -log p(x) with the exact scores and posterior"
    # the uninformative posterior gives a bound too, but not a better one
    prior_encoder = lambda x, t: LatentPosterior(torch.zeros(x.shape[0], 2 * model.k, dtype=torch.float64))  # noqa: E731
    out_prior = sami_loss(unet, prior_encoder, scheduler, x0.repeat_interleave(num_t, 0), beta=1.0, timesteps=timesteps, generator=g)
    gap_prior = out_prior.negative_elbo.double().view(n, num_t).mean(dim=1) - model.neg_log_marginal(x0)
    assert gap_prior.mean() > 3 * gap_prior.std() / n**0.5


def test_noise_level_matches_alphas_cumprod_and_sigmas():
    ddim = DDIMScheduler()
    a, s = noise_level(ddim, 300, batch_size=2)
    torch.testing.assert_close(a**2, ddim.alphas_cumprod[300].double().expand(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(a**2 + s**2, torch.ones(2, dtype=torch.float64))
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(5)
    euler.scale_model_input(torch.zeros(1), euler.timesteps[2])
    a, s = noise_level(euler, euler.timesteps[2])
    torch.testing.assert_close((s / a).float(), euler.sigmas[2].view(1))
    a, s = alpha_sigma_from_alphas_cumprod(ddim.alphas_cumprod, torch.tensor([10.5]))
    lo, hi = (alpha_sigma_from_alphas_cumprod(ddim.alphas_cumprod, torch.tensor([t])) for t in (10, 11))
    assert lo[1] < s < hi[1]


def test_bad_scheduler_and_timesteps_raise():
    with pytest.raises(TypeError, match="alphas_cumprod"):
        noise_level(ScoreSdeVeScheduler(), 10)
    with pytest.raises(ValueError, match="out of range"):
        noise_level(DDIMScheduler(), -1)
    with pytest.raises(ValueError, match="out of range"):
        noise_level(DDIMScheduler(num_train_timesteps=100), 100)
    with pytest.raises(ValueError, match="NaN"):
        noise_level(DDIMScheduler(), float("nan"))
    with pytest.raises(ValueError, match="prediction_type"):
        apply_guidance(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), DDIMScheduler(prediction_type="foo"), 1, torch.zeros(1, 1, 2, 2))


def test_forward_noising_matches_the_scheduler_and_t0_is_clean():
    """``add_noise`` is diffusers' ``DDPMScheduler.add_noise`` (equation (1)); the encoder's level at
    t = 0 is the clean image, at t > 0 the scheduler's."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    alpha, sigma = alpha_sigma_from_alphas_cumprod(scheduler.alphas_cumprod, t)
    torch.testing.assert_close(add_noise(x0, eps, alpha, sigma), scheduler.add_noise(x0, eps, t))
    a_enc, s_enc = encoder_noise_level(scheduler.alphas_cumprod, t)
    assert a_enc[0] == 1 and s_enc[0] == 0
    torch.testing.assert_close(a_enc[1:], alpha[1:])
    torch.testing.assert_close(s_enc[1:], sigma[1:])
    torch.testing.assert_close(add_noise(x0, eps, a_enc, s_enc)[0], x0[0])
