"""Guidance and the ELBO against the closed forms of a linear-Gaussian model."""

import inspect

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


# Every variance-preserving scheduler the pipeline accepts (DPMSolverSDE needs torchsde, not installed here).
ACCEPTED_SCHEDULERS = [
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "SASolverScheduler", "LCMScheduler", "TCDScheduler",
]


def _true_abar(scheduler, state, model_input, t, call):
    """The noise level of this model call, read off the loop itself, not from the library.

    A scheduler that scales its state hands the model ``state / sqrt(1 + sigma^2)`` (``abar = 1 / (1 + sigma^2)``),
    so the ratio of the two tensors gives the level; one that does not is at ``sigmas[call]`` (one model call per
    timestep) or, without sigmas, at ``alphas_cumprod[t]``.
    """
    ratio = (state / model_input).flatten()[0].double()
    if not torch.equal(state, model_input):
        return (1.0 / ratio**2).expand(state.shape[0])
    if isinstance(getattr(scheduler, "sigmas", None), torch.Tensor):
        return (1.0 / (1.0 + scheduler.sigmas[call].double() ** 2)).expand(state.shape[0])
    return scheduler.alphas_cumprod[int(t)].double().expand(state.shape[0])


NO_X0_PREDICTION = {"PNDMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}


@pytest.mark.parametrize(
    "scheduler_name, prediction_type",
    [(n, p) for n in ACCEPTED_SCHEDULERS for p in ("epsilon", "sample", "v_prediction") if not (p == "sample" and n in NO_X0_PREDICTION)],
)
def test_guided_output_equals_analytic_conditional_at_every_model_call_of_a_real_loop(scheduler_name, prediction_type):
    """With the exact posterior as encoder, guided = the exact conditional model, at every call of the
    scheduler's own loop (second-order stages, interpolated sigmas, Karras-free defaults included)."""
    import diffusers

    model = LinearGaussian()
    scheduler = getattr(diffusers, scheduler_name)(num_train_timesteps=1000, prediction_type=prediction_type)
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, model.k, generator=g, dtype=torch.float64)
    state = torch.randn(8, *IMAGE_SHAPE, generator=g, dtype=torch.float64) * scheduler.init_noise_sigma
    step_kwargs = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for call, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(state, t)
        abar = _true_abar(scheduler, state, model_input, t, call)
        unguided = _as_prediction(model.eps_unconditional(model_input, abar), model_input, abar, prediction_type)
        score = posterior_score(ExactEncoder(model, lambda _t, abar=abar: abar), z, model_input, t)
        guided = apply_guidance(unguided, score, scheduler, t, model_input)
        expected = _as_prediction(model.eps_conditional(model_input, z, abar), model_input, abar, prediction_type)
        torch.testing.assert_close(guided, expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"{scheduler_name}, call {call} (t={float(t):g}): {m}")
        state = scheduler.step(guided, t, state, **step_kwargs).prev_sample


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


def test_zero_terminal_snr_endpoint_is_finite_in_guidance_and_loss():
    """abar_{T-1} = 0: a_t = 0, s_t = 1; epsilon keeps -s_t g, x0 and v leave that one call unguided; the loss stays finite."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True)
    assert scheduler.alphas_cumprod[-1] == 0
    a, s = noise_level(scheduler, 999, batch_size=2)
    assert torch.equal(a, torch.zeros(2, dtype=torch.float64)) and torch.equal(s, torch.ones(2, dtype=torch.float64))
    a, s = noise_level(scheduler, torch.tensor([998.5, 999.0]), batch_size=2)  # fractional next to the endpoint
    assert torch.isfinite(a).all() and torch.isfinite(s).all() and a[1] == 0
    out, score, x = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(apply_guidance(out, score, scheduler, 999, x), out - score)
    for prediction_type in ("sample", "v_prediction"):
        other = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True, prediction_type=prediction_type)
        assert torch.equal(apply_guidance(out, score, other, 999, x), out)
        assert not torch.equal(apply_guidance(out, score, other, 998, x), out)  # guided one step earlier

    model = LinearGaussian()
    unet = lambda x, t: model.eps_unconditional(x, scheduler.alphas_cumprod.double()[t])  # noqa: E731
    encoder = ExactEncoder(model, lambda t: torch.where(t == 0, torch.ones(()), scheduler.alphas_cumprod[t]).double())
    x0 = model.sample(4, torch.Generator().manual_seed(0))
    loss = sami_loss(unet, encoder, scheduler, x0, weighting="simple", timesteps=torch.tensor([999, 999, 998, 0]))
    assert torch.isfinite(loss.loss) and torch.isfinite(loss.guided_error).all()
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sami_loss(unet, encoder, scheduler, x0, weighting="elbo", timesteps=torch.tensor([999, 10, 998, 0]))


def test_noise_level_uses_the_timestep_given_outside_the_schedulers_current_step():
    """A sigma scheduler's step_index is used only for its own current timestep: a finished loop, another
    timestep or per-sample timesteps each get their own level."""
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    reference = lambda t: alpha_sigma_from_alphas_cumprod(ddpm.alphas_cumprod, torch.as_tensor(t, dtype=torch.float64).view(-1))  # noqa: E731
    euler = EulerDiscreteScheduler(num_train_timesteps=1000)
    euler.set_timesteps(5)
    sample = torch.zeros(1)
    for t in euler.timesteps:
        euler.scale_model_input(sample, t)
        sample = euler.step(torch.zeros(1), t, sample).prev_sample
    assert euler.step_index == len(euler.timesteps)  # the loop is over
    a, s = noise_level(euler, 500)
    torch.testing.assert_close((a, s), reference(500))
    assert s.item() > 0.5  # not the silent zero of sigmas[-1]
    euler.set_timesteps(5)
    euler.scale_model_input(sample, euler.timesteps[1])  # mid-loop: step_index = 0 ... set to this step
    euler._step_index = 1
    a, s = noise_level(euler, torch.tensor([100, 700]), batch_size=2)
    torch.testing.assert_close((a, s), reference([100, 700]))
    a, s = noise_level(euler, 300)  # another timestep than the current one
    torch.testing.assert_close((a, s), reference(300))
    a, s = noise_level(euler, euler.timesteps[1])  # the current one: the scheduler's own sigma
    torch.testing.assert_close((s / a).float(), euler.sigmas[1].view(1))


def test_free_bits_on_parts_of_a_batch_give_the_whole_batch_gradient():
    """Two halves (two processes, or two accumulation steps) with the whole batch's KL as reference sum to the
    gradient of the whole batch, also when free bits cut between the halves' own means."""
    from tiny import tiny_encoder, tiny_unet

    torch.manual_seed(0)
    encoder, unet = tiny_encoder(latent_dim=3), tiny_unet()
    with torch.no_grad():
        encoder.head.weight.normal_(0, 0.5)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    with torch.no_grad():
        kl = encoder(x, torch.zeros(8, dtype=torch.long)).kl_per_dim()[:, 0]
    x = x[kl.argsort()]  # first half: the low-KL images of dimension 0
    kl = kl.sort().values
    low, whole = kl[:4].mean().item(), kl.mean().item()
    free_bits = (low + whole) / 2  # the first half alone would be clamped on dim 0, the whole batch is not
    draws = {"timesteps": torch.randint(0, 1000, (8,), generator=g), "noise": torch.randn(8, 1, 8, 8, generator=g),
             "latent_noise": torch.randn(8, 3, generator=g)}

    def grads(rows, reference=None):
        encoder.zero_grad()
        out = sami_loss(unet, encoder, scheduler, x[rows], beta=1.0, weighting="simple", free_bits=free_bits, kl_reference=reference,
                        **{k: v[rows] for k, v in draws.items()})
        out.loss.backward()
        return [p.grad.clone() for p in encoder.parameters()]

    full = grads(slice(0, 8))
    with torch.no_grad():
        reference = encoder(x, torch.zeros(8, dtype=torch.long)).kl_per_dim().mean(0)
    halves = [grads(slice(0, 4), reference), grads(slice(4, 8), reference)]
    for f, a, b in zip(full, *halves):
        torch.testing.assert_close((a + b) / 2, f, atol=1e-5, rtol=1e-4)
    own = [grads(slice(0, 4)), grads(slice(4, 8))]  # each half against its own mean: not the whole batch's gradient
    assert max(((a + b) / 2 - f).abs().max().item() for f, a, b in zip(full, *own)) > 1e-4


def test_frozen_parameters_gives_the_same_score_and_restores_the_flags():
    """Sampling takes the score with the encoder's weights frozen: same values, and the flags come back
    (a weight that was frozen before stays frozen)."""
    from sami_adapter.guidance import frozen_parameters
    from tiny import tiny_encoder

    torch.manual_seed(0)
    enc = tiny_encoder(latent_dim=3)
    with torch.no_grad():
        enc.head.weight.normal_(0, 0.3)
    enc.conv_in.weight.requires_grad_(False)
    x, z, t = torch.randn(4, 1, 8, 8), torch.randn(4, 3), torch.full((4,), 300)
    plain = posterior_score(enc, z, x, t)
    with frozen_parameters(enc):
        assert not any(p.requires_grad for p in enc.parameters())
        frozen = posterior_score(enc, z, x, t)
    assert torch.equal(plain, frozen)
    assert not enc.conv_in.weight.requires_grad and enc.head.weight.requires_grad
