"""The metrics of any representation, SAMI's or a baseline's, measured the same way: disentanglement scores
on fresh labelled samples, trajectory curvature, and the rate study's rate and generative measurements.

Every representation enters as an ``encode_fn`` (images (N, C, H, W) in [-1, 1] -> codes (N, D));
:func:`mean_code_fn` builds one from any model with ``encode``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch

from .data.base import FactorDataset
from .data.moving_disks import MovingDisks
from .encoder import ACTIVE_KL_NATS
from .evaluation import disk_reconstruction_r2, guidance_gain
from .images import model_from_unit, unit_from_model
from .metrics import dci, explicitness, factor_alignment, factor_vae_score, linear_r2, mig_per_factor, modularity, sap, trajectory_curvature


EncodeFn = Callable[[torch.Tensor], Union[torch.Tensor, np.ndarray]]


def mean_code_fn(model: Any) -> EncodeFn:
    """``images -> model.encode(images).mean`` on the CPU (no gradient), for any model with ``encode``."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode(unit_from_model(images)).mean.detach().float().cpu()

    return encode


def encode_codes(encode_fn: EncodeFn, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """``encode_fn`` over ``images`` in batches, as one float64 (N, D) array."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        codes = encode_fn(images[start : start + batch_size])
        if isinstance(codes, torch.Tensor):
            codes = codes.detach().cpu().numpy()
        out.append(np.asarray(codes, dtype=np.float64))
    codes = np.concatenate(out)
    if codes.ndim != 2 or codes.shape[0] != images.shape[0]:
        raise ValueError(f"encode_fn must return (N, D) codes, got {codes.shape} for {images.shape[0]} images.")
    return codes


def representation_metrics(
    encode_fn: EncodeFn, dataset: FactorDataset, num_train: int = 2000, num_test: int = 1000, seed: int = 0, batch_size: int = 256,
    num_bins: int = 20, dci_max_train: Optional[int] = None, dci_estimators: Optional[int] = None, factor_vae_train: int = 500,
    factor_vae_eval: int = 300, factor_vae_batch: int = 64, num_variance_estimate: int = 2000,
) -> Dict[str, Any]:
    """The disentanglement metrics of one representation on fresh labelled samples of ``dataset``.

    Training and test observations are drawn with ``dataset.sample`` from seeds ``[seed, 1]`` and
    ``[seed, 2]`` (the same images for every representation given the same seed); the FactorVAE
    score draws its own fixed-factor batches from ``seed``.

    * ``mig``, ``modularity``: on the training codes and factor indices (``num_bins`` bins);
    * ``dci``: gradient-boosted classifiers fit on train, informativeness on train and test;
    * ``sap`` (discrete factors), ``explicitness``: fit on train, scored on test;
    * ``factor_vae``: :func:`~sami_adapter.metrics.factor_vae_score` (train/eval accuracy);
    * ``linear_r2``: per factor, R² of an in-sample least-squares fit of the continuous factor value
      from the codes (training set);
    * ``alignment``: :func:`~sami_adapter.metrics.factor_alignment` (|Spearman|) on the test set;
    * ``code_std``: per-dimension standard deviation of the training codes.

    Args:
        encode_fn: images (N, C, H, W) in [-1, 1] -> codes (N, D).
        dataset: a :class:`~sami_adapter.data.FactorDataset` (``disks``, ``dsprites``).
        num_train, num_test: observations for fitting and for scoring (disentanglement_lib: 10000/5000).
        seed: seed of every draw.
        batch_size: images per ``encode_fn`` call.
        num_bins: histogram bins of MIG and modularity.
        dci_max_train: fit DCI's classifiers on at most this many training samples (speed).
        dci_estimators: ``n_estimators`` of DCI's gradient boosting (sklearn default 100).
        factor_vae_train, factor_vae_eval, factor_vae_batch, num_variance_estimate: FactorVAE
            votes, batch size and global-variance sample (disentanglement_lib: 10000, 5000, 64, 10000).

    Returns:
        dict with the entries above plus ``latent_dim``, ``factor_names``, ``num_train``,
        ``num_test`` and ``seconds`` (time per metric).
    """
    seconds: Dict[str, float] = {}
    clock = time.perf_counter()
    x_train, f_train, v_train = dataset.sample(num_train, np.random.default_rng([seed, 1]))
    x_test, f_test, v_test = dataset.sample(num_test, np.random.default_rng([seed, 2]))
    c_train = encode_codes(encode_fn, x_train, batch_size)
    c_test = encode_codes(encode_fn, x_test, batch_size)
    seconds["encode"] = time.perf_counter() - clock
    names = list(dataset.factor_names)
    out: Dict[str, Any] = {"latent_dim": int(c_train.shape[1]), "factor_names": names, "num_train": num_train, "num_test": num_test}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - start
        return value

    out["mig_per_factor"] = dict(zip(names, timed("mig", lambda: mig_per_factor(c_train, f_train, num_bins=num_bins)).tolist()))
    out["mig"] = float(np.nanmean(list(out["mig_per_factor"].values())))
    gbt = {"n_estimators": dci_estimators} if dci_estimators else None
    out["dci"] = timed("dci", lambda: dci(c_train, f_train, c_test, f_test, seed=seed, max_train_samples=dci_max_train, gbt_params=gbt))
    out["sap"] = timed("sap", lambda: sap(c_train, f_train, c_test, f_test))
    out["modularity"] = timed("modularity", lambda: modularity(c_train, f_train, num_bins=num_bins))
    out["explicitness"] = timed("explicitness", lambda: explicitness(c_train, f_train, c_test, f_test))
    out["factor_vae"] = timed(
        "factor_vae",
        lambda: factor_vae_score(
            lambda images: encode_codes(encode_fn, images, batch_size), dataset, num_train=factor_vae_train, num_eval=factor_vae_eval,
            batch_size=factor_vae_batch, num_variance_estimate=num_variance_estimate, seed=seed,
        ),
    )
    out["linear_r2"] = dict(zip(names, linear_r2(c_train, v_train)))
    alignment = factor_alignment(c_test, v_test, names)
    out["alignment"] = {"matrix": alignment["matrix"], "best_factor": alignment["best_factor"], "best_score": alignment["best_score"],
                        "method": alignment["method"]}
    out["code_std"] = c_train.std(axis=0, ddof=1)
    out["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return out


def trajectory_curvatures(
    encode_fn: EncodeFn,
    moving_disks: MovingDisks,
    batch_size: int = 256,
) -> Dict[str, Any]:
    """Mean turning angle (degrees, :func:`~sami_adapter.metrics.trajectory_curvature`) of every video of ``moving_disks``.

    * ``latent``: the codes of the frames (``encode_fn`` per frame);
    * ``pixels``: the frames themselves (flattened);
    * ``factors``: the ground-truth path in (x, y, radius) pixel units, the reference a perfectly
      straightening representation of the factors would reach.
    """
    videos, values = moving_disks.arrays()
    n, t = videos.shape[:2]
    frames = torch.from_numpy(videos.reshape(n * t, *videos.shape[2:]))
    codes = encode_codes(encode_fn, frames, batch_size).reshape(n, t, -1)
    return {
        "latent": trajectory_curvature(codes),
        "pixels": trajectory_curvature(videos),
        "factors": trajectory_curvature(values[..., :3]),
        "num_sequences": int(n),
        "num_frames": int(t),
    }


@torch.no_grad()
def rate_study_measurements(
    model: Any, dataset: FactorDataset, num_images: int = 4096, num_prior_samples: int = 512, num_inference_steps: int = 50,
    batch_size: int = 256, kl_threshold: float = ACTIVE_KL_NATS, seed: int = 0,
) -> Dict[str, Any]:
    """Rate and generative measurements of one model (a :class:`~sami_adapter.SAMIPipeline` or a
    baseline: the same ``encode``, ``reconstruct`` and generation calls), the same way for every method.

    * ``information_lower`` / ``information_upper``: :func:`~sami_adapter.rate.mixture_information`
      (at most ``log N``) and :func:`~sami_adapter.rate.information_upper_bound` on ``N = num_images``
      held-out images, in nats; ``kl``: the data-mean KL of ``q(z | x)``, also per dimension;
    * ``prior_clean_fraction`` (disks, background_disks): share of clean one-disk images among decodes of
      ``z ~ N(0, I)`` (diffusion decoders: DDIM with ``num_inference_steps`` steps, eta 1);
    * ``reconstruction_r2`` (disks, background_disks): R² of each factor measured on the image
      (:func:`disk_moment_r2`), input vs decode of the posterior mean (SAMI: the exact decoder, eta 1), on
      at most 512 images; ``reconstruction_mse``: their mean squared pixel error (the SAMI paper's
      measure), pixels in [-1, 1]. SAMI's guidance gain on the same images: :func:`rate_study_guidance_gain`.
    """
    from .data import BackgroundDisks, Disks, clean_background_disk_fraction, clean_disk_fraction
    from .encoder import LatentPosterior
    from .rate import information_upper_bound, mixture_information

    images = rate_study_images(dataset, num_images, seed)
    means, logvars = [], []
    for start in range(0, images.shape[0], batch_size):
        post = model.encode(unit_from_model(images[start:start + batch_size].to(model.device)))
        means.append(post.mean.float().cpu())
        logvars.append(post.logvar.float().cpu())
    mean, logvar = torch.cat(means).double(), torch.cat(logvars).double()
    kl_per_dim = LatentPosterior(torch.cat([mean, logvar], dim=-1)).kl_per_dim().mean(0)
    out: Dict[str, Any] = {
        "rate_images": int(images.shape[0]),
        "information_lower": mixture_information(mean, logvar, torch.Generator().manual_seed(seed)),
        "information_upper": float(information_upper_bound(mean, logvar)),
        "kl": float(kl_per_dim.sum()),
        "kl_per_dim": [float(v) for v in kl_per_dim],
        "active_dims": int((kl_per_dim > kl_threshold).sum()),
    }
    held_out = images[: min(512, images.shape[0])]
    if isinstance(dataset, (Disks, BackgroundDisks)):
        name, clean_check = ("disks", clean_disk_fraction) if isinstance(dataset, Disks) else ("background_disks", clean_background_disk_fraction)
        g = torch.Generator().manual_seed(seed)
        samples = torch.cat([
            model_from_unit(model(batch_size=min(256, num_prior_samples - start), num_inference_steps=num_inference_steps, eta=1.0,
                                  generator=g, output_type="pt").images.cpu())
            for start in range(0, num_prior_samples, 256)
        ])
        decoded = disk_reconstruction_r2(model, held_out.to(model.device), num_inference_steps=num_inference_steps, seed=seed, eta=1.0,
                                         dataset=name)
        out["prior_clean_fraction"] = clean_check(samples)[0]
        out["reconstruction_r2"] = {k: float(v) for k, v in decoded["r2"].items()}
        decoded = decoded["reconstructions"]
        out["reconstruction_mse"] = float(((decoded.float() - held_out.float()) ** 2).mean())
    return out


def rate_study_images(dataset: FactorDataset, num_images: int = 4096, seed: int = 0) -> torch.Tensor:
    """The rate study's held-out images (N, C, H, W) in [-1, 1]: the same draw for every model."""
    return dataset.sample(num_images, np.random.default_rng([seed, 5]))[0]


def rate_study_guidance_gain(pipe: Any, dataset: FactorDataset, num_images: int = 4096, seed: int = 0) -> float:
    """A SAMI pipeline's relative guided-vs-unguided denoising gain on the first 512 rate-study images."""
    held_out = rate_study_images(dataset, num_images, seed)[:512]
    return guidance_gain(pipe.unet, pipe.encoder, pipe.scheduler, held_out.to(pipe.device), seed=seed)["relative_gain"]
