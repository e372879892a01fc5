"""The evaluation harness shared by ``examples/evaluate.py`` and ``examples/compare.py``.

Every representation, SAMI's or a baseline's, enters as an ``encode_fn``: images (N, C, H, W) in
[-1, 1] -> codes (N, D). :func:`mean_code_fn` builds one from anything with
``encode(images) -> posterior`` (a :class:`~sami_adapter.SAMIPipeline`, a
:class:`~sami_adapter.baselines.BetaVAE`, a :class:`~sami_adapter.baselines.DiffAE`): the posterior
mean is the representation, as in disentanglement_lib's evaluations.

* :func:`representation_metrics`: MIG, DCI, SAP, modularity, explicitness, FactorVAE score,
  per-factor linear R² and the factor alignment, on fresh labelled samples of a dataset.
* :func:`trajectory_curvatures`: mean turning angle of ``moving_disks`` videos in code space,
  in pixel space and in ground-truth factor space.
* :func:`elbo_bits_per_dim`: the SAMI bound of a pipeline in bits per dimension.
* :func:`flat_metrics` / :func:`metrics_table_markdown`: one table, one column per model (mean ±
  std over seeds when a column holds several runs).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .analysis import factor_alignment, to_jsonable
from .data.base import FactorDataset
from .data.moving_disks import MovingDisks
from .evaluation import active_dimensions, disk_reconstruction_r2, guidance_gain, informative_dimensions, linear_r2
from .metrics import dci, explicitness, factor_vae_score, mig, modularity, sap, trajectory_curvature
from .utils import save_image_grid

COUNT_ROWS = ("training steps", "training seconds")  # table rows shown as whole numbers
EncodeFn = Callable[[torch.Tensor], Union[torch.Tensor, np.ndarray]]


def mean_code_fn(model: Any) -> EncodeFn:
    """``images -> model.encode(images).mean`` on the CPU (no gradient), for any model with ``encode``."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode(images).mean.detach().float().cpu()

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
    encode_fn: EncodeFn,
    dataset: FactorDataset,
    num_train: int = 2000,
    num_test: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    num_bins: int = 20,
    dci_max_train: Optional[int] = None,
    dci_estimators: Optional[int] = None,
    factor_vae_train: int = 500,
    factor_vae_eval: int = 300,
    factor_vae_batch: int = 64,
    num_variance_estimate: int = 2000,
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
    * ``alignment``: :func:`~sami_adapter.analysis.factor_alignment` (|Spearman|) on the test set;
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

    out["mig"] = timed("mig", lambda: mig(c_train, f_train, num_bins=num_bins))
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

    from .objective import elbo_constant, sami_loss

    if getattr(pipe, "is_latent", False) or getattr(pipe, "is_text_conditioned", False):
        raise ValueError("elbo_bits_per_dim supports unconditional pixel-space pipelines only.")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_train = scheduler.config.num_train_timesteps
    x0_all = pipe.preprocess(images)
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
        t = ((torch.arange(s).view(s, 1) + offsets) / s * num_train).long().clamp(max=num_train - 1).flatten()
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


# ---------------------------------------------------------------------------------------- tables
def flat_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    """One row label -> value per scalar of a :func:`representation_metrics` result (plus
    ``trajectories`` and ``elbo`` entries when present), in table order."""
    rows: Dict[str, float] = {}
    if "mig" in result:
        rows["MIG"] = result["mig"]
        rows["DCI disentanglement"] = result["dci"]["disentanglement"]
        rows["DCI completeness"] = result["dci"]["completeness"]
        rows["DCI informativeness (test acc.)"] = result["dci"]["informativeness_test"]
        rows["SAP"] = result["sap"]
        rows["modularity"] = result["modularity"]
        rows["explicitness (test AUC)"] = result["explicitness"]
        rows["FactorVAE score (eval acc.)"] = result["factor_vae"]["eval_accuracy"]
        for name, value in result["linear_r2"].items():
            rows[f"linear R² {name}"] = value
    traj = result.get("trajectories")
    if traj:
        rows["trajectory curvature, latent (deg)"] = traj["latent"]
        rows["trajectory curvature, pixels (deg)"] = traj["pixels"]
    elbo = result.get("elbo")
    if elbo:
        rows["ELBO (bits/dim, continuous)"] = elbo["bpd"]
    training = result.get("training")
    if training:
        rows[COUNT_ROWS[0]] = training.get("steps", float("nan"))
        rows[COUNT_ROWS[1]] = training.get("seconds", float("nan"))
    return {k: float(v) if v is not None else float("nan") for k, v in rows.items()}


def aggregate(runs: Sequence[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Mean, standard deviation (ddof=0) and count of each row over several runs (NaNs ignored)."""
    keys: List[str] = []
    for run in runs:
        keys += [k for k in run if k not in keys]
    out = {}
    for key in keys:
        values = np.array([run.get(key, np.nan) for run in runs], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[key] = {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std()) if finite.size else float("nan"),
            "n": int(finite.size),
        }
    return out


def _cell(stat: Optional[Dict[str, float]], count: bool = False) -> str:
    if stat is None or not math.isfinite(stat["mean"]):
        return "–"
    mean = stat["mean"]
    spec = ".0f" if abs(mean) >= 100 or count else ".3f"
    if stat["n"] > 1:
        return f"{mean:{spec}} ± {stat['std']:{spec}}"
    return f"{mean:{spec}}"


def metrics_table_markdown(columns: Dict[str, Union[Dict[str, float], Sequence[Dict[str, float]]]]) -> str:
    """A Markdown table with one column per model and one row per metric.

    Args:
        columns: model name -> :func:`flat_metrics` dict, or a list of them (several seeds; cells
            then show ``mean ± std``).
    """
    stats = {name: aggregate(runs if isinstance(runs, (list, tuple)) else [runs]) for name, runs in columns.items()}
    rows: List[str] = []
    for per_model in stats.values():
        rows += [r for r in per_model if r not in rows]
    lines = ["| metric | " + " | ".join(stats) + " |", "|---|" + "---|" * len(stats)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(_cell(per_model.get(row), row in COUNT_ROWS) for per_model in stats.values()) + " |")
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> str:
    """Write ``obj`` as strict JSON (:func:`~sami_adapter.analysis.to_jsonable`: arrays as lists, inf/NaN as null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
    return path


# ---------------------------------------------------------------------------------------- training report
def write_report(
    pipe: Any,
    images: torch.Tensor,
    report_dir: str,
    noise_scheduler: Any,
    seed: int = 0,
    num_inference_steps: int = 50,
    eta: float = 1.0,
    sami_scale: float = 1.0,
    disk_factors: bool = False,
) -> Dict[str, object]:
    """Held-out measurements and pictures of a trained adapter: report.json, report.md and PNGs.

    Args:
        pipe: the :class:`~sami_adapter.SAMIPipeline` of the adapter.
        images: (N, C, H, W) held-out images in [-1, 1].
        report_dir: output folder (created).
        noise_scheduler: the training scheduler (``betas``, ``alphas_cumprod``) of the guidance gain.
        seed: seed of the noise, timesteps and sampling.
        num_inference_steps: DDIM steps of reconstructions and traversals.
        eta: DDIM eta of reconstructions (traversals use 0, so a row shares its randomness).
        sami_scale: when not 1, reconstructions are also measured and drawn at this scale.
        disk_factors: the images are ``disks``: measure reconstruction R² of their moments.
    """
    os.makedirs(report_dir, exist_ok=True)
    model_inputs = pipe.preprocess(images)  # VAE latents for latent diffusion, the images otherwise
    unet_kwargs = {}
    if pipe.is_text_conditioned:
        unet_kwargs = {"encoder_hidden_states": pipe.encode_prompt(batch_size=1)[0]}
    gains = guidance_gain(pipe.unet, pipe.encoder, noise_scheduler, model_inputs, seed=seed, unet_kwargs=unet_kwargs)
    kl = gains.pop("kl_per_dim")
    mean_variance = gains.pop("mean_variance_per_dim")
    order = sorted(range(len(kl)), key=lambda i: -kl[i])
    active = active_dimensions(kl)
    report: Dict[str, object] = {
        "guided_loss": round(gains["guided_loss"], 3),
        "unguided_loss": round(gains["unguided_loss"], 3),
        "relative_guidance_gain": round(gains["relative_gain"], 4),
        "band_gain": {k: round(v, 4) for k, v in gains["band_gain"].items()},
        "kl_per_dim": [round(v, 3) for v in kl],
        "active_dims": len(active),
        "informative_dims": len(informative_dimensions(mean_variance)),
        "mean_variance_per_dim": [round(v, 3) for v in mean_variance],
    }
    n_show = min(8, images.shape[0])
    if disk_factors:
        rec = disk_reconstruction_r2(pipe, images, num_inference_steps=num_inference_steps, seed=seed, eta=eta)
        report["reconstruction_r2"] = {k: round(v, 3) for k, v in rec["r2"].items()}
        recon = rec["reconstructions"][:n_show]
        if sami_scale != 1.0:  # also decode with sharpened guidance (same noise): the exact decoder's spread vs its modes
            rec = disk_reconstruction_r2(pipe, images, num_inference_steps=num_inference_steps, seed=seed, eta=eta, sami_scale=sami_scale)
            report["reconstruction_sami_scale"] = sami_scale
            report["reconstruction_r2_scaled"] = {k: round(v, 3) for k, v in rec["r2"].items()}
            recon = torch.cat([recon, rec["reconstructions"][:n_show]])
    else:
        recon = pipe.reconstruct(images[:n_show], num_inference_steps=num_inference_steps, eta=eta, generator=torch.Generator().manual_seed(seed), output_type="pt").images.cpu()
    save_image_grid(torch.cat([images[:n_show].cpu(), recon]), os.path.join(report_dir, "reconstructions.png"), nrow=n_show, scale=4)
    values = torch.linspace(-2.5, 2.5, 9).tolist()
    rows = []
    for d in (order[: max(len(active), 1)]):
        g = torch.Generator().manual_seed(seed)
        # eta = 0: a traversal must share all randomness across its row, so only the code changes
        rows.append(pipe.traverse(images[:1], d, values, num_inference_steps=num_inference_steps, eta=0.0, generator=g, output_type="pt").images.cpu())
    save_image_grid(torch.cat(rows), os.path.join(report_dir, "traversals.png"), nrow=len(values), scale=4)
    with open(os.path.join(report_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [
        "# SAMI adapter report", "",
        f"Held-out images: {images.shape[0]}. Guided vs unguided denoising error (same noise, stratified timesteps):",
        f"{report['guided_loss']} vs {report['unguided_loss']} (relative gain {report['relative_guidance_gain']:.1%}).", "",
        "| noise band (t) | " + " | ".join(report["band_gain"]) + " |", "|---" * (len(report["band_gain"]) + 1) + "|",
        "| guidance gain | " + " | ".join(f"{v:.1%}" for v in report["band_gain"].values()) + " |", "",
        f"Active dimensions (KL > 0.1 nats): {len(active)} of {len(kl)}. KL per dimension: {report['kl_per_dim']}", "",
        f"Informative dimensions (Var_x of the posterior mean > 0.01): {report['informative_dims']}. "
        f"Variance of the mean per dimension: {report['mean_variance_per_dim']}", "",
    ]
    if "reconstruction_r2" in report:
        names = list(report["reconstruction_r2"])
        lines += ["Reconstruction R² from z = posterior mean (image moments of input vs reconstruction):", "",
                  "| sami_scale | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  "| 1 (exact) | " + " | ".join(f"{v:.3f}" for v in report["reconstruction_r2"].values()) + " |"]
        if "reconstruction_r2_scaled" in report:
            lines += [f"| {report['reconstruction_sami_scale']:g} | " + " | ".join(f"{v:.3f}" for v in report["reconstruction_r2_scaled"].values()) + " |"]
        lines += [""]
    rows_text = "Top row inputs, then reconstructions" + (
        f" at sami_scale 1 and {report['reconstruction_sami_scale']:g}." if "reconstruction_r2_scaled" in report else ".")
    lines += ["![reconstructions](reconstructions.png)", "", rows_text, "",
              "![traversals](traversals.png)", "", f"One row per active dimension (by KL), values {values[0]} to {values[-1]}.", ""]
    with open(os.path.join(report_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return report
