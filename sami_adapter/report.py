"""The evaluation harness: runs the measurements of :mod:`sami_adapter.evaluation` and the scores of
:mod:`sami_adapter.metrics`, and writes tables, JSON, plots and image grids. ``examples/finetune.py``,
``evaluate.py`` and ``compare.py`` draw every picture with the helpers here.

Every representation, SAMI's or a baseline's, enters as an ``encode_fn``: images (N, C, H, W) in
[-1, 1] -> codes (N, D). :func:`mean_code_fn` builds one from anything with
``encode(images) -> posterior`` (a :class:`~sami_adapter.SAMIPipeline`, a
:class:`~sami_adapter.baselines.BetaVAE`, a :class:`~sami_adapter.baselines.DiffAE`): the posterior
mean is the representation, as in disentanglement_lib's evaluations.

* :func:`representation_metrics`: MIG, DCI, SAP, modularity, explicitness, FactorVAE score,
  per-factor linear R² and the factor alignment, on fresh labelled samples of a dataset.
* :func:`trajectory_curvatures`: mean turning angle of ``moving_disks`` videos in code space,
  in pixel space and in ground-truth factor space.
* :func:`discover_axes` / :func:`plot_axes`: information profile, characteristic noise levels and
  factor alignment of a SAMI pipeline, and their plot.
* :func:`flat_metrics` / :func:`metrics_table_markdown`: one table, one column per model (mean ±
  std over seeds when a column holds several runs).
* :func:`reconstructions`, :func:`traversal_rows`, :func:`save_image_grid`: the pictures.
* :func:`write_report`: the end-of-training report of ``examples/finetune.py``.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .data.base import FactorDataset
from .data.moving_disks import MovingDisks
from .evaluation import (
    ACTIVE_KL_NATS,
    INFORMATION_MEASURE,
    active_dimensions,
    characteristic_noise_levels,
    disk_moment_r2,
    disk_reconstruction_r2,
    factor_dimensions,
    factor_noise_levels,
    guidance_gain,
    informative_dimensions,
    information_profile,
)
from .images import model_from_unit, unit_from_model
from .metrics import dci, explicitness, factor_alignment, factor_vae_score, linear_r2, mig_per_factor, modularity, sap, trajectory_curvature


COUNT_ROWS = ("training steps", "training seconds")  # table rows shown as whole numbers


EncodeFn = Callable[[torch.Tensor], Union[torch.Tensor, np.ndarray]]


def pipeline_input(model: Any, images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] dataset images as ``model.encode`` takes them: [0, 1] for a SAMIPipeline (diffusers'
    convention), unchanged for the baselines, which work in the UNet's [-1, 1]."""
    from .pipeline import SAMIPipeline

    return unit_from_model(images) if isinstance(model, SAMIPipeline) else images


def mean_code_fn(model: Any) -> EncodeFn:
    """``images -> model.encode(images).mean`` on the CPU (no gradient), for any model with ``encode``."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode(pipeline_input(model, images)).mean.detach().float().cpu()

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


# ---------------------------------------------------------------------------------------- axis discovery
def discover_axes(
    pipe: Any,
    images: torch.Tensor,
    factor_values: Optional[np.ndarray] = None,
    factor_names: Optional[Sequence[str]] = None,
    timesteps: Optional[Sequence[int]] = None,
    fraction: float = 0.5,
    kl_threshold: float = ACTIVE_KL_NATS,
    seed: int = 0,
    batch_size: int = 256,
) -> Dict[str, Any]:
    """The whole axis-discovery pass of a SAMI pipeline on ``images``.

    :func:`information_profile` (noise drawn from ``seed``), :func:`characteristic_noise_levels`
    (active dimensions by clean KL > ``kl_threshold``) and, with ground-truth ``factor_values``
    (N, K) and ``factor_names``, :func:`factor_alignment` of the clean posterior means and
    :func:`factor_noise_levels`.

    Returns:
        dict with ``profile``, ``levels``, ``codes`` (N, D) clean posterior means and, with factors,
        ``alignment``, ``factor_dims`` (:func:`factor_dimensions`), ``factor_noise_levels`` and ``factor_order`` (factor names by increasing level,
        unmeasured factors left out).
    """
    profile = information_profile(pipe, images, timesteps, generator=torch.Generator().manual_seed(seed), batch_size=batch_size)
    levels = characteristic_noise_levels(profile, fraction=fraction, kl_threshold=kl_threshold)
    codes = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            codes.append(pipe.encode(unit_from_model(images[start : start + batch_size])).mean.double().cpu().numpy())
    out: Dict[str, Any] = {"profile": profile, "levels": levels, "codes": np.concatenate(codes)}
    if factor_values is not None:
        names = list(factor_names) if factor_names is not None else [f"factor{k}" for k in range(np.asarray(factor_values).shape[1])]
        out["alignment"] = factor_alignment(out["codes"], factor_values, names)
        out["factor_dims"] = factor_dimensions(levels, out["alignment"])
        out["factor_noise_levels"] = factor_noise_levels(levels, out["alignment"])
        per_factor = out["factor_noise_levels"]
        out["factor_order"] = sorted((n for n in per_factor if np.isfinite(per_factor[n])), key=lambda n: per_factor[n])
    return out


def plot_axes(axes: Dict[str, Any], path: str, title: Optional[str] = None) -> str:
    """:func:`plot_information_profile` of a :func:`discover_axes` result, each dimension labelled with its
    best-matching factor and ``|corr|`` when the pass had factors."""
    alignment = axes.get("alignment")
    labels = None
    if alignment is not None:
        labels = [f"{alignment['best_factor'][i]} {alignment['best_score'][i]:.2f}" for i in range(len(alignment["best_factor"]))]
    return plot_information_profile(axes["profile"], path, axes["levels"], labels=labels, title=title)


def axes_to_json(axes: Dict[str, Any]) -> Dict[str, Any]:
    """JSON-ready summary of :func:`discover_axes` (the per-image codes are left out)."""
    out = profile_to_json(axes["profile"], axes["levels"])
    out["measure"] = INFORMATION_MEASURE
    out["active_dims"] = axes["levels"]["active"]
    if "alignment" in axes:
        out["alignment"] = {k: to_jsonable(v) for k, v in axes["alignment"].items()}
        out["factor_dims"] = to_jsonable(axes["factor_dims"])
        out["factor_noise_levels"] = to_jsonable(axes["factor_noise_levels"])
        out["factor_order"] = axes["factor_order"]
    return out


def plot_information_profile(
    profile: Dict[str, Any],
    path: str,
    levels: Optional[Dict[str, Any]] = None,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> str:
    """Plot per-dimension information against noise level and save it as a PNG at ``path``.

    Left: ``I_i(t)`` in nats. Right: ``I_i(t) / I_i(0)`` with the ``fraction`` line and each
    dimension's characteristic noise level marked (when ``levels`` is given). Active dimensions
    (``levels["active"]``) are drawn solid, the others dotted grey. The top axis shows ``s_t``.

    Args:
        profile: output of :func:`information_profile`.
        path: PNG path (folders created).
        levels: output of :func:`characteristic_noise_levels`.
        labels: optional per-dimension legend suffixes (e.g. the best-matching factor).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(profile["timesteps"], dtype=np.float64)
    info = np.asarray(profile["information"], dtype=np.float64)
    sigma = np.asarray(profile["sigma"], dtype=np.float64)
    num_dims = info.shape[1]
    active = set(levels["active"]) if levels is not None else set(active_dimensions(np.asarray(profile["kl"])[0]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10" if num_dims <= 10 else "tab20")
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = info / info[0:1]
    for i in range(num_dims):
        name = f"z{i}" + (f" ({labels[i]})" if labels is not None else "")
        style = dict(color=colors(i % colors.N), lw=1.8) if i in active else dict(color="0.6", lw=1.0, ls=":")
        axes[0].plot(t, info[:, i], label=name if i in active else None, **style)
        if i in active:
            axes[1].plot(t, relative[:, i], label=name, **style)
            if levels is not None and np.isfinite(levels["timestep"][i]):
                axes[1].plot([levels["timestep"][i]], [levels["fraction"]], "o", color=style["color"], ms=6)
    axes[0].set_ylabel("information I_i(t) (nats, Gaussian capacity)")
    axes[1].set_ylabel("I_i(t) / I_i(0)")
    if levels is not None:
        axes[1].axhline(levels["fraction"], color="k", lw=0.8, ls="--")
    finite = relative[:, sorted(active)] if active else np.zeros(1)
    finite = finite[np.isfinite(finite)]
    axes[1].set_ylim(-0.05, float(np.clip(finite.max() * 1.05, 1.15, 2.0)) if finite.size else 1.15)
    for ax in axes:
        ax.set_xlabel("timestep t")
        ax.set_xlim(t[0], t[-1])
        ax.grid(alpha=0.3)
        order = np.argsort(sigma)
        top = ax.secondary_xaxis(
            "top", functions=(lambda x: np.interp(x, t, sigma), lambda s: np.interp(s, sigma[order], t[order]))
        )
        top.set_xlabel("noise scale s_t")
    if active:
        axes[1].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mechanism(
    profile: Dict[str, Any], levels: Dict[str, Any], recoverability: Dict[str, Any], table: Dict[str, Any], path: str,
    title: Optional[str] = None,
) -> str:
    """SAMI's mechanism in one picture: each active dimension's relative information ``I_i(t) / I_i(0)``
    (solid) beside the probe R² of the factor it codes, relative to its clean value (dashed, same colour),
    with each dimension's characteristic noise level (dot) and each factor's noise scale (cross).

    Args:
        profile, levels: :func:`information_profile` and :func:`characteristic_noise_levels`.
        recoverability: :func:`factor_recoverability`.
        table: :func:`mechanism_table` (which dimension codes which factor).
        path: PNG path (folders created).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(profile["timesteps"], dtype=np.float64)
    info = np.asarray(profile["information"], dtype=np.float64)
    names = recoverability["names"]
    factor_color = {name: plt.get_cmap("tab10")(k) for k, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    styles = ["-", "-.", (0, (5, 1)), (0, (1, 1))]
    seen: Dict[str, int] = {}
    for row in table["rows"]:
        i, name = row["dim"], row["factor"]
        style = styles[seen.get(name, 0) % len(styles)]
        seen[name] = seen.get(name, 0) + 1
        with np.errstate(divide="ignore", invalid="ignore"):
            ax.plot(t, info[:, i] / info[0, i], ls=style, lw=1.8, color=factor_color[name], label=f"z{i} -> {name} ({row['rank_corr']:.2f})")
        if np.isfinite(row["t_star"]):
            ax.plot([row["t_star"]], [levels["fraction"]], "o", color=factor_color[name], ms=6)
    rt = np.asarray(recoverability["timesteps"], dtype=np.float64)
    r2 = np.asarray(recoverability["r2"], dtype=np.float64)
    scales = table.get("factor_noise_scales", {})
    for k, name in enumerate(names):
        ax.plot(rt, r2[:, k] / max(r2[0, k], 1e-12), ls="--", lw=1.2, color=factor_color[name], alpha=0.8, label=f"factor {name}: probe R²")
        if np.isfinite(scales.get(name, np.nan)):
            ax.plot([scales[name]], [levels["fraction"]], "x", color=factor_color[name], ms=9, mew=2)
    ax.axhline(levels["fraction"], color="k", lw=0.8, ls=":")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("share of the clean value")
    ax.set_xlim(t[0], t[-1])
    ax.set_ylim(-0.05, 1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    rho = table.get("spearman", float("nan"))
    ax.set_title((title + "\n" if title else "") + f"dimension level (o) vs its factor's noise scale (x): Spearman {_fmt(rho, '.2f')}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mechanism_markdown(table: Dict[str, Any]) -> str:
    """The :func:`mechanism_table` as a markdown table."""
    lines = ["| dimension | codes | rank corr | t* (dimension) | noise scale of the factor |", "|---|---|---|---|---|"]
    lines += [f"| z{r['dim']} | {r['factor']} | {r['rank_corr']:.2f} | {_fmt(r['t_star'], '.0f')} | {_fmt(r['factor_noise_scale'], '.0f')} |"
              for r in table["rows"]]
    return "\n".join(lines + ["", f"Spearman of t* against the factor's noise scale over the measured dimensions: {_fmt(table['spearman'], '.2f')}."])


def _fmt(value: float, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def profile_table_markdown(
    profile: Dict[str, Any],
    levels: Dict[str, Any],
    alignment: Optional[Dict[str, Any]] = None,
    include_inactive: bool = False,
) -> str:
    """A Markdown table of the characteristic noise levels, one row per dimension, ordered by t*.

    Columns: dimension, clean KL (nats), clean information (nats), t*, ``s_{t*}``, ``log SNR(t*)``
    and, with ``alignment`` (:func:`factor_alignment`), the best-matching factor and its ``|corr|``.
    Censored dimensions (information kept beyond the grid) show ``> t_max``.
    """
    kl0 = np.asarray(profile["kl"])[0]
    rows = list(levels["order"])
    if include_inactive:
        rows += [i for i in range(kl0.size) if i not in rows]
    head = ["dim", "clean KL to prior (nats)", "I_i(0) (nats)", f"t* ({levels['fraction']:g} of I_i(0))", "s_t*", "log SNR(t*)"]
    if alignment is not None:
        head += ["best factor", f"abs. {alignment['method']} corr."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t_max = int(np.asarray(profile["timesteps"])[-1])
    for i in rows:
        if levels["censored"][i]:
            t_cell, s_cell, snr_cell = f"> {t_max}", "–", "–"
        else:
            t_cell = _fmt(float(levels["timestep"][i]), ".1f")
            s_cell = _fmt(float(levels["sigma"][i]), ".3f")
            snr_cell = _fmt(float(levels["log_snr"][i]), ".2f")
        cells = [f"z{i}" + ("" if i in levels["active"] else " (inactive)"), _fmt(float(kl0[i]), ".3f"),
                 _fmt(float(levels["clean_information"][i]), ".3f"), t_cell, s_cell, snr_cell]
        if alignment is not None:
            cells += [alignment["best_factor"][i], _fmt(float(alignment["best_score"][i]), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_to_json(profile: Dict[str, Any], levels: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """JSON-ready copy of a profile (and characteristic levels): arrays become lists, inf/NaN become None.

    ``alphas_cumprod`` is left out (it belongs to the scheduler, not to the measurement).
    """
    out: Dict[str, Any] = {"profile": {k: to_jsonable(v) for k, v in profile.items() if k != "alphas_cumprod"}}
    if levels is not None:
        out["characteristic_noise_levels"] = {k: to_jsonable(v) for k, v in levels.items()}
    return out


# ---------------------------------------------------------------------------------------- tables and JSON
def flat_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    """One row label -> value per scalar of a :func:`representation_metrics` result (plus
    ``trajectories`` and ``elbo`` entries when present), in table order."""
    rows: Dict[str, float] = {}
    if "mig" in result:
        rows["MIG"] = result["mig"]
        for name, value in result.get("mig_per_factor", {}).items():
            rows[f"MIG {name}"] = value
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


def plot_metric_bars(columns: Dict[str, List[Dict[str, float]]], path: str, rows: List[str]) -> str:
    """Grouped bars (mean, std error bars over runs) of ``rows`` for each model; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = {name: aggregate(runs) for name, runs in columns.items()}
    x = np.arange(len(rows))
    width = 0.8 / max(len(stats), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.8))
    for j, (name, per_row) in enumerate(stats.items()):
        means = [per_row.get(r, {}).get("mean", np.nan) for r in rows]
        stds = [per_row.get(r, {}).get("std", 0.0) for r in rows]
        ax.bar(x + (j - (len(stats) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(rows, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def rate_study_measurements(
    model: Any,
    dataset: FactorDataset,
    num_images: int = 4096,
    num_prior_samples: int = 512,
    num_inference_steps: int = 50,
    batch_size: int = 256,
    kl_threshold: float = ACTIVE_KL_NATS,
    seed: int = 0,
) -> Dict[str, Any]:
    """Rate and generative measurements of one model (a :class:`~sami_adapter.SAMIPipeline` or a
    baseline with ``encode``/``decode``/``reconstruct``), the same way for every method.

    * ``information_lower`` / ``information_upper``: :func:`~sami_adapter.rate.mixture_information`
      (at most ``log N``) and :func:`~sami_adapter.rate.information_upper_bound` on ``N = num_images``
      held-out images, in nats; ``kl``: the data-mean KL of ``q(z | x)``, also per dimension;
    * ``prior_clean_fraction`` (disks, background_disks): share of clean one-disk images among decodes of
      ``z ~ N(0, I)`` (SAMI: DDIM with ``num_inference_steps`` steps, eta 1);
    * ``reconstruction_r2`` (disks, background_disks): R² of each factor measured on the image
      (:func:`~sami_adapter.evaluation.disk_moment_r2`), input vs decode of the posterior mean (SAMI: the
      exact decoder, ``sami_scale`` 1, eta 1), on at most 512 images; ``reconstruction_mse``: their
      mean squared pixel error (the SAMI paper's measure), pixels in [-1, 1];
    * ``guidance_gain`` (SAMI): relative guided-vs-unguided denoising gain on the same images.
    """
    from .data import BackgroundDisks, Disks, clean_background_disk_fraction, clean_disk_fraction
    from .encoder import LatentPosterior
    from .pipeline import SAMIPipeline
    from .rate import information_upper_bound, mixture_information

    is_sami = isinstance(model, SAMIPipeline)
    images, _, _ = dataset.sample(num_images, np.random.default_rng([seed, 5]))
    means, logvars = [], []
    for start in range(0, images.shape[0], batch_size):
        post = model.encode(pipeline_input(model, images[start:start + batch_size].to(model.device)))
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
        if is_sami:
            samples = torch.cat([
                model_from_unit(model(batch_size=min(256, num_prior_samples - start), num_inference_steps=num_inference_steps, eta=1.0,
                                      generator=g, output_type="pt").images.cpu())
                for start in range(0, num_prior_samples, 256)
            ])
            decoded = disk_reconstruction_r2(model, held_out.to(model.device), num_inference_steps=num_inference_steps, seed=seed, eta=1.0,
                                             sami_scale=1.0, dataset=name)["reconstructions"]
        else:
            samples = model.decode(torch.randn(num_prior_samples, mean.shape[1], generator=g).to(model.device)).cpu()
            decoded = model.reconstruct(held_out.to(model.device)).cpu()
        out["prior_clean_fraction"] = clean_check(samples)[0]
        out["reconstruction_r2"] = {k: float(v) for k, v in disk_moment_r2(held_out, decoded, name).items()}
        out["reconstruction_mse"] = float(((decoded.float() - held_out.float()) ** 2).mean())
    if is_sami:
        gains = guidance_gain(model.unet, model.encoder, model.scheduler, held_out.to(model.device), seed=seed)
        out["guidance_gain"] = gains["relative_gain"]
    return out


RATE_STUDY_PANELS = [("MIG", "MIG"), ("DCI disentanglement", "DCI disentanglement"), ("prior clean fraction", "prior samples: clean disks"),
                     ("reconstruction R² (x, y, radius mean)", "reconstruction R² x/y/radius"), ("guidance gain", "SAMI guidance gain")]


def plot_rate_study(table: List[Dict[str, Any]], path: str, title: str, panels: Sequence[tuple] = RATE_STUDY_PANELS) -> str:
    """Each metric against the rate, one line per method: the marker sits at the upper bound on I(x; z) and
    a horizontal bar reaches down to the lower bound (the mixture bound saturates at log N, so high-rate
    codes show a long bar); vertical bars are the seeds' std.

    Args:
        table: rows with ``method``, ``information_lower``, ``information_upper`` and each panel's key, each a ``{"mean", "std"}``
            dict or None (``examples/compare.py --collect`` builds them).
        path: PNG to write.
        title: figure title.
        panels: ``(key, label)`` pairs, one panel each; panels with no values are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, label) for k, label in panels if any(t[k] is not None for t in table)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.3), squeeze=False)
    methods = sorted({t["method"] for t in table})
    for ax, (key, label) in zip(axes[0], panels):
        for method in methods:
            pts = sorted((t for t in table if t["method"] == method and t[key] is not None), key=lambda t: t["information_upper"]["mean"])
            if not pts:
                continue
            upper = [t["information_upper"]["mean"] for t in pts]
            below = [max(0.0, u - t["information_lower"]["mean"]) for u, t in zip(upper, pts)]
            ax.errorbar(upper, [t[key]["mean"] for t in pts], xerr=[below, [0.0] * len(pts)], yerr=[t[key]["std"] for t in pts],
                        marker="o", ms=4, capsize=2, label=method)
        ax.set_xlabel("I(x; z), nats (upper bound; bar to lower)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_jsonable(value: Any) -> Any:
    """numpy/torch values and containers -> plain Python, with non-finite floats as None (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_json(path: str, obj: Any) -> str:
    """Write ``obj`` as strict JSON (:func:`to_jsonable`: arrays as lists, inf/NaN as null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
    return path


# ---------------------------------------------------------------------------------------- pictures
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image with ``nrow`` images per row."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = nrow
    nrows = int(np.ceil(n / ncol))
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 1) -> str:
    """Save ``image_grid(images, nrow, scale)`` as a PNG at ``path`` (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_grid(images, nrow, scale).save(path)
    return path


@torch.no_grad()
def reconstructions(
    pipe: Any, images: torch.Tensor, num_inference_steps: int = 50, eta: float = 1.0, seed: int = 0, sami_scale: float = 1.0
) -> torch.Tensor:
    """Decodes of ``z = mean q(z | x_0)`` of ``images`` (N, C, H, W) in [-1, 1], on the CPU; noise from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    out = pipe.reconstruct(unit_from_model(images), num_inference_steps=num_inference_steps, eta=eta, generator=generator, output_type="pt",
                           sami_scale=sami_scale)
    return model_from_unit(out.images.cpu())


@torch.no_grad()
def traversal_rows(
    pipe: Any,
    image: torch.Tensor,
    dims: Sequence[int],
    values: Union[Sequence[float], Sequence[Sequence[float]]],
    num_inference_steps: int = 50,
    seed: int = 0,
    sami_scale: float = 1.0,
) -> torch.Tensor:
    """One traversal row per dimension in ``dims``, stacked: (len(dims) * len(values), C, H, W) on the CPU.

    Each row starts from the posterior mean of ``image`` and moves one coordinate through its
    ``values`` (one list for every row, or one list per row). Every row uses DDIM eta 0 and the same
    initial noise (from ``seed``), so within and across rows only the code changes.
    """
    per_row = list(values) if len(values) and isinstance(values[0], (list, tuple, np.ndarray)) else [list(values)] * len(dims)
    if len(per_row) != len(dims):
        raise ValueError(f"got {len(per_row)} value lists for {len(dims)} dimensions.")
    rows = []
    for d, row_values in zip(dims, per_row):
        generator = torch.Generator().manual_seed(seed)
        out = pipe.traverse(unit_from_model(image[:1]), d, list(row_values), num_inference_steps=num_inference_steps, eta=0.0,
                            generator=generator, output_type="pt", sami_scale=sami_scale)
        rows.append(model_from_unit(out.images.cpu()))
    return torch.cat(rows)


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
    disk_factors: Optional[str] = None,
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
        disk_factors: the dataset of the images when its factors can be measured on an image
            (``"disks"`` or ``"background_disks"``): the report then gives the reconstruction R² per factor.
    """
    os.makedirs(report_dir, exist_ok=True)
    model_inputs = pipe.preprocess(unit_from_model(images))  # VAE latents for latent diffusion, the images otherwise
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
        rec = disk_reconstruction_r2(pipe, images, num_inference_steps=num_inference_steps, seed=seed, eta=eta, dataset=disk_factors)
        report["reconstruction_r2"] = {k: round(v, 3) for k, v in rec["r2"].items()}
        recon = rec["reconstructions"][:n_show]
        if sami_scale != 1.0:  # also decode with sharpened guidance (same noise): the exact decoder's spread vs its modes
            rec = disk_reconstruction_r2(pipe, images, num_inference_steps=num_inference_steps, seed=seed, eta=eta, sami_scale=sami_scale,
                                         dataset=disk_factors)
            report["reconstruction_sami_scale"] = sami_scale
            report["reconstruction_r2_scaled"] = {k: round(v, 3) for k, v in rec["r2"].items()}
            recon = torch.cat([recon, rec["reconstructions"][:n_show]])
    else:
        recon = reconstructions(pipe, images[:n_show], num_inference_steps, eta, seed)
    save_image_grid(torch.cat([images[:n_show].cpu(), recon]), os.path.join(report_dir, "reconstructions.png"), nrow=n_show, scale=4)
    values = torch.linspace(-2.5, 2.5, 9).tolist()
    rows = traversal_rows(pipe, images[:1], order[: max(len(active), 1)], values, num_inference_steps, seed)
    save_image_grid(rows, os.path.join(report_dir, "traversals.png"), nrow=len(values), scale=4)
    with open(os.path.join(report_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [
        "# SAMI adapter report", "",
        f"Held-out images: {images.shape[0]}. Guided vs unguided denoising error (same noise, stratified timesteps):",
        f"{report['guided_loss']} vs {report['unguided_loss']} (relative gain {report['relative_guidance_gain']:.1%}).", "",
        "| noise band (t) | " + " | ".join(report["band_gain"]) + " |", "|---" * (len(report["band_gain"]) + 1) + "|",
        "| guidance gain | " + " | ".join(f"{v:.1%}" for v in report["band_gain"].values()) + " |", "",
        f"Active dimensions (KL > {ACTIVE_KL_NATS:g} nats): {len(active)} of {len(kl)}. KL per dimension: {report['kl_per_dim']}", "",
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
