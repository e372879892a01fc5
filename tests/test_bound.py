"""The ELBO in bits per dimension against a closed form it does not share code with."""

import math

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tiny import tiny_pipeline

from sami_adapter.evaluation import elbo_bits_per_dim


def test_elbo_bits_per_dim_of_a_zero_denoiser_matches_the_closed_form():
    """A UNet that predicts eps = 0 and an encoder at its initial N(0, e^-1) posterior (zero score) have

        E[-ELBO(x_0)] = D sum_i (SNR(i-1)/SNR(i) - 1)/2 (+ 1/(2 alpha_0) at i = 0) + L_T(x_0)
                        + (D/2) log(2 pi beta_0) + latent_dim * e^-1 / 2,

    since E||eps||^2 = D. The estimate must fall within its own standard error of that number.
    """
    pipe = tiny_pipeline(random_head=False)  # zero head: q = N(0, e^-1) for every input, so g = 0
    # 20 training timesteps and 20 strata per image: every timestep is drawn once per image, so the only
    # randomness left is eps (the estimate's standard error is then a few percent).
    pipe.scheduler = DDIMScheduler(num_train_timesteps=20, beta_start=0.001, beta_end=0.2, clip_sample=False)
    with torch.no_grad():
        pipe.unet.conv_out.weight.zero_()
        pipe.unet.conv_out.bias.zero_()
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = elbo_bits_per_dim(pipe, images, timesteps_per_image=20, batch_size=1280)

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    betas = scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    snr = abar / (1 - abar)
    weights = torch.cat([(1 / (2 * (1 - betas[0]))).view(1), (snr[:-1] / snr[1:] - 1) / 2])
    d = images[0].numel()
    x0 = images.double().flatten(1)
    prior = 0.5 * (abar[-1] * x0**2 + (1 - abar[-1]) - 1 - torch.log(1 - abar[-1])).sum(1)
    kl = pipe.latent_dim * 0.5 * math.exp(-1.0)
    expected_nats = d * weights.sum() + prior.mean() + 0.5 * d * torch.log(2 * math.pi * betas[0]) + kl
    expected_bpd = float(expected_nats) / (d * math.log(2))
    assert abs(out["bpd"] - expected_bpd) < 4 * out["bpd_stderr"] + 1e-3, (out["bpd"], expected_bpd, out["bpd_stderr"])
    assert abs(out["kl_nats"] - kl) < 1e-4, out["kl_nats"]
    # the guidance is zero, so the bound differs from the base model's only by the KL
    assert abs((out["bpd"] - out["unguided_bpd"]) * d * math.log(2) - kl) < 1e-3
    assert out["bpd_stderr"] < 0.025 * abs(expected_bpd)  # tight enough to catch a wrong weight or constant
