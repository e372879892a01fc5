"""Measurements of a trained adapter: guidance gain, active dimensions, reconstruction fidelity."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .objective import sami_loss

NOISE_BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))


def band_gains(timesteps: torch.Tensor, guided: torch.Tensor, unguided: torch.Tensor, bands=NOISE_BANDS) -> Dict[str, float]:
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
        t = ((torch.arange(start, start + n) + torch.rand(n, generator=g)) / images.shape[0] * num_train).long().clamp(max=num_train - 1)
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


def active_dimensions(kl_per_dim: Sequence[float], threshold: float = 0.1) -> list:
    """Indices of code dimensions whose data-averaged KL to the prior exceeds ``threshold`` nats.

    KL alone also counts a dimension whose posterior is narrower than the prior but ignores the
    input; :func:`informative_dimensions` (Burda et al.'s activity) checks that the mean moves.
    """
    return [i for i, v in enumerate(kl_per_dim) if v > threshold]


def informative_dimensions(mean_variance_per_dim: Sequence[float], threshold: float = 0.01) -> list:
    """Indices of dimensions whose posterior mean varies over the data: ``Var_x(E_q[z_i | x]) > threshold``
    (Burda et al. 2016's active units)."""
    return [i for i, v in enumerate(mean_variance_per_dim) if v > threshold]


def r2_score(target: np.ndarray, prediction: np.ndarray) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (may be negative)."""
    target, prediction = np.asarray(target, float), np.asarray(prediction, float)
    ss_tot = ((target - target.mean()) ** 2).sum()
    return float(1 - ((target - prediction) ** 2).sum() / max(ss_tot, 1e-12))


def linear_r2(codes: np.ndarray, targets: np.ndarray) -> list:
    """Per-target R² of an ordinary least-squares fit (with intercept) from ``codes``, in-sample."""
    x = np.concatenate([codes, np.ones((codes.shape[0], 1))], axis=1)
    out = []
    for k in range(targets.shape[1]):
        coef, *_ = np.linalg.lstsq(x, targets[:, k], rcond=None)
        out.append(r2_score(targets[:, k], x @ coef))
    return out


@torch.no_grad()
def disk_reconstruction_r2(
    pipe, images: torch.Tensor, num_inference_steps: int = 50, batch_size: int = 128, seed: int = 0, eta: float = 1.0,
    sami_scale: float = 1.0,
) -> Dict[str, object]:
    """Reconstruct disks from ``z = mean q(z | x_0)`` and compare image moments with the inputs'.

    x, y, radius and brightness are measured by :func:`sami_adapter.data.disk_moments` on both the
    input and its reconstruction; the score per factor is R² of reconstruction against input.
    ``eta = 1`` (stochastic DDIM) is the default: its fresh noise corrects the step errors that a
    sharp posterior's strong guidance causes in the deterministic ODE. ``sami_scale`` multiplies the
    posterior score (1 = the Bayes-exact decoder ``p(x | z)``; above 1 decodes from a sharpened
    ``q(z | x_t)^w``, as classifier guidance does).
    """
    from .data.disks import disk_moments

    recon = []
    for start in range(0, images.shape[0], batch_size):
        x0 = images[start : start + batch_size]
        g = torch.Generator().manual_seed(seed + start)
        recon.append(pipe.reconstruct(x0, num_inference_steps=num_inference_steps, eta=eta, generator=g, output_type="pt",
                                    sami_scale=sami_scale).images.cpu())
    recon = torch.cat(recon)
    true_m, rec_m = disk_moments(images.cpu()), disk_moments(recon)
    scores = {name: r2_score(true_m[name].numpy(), rec_m[name].numpy()) for name in ("x", "y", "radius", "brightness")}
    return {"r2": scores, "reconstructions": recon}
