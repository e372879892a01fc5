"""Measurements of a trained adapter on tensors: guidance gain, active dimensions, reconstruction
fidelity and the ELBO in bits per dimension.

The noise-level side (information profiles, characteristic noise levels, each factor's own noise
scale, the mechanism table, axis discovery) is :mod:`sami_adapter.noise_levels`; the metrics of a
representation and the rate study's measurements are :mod:`sami_adapter.representation`;
array-level scores live in :mod:`sami_adapter.metrics`, and :mod:`sami_adapter.report` writes the
results out.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .encoder import ACTIVE_KL_NATS
from .images import model_from_unit, unit_from_model
from .metrics.linear_r2 import r2_score
from .objective import elbo_constant, sami_loss


# The timestep bands the guidance gain is reported in (not the guidance bands of ``SAMIEncoder(guidance_bands=...)``).
GAIN_BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))


def band_gains(timesteps: torch.Tensor, guided: torch.Tensor, unguided: torch.Tensor, bands=GAIN_BANDS) -> Dict[str, float]:
    """Relative guidance gain ``1 - guided / unguided`` of summed errors within each timestep band."""
    out = {}
    for lo, hi in bands:
        mask = (timesteps >= lo) & (timesteps < hi)
        if mask.any():
            out[f"{lo}-{hi}"] = float(1.0 - guided[mask].sum() / unguided[mask].sum().clamp(min=1e-12))
    return out


@torch.no_grad()
def guidance_gain(
    unet,
    encoder,
    scheduler,
    images: torch.Tensor,
    batch_size: int = 128,
    seed: int = 0,
    weighting: str = "simple",
    unet_kwargs: Optional[dict] = None,
) -> Dict[str, object]:
    """Guided vs unguided denoising error on ``images`` with the same noise and timesteps.

    Timesteps are stratified over [0, T) so every noise level is covered equally. Returns the mean
    guided and unguided errors (per image, summed over pixels), the absolute gain
    ``unguided - guided``, the relative gain ``1 - guided / unguided``, the gain per noise band, and
    the batch-mean KL per code dimension of ``q(z | x_0)``.
    """
    g = torch.Generator().manual_seed(seed)
    num_train = scheduler.alphas_cumprod.shape[0]
    device = images.device
    guided, unguided, steps, kls, means = [], [], [], [], []
    for start in range(0, images.shape[0], batch_size):
        x0 = images[start : start + batch_size]
        n = x0.shape[0]
        t = stratified_timesteps(torch.arange(start, start + n), torch.rand(n, generator=g), images.shape[0], num_train)
        kwargs = {k: v.expand(n, *v.shape[1:]) for k, v in (unet_kwargs or {}).items()}
        out = sami_loss(unet, encoder, scheduler, x0, beta=0.0, weighting=weighting, generator=g, timesteps=t.to(device), unet_kwargs=kwargs)
        guided.append(out.guided_error.cpu())
        unguided.append(out.unguided_error.cpu())
        steps.append(t)
        kls.append(out.kl_per_dim.cpu() * n)
        means.append(encoder(x0, torch.zeros(n, dtype=torch.long, device=device)).mean.float().cpu())
    guided_all, unguided_all, t_all = torch.cat(guided), torch.cat(unguided), torch.cat(steps)
    kl_per_dim = torch.stack(kls).sum(0) / images.shape[0]
    return {
        "guided_loss": float(guided_all.mean()),
        "unguided_loss": float(unguided_all.mean()),
        "gain": float(unguided_all.mean() - guided_all.mean()),
        "relative_gain": float(1 - guided_all.sum() / unguided_all.sum()),
        "band_gain": band_gains(t_all, guided_all, unguided_all),
        "kl_per_dim": [float(v) for v in kl_per_dim],
        "mean_variance_per_dim": [float(v) for v in torch.cat(means).var(dim=0)],
    }


def active_dimensions(kl_per_dim: Sequence[float], threshold: float = ACTIVE_KL_NATS) -> list:
    """Indices of code dimensions whose data-averaged KL to the prior exceeds ``threshold`` nats.

    KL alone also counts a dimension whose posterior is narrower than the prior but ignores the
    input; :func:`informative_dimensions` (Burda et al.'s activity) checks that the mean moves.
    """
    return [i for i, v in enumerate(kl_per_dim) if v > threshold]


def informative_dimensions(mean_variance_per_dim: Sequence[float], threshold: float = 0.01) -> list:
    """Indices of dimensions whose posterior mean varies over the data: ``Var_x(E_q[z_i | x]) > threshold``
    (Burda et al. 2016's active units)."""
    return [i for i, v in enumerate(mean_variance_per_dim) if v > threshold]


def stratified_timesteps(slots: torch.Tensor, offsets: torch.Tensor, num_slots: int, num_train_timesteps: int) -> torch.Tensor:
    """``floor((slot + offset) / num_slots * T)``: one timestep in each of ``num_slots`` equal slices of [0, T), at the
    ``offsets`` (uniform in [0, 1)) within them, so every noise level is covered equally."""
    return ((slots + offsets) / num_slots * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


@torch.no_grad()
def reconstructions(model: Any, images: torch.Tensor, num_inference_steps: int = 50, eta: float = 1.0, seed: int = 0,
                    batch_size: Optional[int] = None, **decode_kwargs) -> torch.Tensor:
    """Decodes of ``z = mean q(z | x_0)`` of ``images`` (N, C, H, W) in [-1, 1], on the CPU.

    ``model``: a :class:`~sami_adapter.SAMIPipeline` or a baseline (the same ``reconstruct``);
    ``decode_kwargs`` go to ``reconstruct`` (a pipeline's ``sami_scale``). Images are decoded in
    batches of ``batch_size`` (default: all at once), the batch starting at image ``k`` with noise from ``seed + k``.
    """
    step = batch_size or images.shape[0]
    out = []
    for start in range(0, images.shape[0], step):
        generator = torch.Generator().manual_seed(seed + start)
        decoded = model.reconstruct(unit_from_model(images[start : start + step]), num_inference_steps=num_inference_steps, eta=eta,
                                    generator=generator, output_type="pt", **decode_kwargs)
        out.append(model_from_unit(decoded.images.cpu()))
    return torch.cat(out)


@torch.no_grad()
def disk_reconstruction_r2(
    model, images: torch.Tensor, num_inference_steps: int = 50, batch_size: int = 128, seed: int = 0, eta: float = 1.0,
    dataset: str = "disks", **decode_kwargs,
) -> Dict[str, object]:
    """Reconstruct disks from ``z = mean q(z | x_0)`` and compare the measured factors with the inputs'.

    ``model``: anything with ``reconstruct`` (a :class:`~sami_adapter.SAMIPipeline` or a baseline).
    The factors are measured on both the input and its reconstruction (:func:`disk_moment_r2`, by
    ``dataset``); the score per factor is R² of reconstruction against input.
    ``eta = 1`` (stochastic DDIM) is the default: its fresh noise corrects the step errors that a
    sharp posterior's strong guidance causes in the deterministic ODE. ``decode_kwargs`` go to
    ``reconstruct``: a pipeline's ``sami_scale`` multiplies the posterior score (1, its default, is the
    Bayes-exact decoder ``p(x | z)``; above 1 decodes from a sharpened ``q(z | x_t)^w``, as classifier
    guidance does).
    """
    recon = reconstructions(model, images, num_inference_steps, eta, seed, batch_size, **decode_kwargs)
    return {"r2": disk_moment_r2(images, recon, dataset), "reconstructions": recon}


DISK_DATASETS = ("disks", "background_disks")


def disk_moment_r2(images: torch.Tensor, reconstructions: torch.Tensor, dataset: str = "disks") -> Dict[str, float]:
    """R² of each factor measured on the reconstructions against the inputs.

    ``disks``: x, y, radius, brightness from :func:`sami_adapter.data.disk_moments`;
    ``background_disks``: x, y, background from :func:`sami_adapter.data.background_disk_fit`.
    """
    from .data import background_disk_fit, disk_moments

    if dataset not in DISK_DATASETS:
        raise ValueError(f"dataset must be one of {DISK_DATASETS} (the sets whose factors can be measured on an image), got {dataset!r}.")
    measure, names = (disk_moments, ("x", "y", "radius", "brightness")) if dataset == "disks" else (background_disk_fit, ("x", "y", "background"))
    true_m, rec_m = measure(images.cpu()), measure(reconstructions.cpu())
    return {name: r2_score(true_m[name].numpy(), rec_m[name].numpy()) for name in names}


@torch.no_grad()
def elbo_bits_per_dim(
    pipe: Any,
    images: torch.Tensor,
    timesteps_per_image: int = 8,
    seed: int = 0,
    batch_size: int = 256,
) -> Dict[str, float]:
    """The SAMI ELBO of a pixel-space pipeline, in bits per dimension (and the unguided base model's).

    Each image gets ``timesteps_per_image`` stratified timesteps (one per equal slice of [0, T), at a
    random offset) and one ``z ~ q(z | x_0)`` per draw; each draw of
    :func:`~sami_adapter.objective.sami_loss` with ``weighting="elbo"``, ``beta = 1`` is an unbiased
    estimate of the full negative bound ``-ELBO = E_q[sum_i L_i] + KL + const`` (nats), and the
    estimates of one image are averaged. ``bpd = mean(-ELBO) / (D ln 2)`` with ``D = C H W``.

    The pixels are continuous values in [-1, 1], so this is a *continuous-density* bpd (it can be
    negative and is not comparable with the discrete 8-bit bpd of image benchmarks, which would
    add about ``log2(127.5) = 7`` bits for data quantised to 256 levels and rescaled to [-1, 1]).

    Returns:
        dict with ``bpd`` (SAMI bound), ``bpd_stderr`` (standard error over images),
        ``unguided_bpd`` (the same noise and timesteps with the guidance off and no KL: the base
        model's own bound), ``kl_nats`` (mean KL per image), ``nats_per_image``, ``num_images``,
        ``timesteps_per_image``, ``num_pixels``.
    """
    from diffusers import DDPMScheduler

    if getattr(pipe, "is_latent", False) or getattr(pipe, "is_text_conditioned", False):
        raise ValueError("elbo_bits_per_dim supports unconditional pixel-space pipelines only.")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_train = scheduler.config.num_train_timesteps
    x0_all = pipe.preprocess(unit_from_model(images))
    s = int(timesteps_per_image)
    if s < 1:
        raise ValueError(f"timesteps_per_image must be >= 1, got {s}.")
    g = torch.Generator().manual_seed(seed)
    chunk = max(1, batch_size // s)
    guided, unguided, kls = [], [], []
    for start in range(0, x0_all.shape[0], chunk):
        x0 = x0_all[start : start + chunk]
        b = x0.shape[0]
        offsets = torch.rand(s, b, generator=g)
        t = stratified_timesteps(torch.arange(s).view(s, 1), offsets, s, num_train).flatten()
        x = x0.repeat(s, 1, 1, 1)
        out = sami_loss(pipe.unet, pipe.encoder, scheduler, x, beta=1.0, weighting="elbo", generator=g, timesteps=t.to(x.device))
        constant = elbo_constant(scheduler, x).float()
        guided.append(out.negative_elbo.cpu().double().view(s, b).mean(0))
        unguided.append((out.unguided_error + constant).cpu().double().view(s, b).mean(0))
        kls.append(float(out.kl) * b)
    guided_all, unguided_all = torch.cat(guided), torch.cat(unguided)
    kl = sum(kls) / guided_all.numel()
    num_pixels = int(np.prod(x0_all.shape[1:]))
    scale = 1.0 / (num_pixels * math.log(2.0))
    n = guided_all.numel()
    return {
        "bpd": float(guided_all.mean() * scale),
        "bpd_stderr": float(guided_all.std() / math.sqrt(n) * scale) if n > 1 else float("nan"),
        "unguided_bpd": float(unguided_all.mean() * scale),
        "kl_nats": kl,
        "nats_per_image": float(guided_all.mean()),
        "num_images": int(n),
        "timesteps_per_image": s,
        "num_pixels": num_pixels,
    }
