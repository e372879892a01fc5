"""The SAMI objective: the guided denoising loss (ELBO-weighted or simple) plus beta times the KL of the code.

For one image ``x_0`` (D pixels) and a code ``z ~ q(z | x_0)`` the decoder is the reverse
diffusion chain whose noise prediction is the guided ``eps_hat(x_t, t, z)`` of
:mod:`sami_adapter.guidance`. Ho et al. (2020, eq. 5) and Kingma et al. (2021) give

    -log p(x_0 | z) <= L_T + sum_{t=1}^{T-1} L_t + L_0,

and with the reverse variance sigma_i^2 = beta_tilde_i = beta_i (1 - abar_{i-1}) / (1 - abar_i)
(diffusers' ``fixed_small``) for i >= 1, each term is a weighted denoising error (diffusers'
0-based index ``i``):

    L_i = w_i || eps - eps_hat(x_i, i, z) ||^2,   w_i = beta_i / (2 alpha_i (1 - abar_{i-1}))   (i >= 1)
        = (SNR(i-1) / SNR(i) - 1) / 2.

The last reverse step is not ``fixed_small``: its beta_tilde_0 is 0 (diffusers clips it to 1e-20
and adds no noise), which has no density. The bound computed here uses Ho et al.'s Gaussian decoder
with variance beta_0 instead, ``L_0 = -log N(x_0; mu_theta(x_0'), beta_0 I)`` with ``x_0'`` the
index-0 noisy image (the bound of a sampler whose last step adds noise of variance beta_0):

    L_0 = w_0 || eps - eps_hat(x_0', 0, z) ||^2 + (D/2) log(2 pi beta_0),   w_0 = 1 / (2 alpha_0).

The prior term ``L_T = KL(q(x_T | x_0) || N(0, I))`` and ``(D/2) log(2 pi beta_0)`` do not depend
on any parameter: :func:`elbo_constant` returns them, ``sami_loss`` omits them from ``loss`` and
adds them back in ``negative_elbo``. Monte Carlo over ``i ~ p(i)`` gives the unbiased estimate
``w_i / p(i) || eps - eps_hat ||^2`` (``T w_i`` for uniform ``i``), so with ``beta = 1`` and no free bits

    -log p(x_0) <= E_{q(z|x_0)}[ sum_i L_i ] + KL(q(z | x_0) || N(0, I))  (the SAMI ELBO).

Only then is ``loss`` in ELBO units (nats) and ``beta`` a weight in those units. ``weighting="simple"``
uses ``|| eps - eps_hat ||^2`` summed over pixels with no weight and no importance correction (Ho et
al.'s L_simple): sampling some timesteps more often then really does emphasise them, at the price of
no longer being a bound, and ``beta`` is then only the KL's weight relative to that unweighted error
(``beta = 1`` is no bound).

Rate control (:mod:`sami_adapter.rate`) adds terms that price the information in ``z`` separately
from the mismatch between the aggregate posterior and the prior, and ``intervention_weight`` adds a
per-dimension intervention loss: the diagonal posterior splits the guidance into one field per
dimension, ``grad_x log q(z | x_t) = sum_i grad_x log q(z_i | x_t)``; moving the denoised estimate
``x0_hat = (x_t - s_t eps_theta) / a_t`` along field ``i`` alone, by ``(s_t^2 / a_t) grad_x log q(z_i | x_t)``
(the change that field makes to ``x0_hat``), should change the re-encoded code in dimension ``i``
only. The loss is the share of that change that lands in the other dimensions,

    L_int = sum_{j != i} (Delta mu_j)^2 / (sum_j (Delta mu_j)^2 + sum_j sigma_j^2(x0_hat)),   Delta mu = mu(x0_hat + shift_i) - mu(x0_hat),

averaged over samples with ``t < T/2`` (where ``a_t`` is not small) and a random ``i`` per sample. The
posterior variances in the denominator make it the share of a change that is large against the code's
own uncertainty, and keep its gradient bounded while the guidance is still near zero.

A warm start from another model's encoder (a β-TCVAE's, whose frame is aligned with the factors) can
be held by an anchor on the clean code, ``anchor_weight * E || mu(x_0) - mu_anchor(x_0) ||^2``, annealed
to zero: the SAMI loss is rotation-neutral where the rates are equal, so an aligned frame can survive
once the anchor is gone, and nothing else would choose it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .guidance import (
    add_noise,
    alpha_sigma_from_alphas_cumprod,
    clean_guidance_coefficient,
    guided_output,
    posterior_score,
    predicted_clean,
    to_epsilon,
)
from .rate import RateControl, rate_terms


@dataclass
class SAMILossOutput(BaseOutput):
    """Everything one SAMI training step measures.

    Args:
        loss: scalar to minimise, ``diffusion_loss + beta * kl_term``.
        diffusion_loss: batch mean of the (weighted) guided denoising error, summed over pixels.
        unguided_diffusion_loss: the same with the guidance removed (same noise and timesteps),
            detached; ``unguided - guided`` is the guidance gain.
        kl: batch mean of ``KL(q(z | x_0) || N(0, I))`` in nats.
        kl_per_dim: (D,) batch-mean KL per code dimension.
        timesteps: (B,) the timesteps used.
        guided_error: (B,) per-sample guided error (detached, weighted like ``diffusion_loss``).
        unguided_error: (B,) per-sample unguided error (detached).
        negative_elbo: (B,) the full bound ``sum_i L_i + KL + constant`` in nats when
            ``weighting="elbo"``, else None. It always uses ``beta = 1`` and the unclamped KL,
            whatever ``beta`` and ``free_bits`` the loss uses.
        rate: the measurements of :func:`sami_adapter.rate.rate_terms` (detached) when ``rate`` was
            given: information upper bound, mismatch (per dimension too), TC, MI, dimension-wise KL.
        intervention_loss: the per-dimension intervention loss (detached) when it was used.
        z: (B, D) the codes drawn from ``q(z | x_0)`` (detached), e.g. to train a TC discriminator.
        posterior_mean: (B, D) the means of ``q(z | x_0)`` (detached).
    """

    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    unguided_diffusion_loss: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor
    timesteps: torch.Tensor
    guided_error: torch.Tensor
    unguided_error: torch.Tensor
    negative_elbo: Optional[torch.Tensor] = None
    rate: Optional[Dict[str, torch.Tensor]] = None
    intervention_loss: Optional[torch.Tensor] = None
    z: Optional[torch.Tensor] = None
    posterior_mean: Optional[torch.Tensor] = None


def elbo_weights(scheduler: Any) -> torch.Tensor:
    """``w_i`` of the module docstring, shape (T,), float64.

    Raises:
        ValueError: a step with ``alpha_i = 0`` (``beta_i = 1``, as in zero-terminal-SNR schedules): its
            reverse mean divides by ``sqrt(alpha_i)``, so its weight and the bound are infinite.
    """
    betas = scheduler.betas.to(torch.float64)
    alphas = 1.0 - betas
    if (alphas <= 0).any():
        raise ValueError(
            "weighting='elbo' is undefined for this schedule: it has zero terminal SNR (beta = 1 at the last step, "
            "abar_T = 0), where the ELBO weight beta / (2 alpha (1 - abar)) is infinite. Use weighting='simple'."
        )
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    weights = torch.empty_like(betas)
    weights[0] = 1.0 / (2.0 * alphas[0])
    weights[1:] = betas[1:] / (2.0 * alphas[1:] * (1.0 - alphas_cumprod[:-1]))
    return weights


def elbo_constant(scheduler: Any, clean_images: torch.Tensor) -> torch.Tensor:
    """Per-sample ``L_T + (D/2) log(2 pi beta_0)`` in nats: the parameter-free part of the bound."""
    betas = scheduler.betas.to(torch.float64)
    abar_T = torch.cumprod(1.0 - betas, dim=0)[-1]
    x0 = clean_images.detach().to(torch.float64).flatten(1)
    num_pixels = x0.shape[1]
    prior_term = 0.5 * (abar_T * x0**2 + (1 - abar_T) - 1 - torch.log(1 - abar_T)).sum(dim=1)
    decoder_normaliser = 0.5 * num_pixels * torch.log(2 * torch.pi * betas[0])
    return prior_term + decoder_normaliser


def sample_timesteps(batch: int, num_train_timesteps: int, timestep_probs: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B,) training timesteps on the generator's device: uniform on [0, T), or drawn from ``timestep_probs`` (T,)."""
    if timestep_probs is None:
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device if generator else "cpu")
    return torch.multinomial(timestep_probs.float().cpu(), batch, replacement=True, generator=generator)


def _model_output(unet: Callable, sample: torch.Tensor, timesteps: torch.Tensor, unet_kwargs: Dict) -> torch.Tensor:
    out = unet(sample, timesteps, **unet_kwargs)
    return out.sample if hasattr(out, "sample") else out


def sami_loss(
    unet: Callable,
    encoder: Callable,
    scheduler: Any,
    clean_images: torch.Tensor,
    beta: float = 1.0,
    weighting: str = "elbo",
    generator: Optional[torch.Generator] = None,
    train_unet: bool = False,
    timesteps: Optional[torch.Tensor] = None,
    timestep_probs: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    latent_noise: Optional[torch.Tensor] = None,
    free_bits: float = 0.0,
    sami_scale: float = 1.0,
    unet_kwargs: Optional[Dict[str, Any]] = None,
    kl_reference: Optional[torch.Tensor] = None,
    rate: Optional[RateControl] = None,
    step: int = 0,
    tc_discriminator: Optional[torch.nn.Module] = None,
    intervention_weight: float = 0.0,
    intervention_dims: Optional[torch.Tensor] = None,
    anchor_mean: Optional[torch.Tensor] = None,
    anchor_weight: float = 0.0,
) -> SAMILossOutput:
    """One Monte Carlo estimate of the SAMI objective (module docstring).

    Args:
        unet: the denoiser ``(x_t, t, **unet_kwargs) -> output with .sample`` (or a tensor), in
            the scheduler's ``prediction_type``.
        encoder: ``(sample, t) -> posterior with .mean/.logvar/.sample/.kl_per_dim``.
        scheduler: a training scheduler with ``betas`` and ``alphas_cumprod`` (e.g. DDPMScheduler).
        clean_images: (B, C, H, W) ``x_0``.
        beta: weight of the KL term. With ``weighting="elbo"`` it is in ELBO units (1 = the bound;
            < 1 rewards information in z); with ``"simple"`` it only weighs the KL against the
            unweighted denoising error.
        weighting: ``"elbo"`` (exact weights, a bound) or ``"simple"`` (unit weights).
        generator: torch generator for ``z``, timesteps and noise.
        train_unet: run the UNet with autograd (LoRA or joint training). When False the UNet runs
            under ``no_grad``: no activations are kept and no UNet backward happens.
        timesteps: (B,) timesteps to use instead of sampling them.
        timestep_probs: (T,) sampling distribution of timesteps; the ELBO weighting divides by it
            (importance sampling keeps the bound unbiased), the simple weighting does not.
        noise: (B, C, H, W) ``eps`` to use instead of sampling it.
        latent_noise: (B, D) standard normal draw of the reparameterisation ``z = mu + sigma * latent_noise``.
        free_bits: minimum batch-mean KL per dimension (nats) below which the KL is not penalised:
            a dimension whose mean KL is at most ``free_bits`` adds the constant ``free_bits`` (no
            gradient), the others their KL.
        sami_scale: multiplies the posterior score (1 = exact SAMI).
        unet_kwargs: extra UNet inputs (e.g. ``encoder_hidden_states`` of a text-conditioned UNet).
        kl_reference: (D,) the per-dimension mean KL of the whole optimisation batch, when this call
            sees only part of it (one process of several, one micro-batch of an accumulated step).
            ``free_bits`` is compared with it instead of with this part's own mean, so the summed
            gradients of the parts equal the gradient of the whole batch. Default: this batch's own.
        rate: :class:`~sami_adapter.rate.RateControl` terms added to the loss (capacity on the
            information, aggregate-posterior mismatch, TC, the β-TCVAE split).
        step: the optimiser step, for the rate control's capacity schedule (``rate.at(step)``).
        tc_discriminator: the :class:`~sami_adapter.rate.TCDiscriminator` when ``rate`` uses it (train
            it separately with its ``loss``).
        intervention_weight: weight of the per-dimension intervention loss (module docstring).
        intervention_dims: (B,) the dimension moved for each sample (default: drawn with ``generator``).
        anchor_mean: (B, D) a reference encoder's posterior means of ``clean_images`` (module docstring).
        anchor_weight: weight of the anchor term (this step's value of its schedule).
    """
    # Long on purpose: one pass of the objective, each term beside its equation and sharing the forward pass's intermediates.
    if weighting not in ("elbo", "simple"):
        raise ValueError(f"weighting must be 'elbo' or 'simple', got {weighting!r}.")
    if not torch.isfinite(clean_images).all():
        raise ValueError("clean_images contains NaN or inf; check the data pipeline.")
    unet_kwargs = unet_kwargs or {}
    batch, device = clean_images.shape[0], clean_images.device
    num_train_timesteps = scheduler.alphas_cumprod.shape[0]

    # z ~ q(z | x_0), reparameterised so gradients reach the encoder through z as well.
    posterior = encoder(clean_images, torch.zeros(batch, device=device, dtype=torch.long))
    z = posterior.sample(generator=generator) if latent_noise is None else posterior.mean + posterior.std * latent_noise.to(posterior.mean)

    if timesteps is None:
        timesteps = sample_timesteps(batch, num_train_timesteps, timestep_probs, generator).to(device)
    timesteps = timesteps.long()
    if noise is None:
        noise = randn_tensor(clean_images.shape, generator=generator, device=device, dtype=clean_images.dtype)

    alpha, sigma = alpha_sigma_from_alphas_cumprod(scheduler.alphas_cumprod, timesteps)
    noisy = add_noise(clean_images, noise, alpha, sigma)

    with torch.set_grad_enabled(train_unet and torch.is_grad_enabled()):
        model_output = _model_output(unet, noisy, timesteps, unet_kwargs)
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    eps_theta = to_epsilon(model_output.float(), noisy.float(), alpha, sigma, prediction_type)
    score = posterior_score(encoder, z, noisy, timesteps, create_graph=torch.is_grad_enabled())
    eps_hat = guided_output(eps_theta, score.float(), alpha, sigma, "epsilon", sami_scale)

    noise = noise.float()
    guided_sq = ((noise - eps_hat) ** 2).flatten(1).sum(dim=1)
    unguided_sq = ((noise - eps_theta.detach()) ** 2).flatten(1).sum(dim=1)
    if weighting == "elbo":
        weights = elbo_weights(scheduler).to(device)[timesteps]
        probs = (
            torch.full_like(weights, 1.0 / num_train_timesteps)
            if timestep_probs is None
            else timestep_probs.to(device=device, dtype=torch.float64)[timesteps] / timestep_probs.sum()
        )
        sample_weight = (weights / probs).float()
    else:
        sample_weight = torch.ones(batch, device=device)
    guided_error = sample_weight * guided_sq
    unguided_error = sample_weight * unguided_sq
    diffusion_loss = guided_error.mean()

    kl_per_sample_dim = posterior.kl_per_dim().float()
    kl_per_dim = kl_per_sample_dim.mean(dim=0)
    if free_bits > 0:
        reference = kl_per_dim.detach() if kl_reference is None else kl_reference.to(kl_per_dim)
        penalised = reference > free_bits  # clamp(reference, min=free_bits), applied to this part's KL
        kl_term = torch.where(penalised, kl_per_dim, torch.full_like(kl_per_dim, free_bits)).sum()
    else:
        kl_term = kl_per_dim.sum()
    loss = diffusion_loss + beta * kl_term
    rate_out = None
    if rate is not None:
        rate_out = rate_terms(rate, posterior.mean, posterior.logvar, z, kl_per_dim.sum(), step=step, discriminator=tc_discriminator)
        loss = loss + rate_out.pop("loss")
    intervention = None
    if intervention_weight > 0:
        intervention = _intervention_loss(encoder, z, noisy, timesteps, eps_theta.detach(), alpha, sigma, num_train_timesteps,
                                          intervention_dims, generator)
        loss = loss + intervention_weight * intervention

    if anchor_mean is not None and anchor_weight > 0:
        loss = loss + anchor_weight * ((posterior.mean.float() - anchor_mean.float()) ** 2).sum(1).mean()

    negative_elbo = None
    if weighting == "elbo":
        negative_elbo = (guided_error.detach().double() + kl_per_sample_dim.detach().sum(1).double() + elbo_constant(scheduler, clean_images)).float()
    return SAMILossOutput(
        loss=loss,
        diffusion_loss=diffusion_loss,
        unguided_diffusion_loss=unguided_error.mean().detach(),
        kl=kl_per_dim.sum(),
        kl_per_dim=kl_per_dim,
        timesteps=timesteps,
        guided_error=guided_error.detach(),
        unguided_error=unguided_error.detach(),
        negative_elbo=negative_elbo,
        rate=rate_out,
        intervention_loss=None if intervention is None else intervention.detach(),
        z=z.detach(),
        posterior_mean=posterior.mean.detach(),
    )


def _intervention_loss(encoder, z, noisy, timesteps, eps_theta, alpha, sigma, num_train_timesteps, dims, generator):
    """``L_int`` of the module docstring: the share of the code change outside the moved dimension."""
    batch, latent_dim = z.shape
    if dims is None:
        dims = torch.randint(0, latent_dim, (batch,), generator=generator, device=generator.device if generator else "cpu")
    dims = dims.to(z.device).long()
    one_hot = torch.nn.functional.one_hot(dims, latent_dim).float()
    field = posterior_score(encoder, z, noisy, timesteps, create_graph=torch.is_grad_enabled(), dim_weights=one_hot).float()
    alpha, sigma = alpha.float(), sigma.float()
    x0_hat = predicted_clean(noisy.float(), eps_theta, alpha, sigma).detach()
    zeros = torch.zeros(batch, device=z.device, dtype=torch.long)
    shift = clean_guidance_coefficient(alpha, sigma).view((-1,) + (1,) * (field.ndim - 1))  # what field i changes in x0_hat: (4)
    moved = encoder(x0_hat + shift * field, zeros).mean
    base = encoder(x0_hat, zeros)
    delta_sq = (moved - base.mean) ** 2
    # The posterior variance in the denominator: a change within the code's own uncertainty is no change,
    # and a pure ratio's gradient grows like 1 / |field| as the guidance goes to 0, which drowns out the
    # diffusion loss while the code is forming (the encoder then never leaves its zero initialisation).
    off = (delta_sq * (1 - one_hot)).sum(1) / (delta_sq.sum(1) + base.var.detach().sum(1))
    keep = (timesteps < num_train_timesteps // 2).float()
    return (off * keep).sum() / keep.sum().clamp(min=1.0)
