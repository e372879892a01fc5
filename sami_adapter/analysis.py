"""Unsupervised axis discovery: which code dimensions are active, and at which noise level each loses its information.

SAMI's encoder ``q(z | x_t, t)`` is defined at every noise level, so each code dimension has an
*information profile*: how much ``q(z_i | x_t)`` tells about the image as ``t`` grows. Coarse
properties (position) survive a lot of noise, fine ones (size, brightness) are lost early, so the
noise level where a dimension's information falls off (its *characteristic noise level*) orders
the axes without any label. This module measures the profile, extracts the characteristic noise
levels, plots and tabulates them, and relates dimensions to ground-truth factors when labels exist.

The information measure (:func:`information_profile`) is the Gaussian channel capacity of
dimension ``i`` at timestep ``t``, in nats::

    I_i(t) = 1/2 log(1 + Var_{x, eps}[mu_i(x_t)] / E_{x, eps}[sigma_i^2(x_t)]),
    x_t = a_t x + s_t eps,  (mu_i, sigma_i^2) the mean and variance of q(z_i | x_t, t).

It is the mutual information between ``x_t`` and ``z_i ~ q(z_i | x_t)`` for a Gaussian channel
with the same signal and noise variances (an estimate of ``I(z_i; x_t)``, the information the
noisy image carries about the code). For a Bayes-consistent encoder
``Var[mu_i] + E[sigma_i^2] = 1`` (the prior variance), and ``I_i`` is ``-1/2 log`` of the
fraction of the prior variance left unexplained. The clean value ``I_i(0)`` uses ``x_0`` itself.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .evaluation import active_dimensions
from .guidance import encoder_noise_level

INFORMATION_MEASURE = "gaussian_capacity_nats"


def default_timestep_grid(num_train_timesteps: int = 1000, num_levels: int = 21) -> List[int]:
    """``num_levels`` evenly spaced integer timesteps from 0 to ``num_train_timesteps - 1`` (0 included)."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}.")
    grid = np.round(np.linspace(0, num_train_timesteps - 1, num_levels)).astype(int)
    return sorted(set(int(t) for t in grid))


def _noise_levels(alphas_cumprod: torch.Tensor, timesteps: Sequence[float]) -> tuple:
    """``(a_t, s_t)`` of the encoder's input as float64 numpy arrays (``t = 0``: the clean image)."""
    alpha, sigma = encoder_noise_level(alphas_cumprod, torch.as_tensor(list(timesteps), dtype=torch.float64))
    return alpha.numpy().copy(), sigma.numpy().copy()


def _snr(alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(sigma > 0, alpha**2 / np.maximum(sigma, 1e-300) ** 2, np.inf)


@torch.no_grad()
def information_profile(
    pipe: Any,
    images: torch.Tensor,
    timesteps: Optional[Sequence[int]] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 256,
) -> Dict[str, Any]:
    """Per-dimension information of ``q(z_i | x_t)`` at each noise level (module docstring).

    Args:
        pipe: a :class:`~sami_adapter.SAMIPipeline` (its ``encode`` and ``scheduler.alphas_cumprod`` are used).
        images: (N, C, H, W) clean images in [-1, 1] (anything ``pipe.encode`` accepts as a tensor).
        timesteps: integer timesteps; 0 (the clean reference) is added when missing and the grid
            is sorted. Default: :func:`default_timestep_grid` (21 levels).
        generator: generator of the noise ``eps`` (one draw per image and level).
        batch_size: images per ``pipe.encode`` call (each call encodes all levels at once).

    Returns:
        dict of numpy arrays (K levels, D dimensions) and metadata:

        * ``timesteps`` (K,), ``alpha`` and ``sigma`` (K,) the noise level ``x_t = a_t x + s_t eps``,
          ``snr`` (K,) ``a_t^2 / s_t^2`` (inf at t = 0), ``log_snr`` (K,);
        * ``information`` (K, D) ``I_i(t)`` in nats (:data:`INFORMATION_MEASURE`);
        * ``explained_variance`` (K, D) ``Var[mu] / (Var[mu] + E[sigma^2])``;
        * ``mean_variance`` (K, D) ``Var[mu_i(x_t)]``, ``posterior_variance`` (K, D) ``E[sigma_i^2]``;
        * ``kl`` (K, D) data-mean ``KL(q(z_i | x_t) || N(0, 1))`` in nats (row 0: the clean KL);
        * ``alphas_cumprod`` (T,) of the scheduler, ``num_images``, ``measure``.
    """
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"images must be (N, C, H, W) with N >= 2, got {tuple(images.shape)}.")
    num_train = int(pipe.scheduler.config.num_train_timesteps)
    grid = default_timestep_grid(num_train) if timesteps is None else sorted(set(int(t) for t in timesteps) | {0})
    n = images.shape[0]
    # Running sums per (level, dim) in float64: sum mu, sum mu^2, sum sigma^2, sum KL.
    sums = None
    for start in range(0, n, batch_size):
        post = pipe.encode(images[start : start + batch_size], timesteps=grid, generator=generator)
        mean, var = post.mean.double().cpu(), post.var.double().cpu()
        kl = post.kl_per_dim().double().cpu()
        part = torch.stack([mean.sum(1), (mean**2).sum(1), var.sum(1), kl.sum(1)])  # (4, K, D)
        sums = part if sums is None else sums + part
    s_mu, s_mu2, s_var, s_kl = (sums[i].numpy() for i in range(4))
    mu_bar = s_mu / n
    mean_variance = np.maximum((s_mu2 - n * mu_bar**2) / (n - 1), 0.0)
    posterior_variance = s_var / n
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = mean_variance / np.maximum(posterior_variance, 1e-300)
        explained = mean_variance / np.maximum(mean_variance + posterior_variance, 1e-300)
    information = 0.5 * np.log1p(ratio)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.detach().cpu().double()
    alpha, sigma = _noise_levels(alphas_cumprod, grid)
    snr = _snr(alpha, sigma)
    with np.errstate(divide="ignore"):
        log_snr = np.log(snr)
    return {
        "timesteps": np.asarray(grid, dtype=np.int64),
        "alpha": alpha,
        "sigma": sigma,
        "snr": snr,
        "log_snr": log_snr,
        "information": information,
        "explained_variance": explained,
        "mean_variance": mean_variance,
        "posterior_variance": posterior_variance,
        "kl": s_kl / n,
        "alphas_cumprod": alphas_cumprod.numpy(),
        "num_images": int(n),
        "measure": INFORMATION_MEASURE,
    }


def active_dims_by_kl(kl_per_dim: Sequence[float], threshold: float = 0.1) -> List[int]:
    """Indices of dimensions whose data-mean ``KL(q(z_i | x_0) || N(0, 1))`` exceeds ``threshold`` nats.

    The same rule as :func:`sami_adapter.evaluation.active_dimensions`; pass ``profile["kl"][0]``
    (the clean row of an information profile) or ``guidance_gain(...)["kl_per_dim"]``.
    """
    return active_dimensions([float(v) for v in kl_per_dim], threshold)


def _noise_at(profile: Dict[str, Any], t: float) -> tuple:
    """``(a, s)`` at a fractional timestep ``t``: exact from ``alphas_cumprod`` when the profile has
    it, else linear interpolation of ``sigma`` on the grid (``a = sqrt(1 - s^2)``)."""
    if profile.get("alphas_cumprod") is not None:
        alpha, sigma = _noise_levels(torch.as_tensor(np.asarray(profile["alphas_cumprod"]), dtype=torch.float64), [t])
        return float(alpha[0]), float(sigma[0])
    sigma = float(np.interp(t, np.asarray(profile["timesteps"], float), np.asarray(profile["sigma"], float)))
    return math.sqrt(max(1.0 - sigma**2, 0.0)), sigma


def characteristic_noise_levels(
    profile: Dict[str, Any],
    fraction: float = 0.5,
    active: Optional[Sequence[int]] = None,
    kl_threshold: float = 0.1,
) -> Dict[str, Any]:
    """The noise level at which each active dimension's information first falls below ``fraction`` of its clean value.

    Rule: with ``I_i(t_0 = 0) > 0`` the clean information and ``c = fraction * I_i(0)``, find the first
    grid point ``t_k`` with ``I_i(t_k) < c``; then ``I_i(t_{k-1}) >= c`` and the crossing is
    interpolated linearly in ``t``::

        t*_i = t_{k-1} + (I_i(t_{k-1}) - c) / (I_i(t_{k-1}) - I_i(t_k)) * (t_k - t_{k-1}).

    The noise scale ``s_{t*}`` and ``SNR(t*) = a^2 / s^2`` at that (fractional) timestep come from the
    scheduler's ``alphas_cumprod`` (interpolating ``s / a`` like the guidance does).

    Args:
        profile: output of :func:`information_profile` (needs ``timesteps``, ``information``, and
            ``kl`` unless ``active`` is given; ``alphas_cumprod`` or ``sigma`` for the noise scale).
        fraction: the share of the clean information that defines "lost", in (0, 1).
        active: dimensions to measure; default :func:`active_dims_by_kl` on ``profile["kl"][0]``.
        kl_threshold: KL threshold of the default active set.

    Returns:
        dict with per-dimension arrays (D,): ``timestep`` (t*, NaN for inactive dimensions and for
        ``censored`` ones), ``sigma``, ``alpha``, ``snr``, ``log_snr`` at t*, ``clean_information``,
        ``censored`` (True when an active dimension keeps more than ``fraction`` of its information
        up to the last grid level, so t* lies beyond the grid); plus ``active`` (list),
        ``order`` (active dimensions sorted by t*, censored last) and ``fraction``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
    grid = np.asarray(profile["timesteps"], dtype=np.float64)
    info = np.asarray(profile["information"], dtype=np.float64)
    if info.ndim != 2 or info.shape[0] != grid.size:
        raise ValueError(f"information must be (K levels, D dims) with K = {grid.size}, got {info.shape}.")
    if grid[0] != 0 or np.any(np.diff(grid) <= 0):
        raise ValueError("profile timesteps must be increasing and start at 0 (the clean reference).")
    num_dims = info.shape[1]
    if active is None:
        active = active_dims_by_kl(np.asarray(profile["kl"])[0], kl_threshold)
    active = sorted(int(i) for i in active)
    out = {key: np.full(num_dims, np.nan) for key in ("timestep", "sigma", "alpha", "snr", "log_snr")}
    censored = np.zeros(num_dims, dtype=bool)
    clean = info[0].copy()
    for i in active:
        if not clean[i] > 0:
            continue
        threshold = fraction * clean[i]
        below = np.flatnonzero(info[1:, i] < threshold)
        if below.size == 0:
            censored[i] = True
            continue
        k = int(below[0]) + 1
        hi, lo = info[k - 1, i], info[k, i]
        t_star = grid[k - 1] + (hi - threshold) / (hi - lo) * (grid[k] - grid[k - 1])
        alpha, sigma = _noise_at(profile, t_star)
        out["timestep"][i], out["alpha"][i], out["sigma"][i] = t_star, alpha, sigma
        out["snr"][i] = alpha**2 / sigma**2 if sigma > 0 else np.inf
        out["log_snr"][i] = math.log(out["snr"][i]) if sigma > 0 else np.inf
    measured = [i for i in active if np.isfinite(out["timestep"][i])]
    order = sorted(measured, key=lambda i: out["timestep"][i]) + [i for i in active if censored[i]]
    return {**out, "clean_information": clean, "censored": censored, "active": active, "order": order, "fraction": fraction}


def factor_alignment(codes: np.ndarray, factor_values: np.ndarray, names: Sequence[str], method: str = "spearman") -> Dict[str, Any]:
    """How strongly each code dimension tracks each ground-truth factor.

    ``matrix[i, k] = |corr(z_i, v_k)|`` over the samples, Spearman (rank) correlation by default
    (invariant to monotone rescaling of either side) or Pearson; a constant column gives 0.

    Args:
        codes: (N, D) representation (e.g. posterior means).
        factor_values: (N, K) continuous factor values (or indices).
        names: the K factor names.
        method: ``"spearman"`` or ``"pearson"``.

    Returns:
        dict with ``matrix`` (D, K) numpy array, ``names``, ``best_factor`` (D,) the name of each
        dimension's best-matching factor, ``best_score`` (D,) its ``|corr|``, ``method``.
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}.")
    z = np.asarray(codes, dtype=np.float64)
    v = np.asarray(factor_values, dtype=np.float64)
    if z.ndim != 2 or v.ndim != 2 or z.shape[0] != v.shape[0]:
        raise ValueError(f"codes (N, D) and factor_values (N, K) must share N, got {z.shape} and {v.shape}.")
    if len(names) != v.shape[1]:
        raise ValueError(f"got {len(names)} names for {v.shape[1]} factors.")
    if method == "spearman":
        from scipy.stats import rankdata

        z = rankdata(z, axis=0)
        v = rankdata(v, axis=0)
    z = z - z.mean(0)
    v = v - v.mean(0)
    nz, nv = np.linalg.norm(z, axis=0), np.linalg.norm(v, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (z.T @ v) / np.outer(nz, nv)
    matrix = np.nan_to_num(np.abs(corr), nan=0.0)
    best = matrix.argmax(axis=1)
    return {
        "matrix": matrix,
        "names": list(names),
        "best_factor": [names[k] for k in best],
        "best_score": matrix.max(axis=1),
        "method": method,
    }


def factor_dimensions(levels: Dict[str, Any], alignment: Dict[str, Any]) -> Dict[str, Optional[int]]:
    """The measured dimension that stands for each factor, or None.

    A dimension stands for factor ``k`` when it is active with a finite t* and ``k`` is its
    best-matching factor (largest ``|corr|`` in its row of ``alignment["matrix"]``); among several
    such dimensions the one most correlated with ``k`` is taken. A dimension therefore represents at
    most one factor, and a factor that is nobody's best match gets None.
    """
    matrix = np.asarray(alignment["matrix"])
    t_star = np.asarray(levels["timestep"], dtype=np.float64)
    dims = [i for i in levels["active"] if np.isfinite(t_star[i])]
    out: Dict[str, Optional[int]] = {}
    for k, name in enumerate(alignment["names"]):
        candidates = [i for i in dims if int(np.argmax(matrix[i])) == k]
        out[name] = max(candidates, key=lambda i: matrix[i, k]) if candidates else None
    return out


def factor_noise_levels(levels: Dict[str, Any], alignment: Dict[str, Any]) -> Dict[str, float]:
    """Characteristic noise level of each factor: the t* of the dimension that stands for it
    (:func:`factor_dimensions`), NaN when none does.

    Comparing the resulting factor order between two runs (seeds) tests whether characteristic
    noise levels order the factors consistently (:func:`noise_order_agreement`).
    """
    t_star = np.asarray(levels["timestep"], dtype=np.float64)
    return {name: (float(t_star[d]) if d is not None else float("nan")) for name, d in factor_dimensions(levels, alignment).items()}


def noise_order_agreement(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, Any]:
    """Do two runs order the factors the same way by characteristic noise level?

    Compares factors with a finite level in both: ``kendall_tau`` over them (1 = same order) and
    ``same_order`` (the sorted factor lists are identical), plus both orders.
    """
    common = [name for name in a if name in b and np.isfinite(a[name]) and np.isfinite(b[name])]
    order_a = sorted(common, key=lambda n: a[n])
    order_b = sorted(common, key=lambda n: b[n])
    tau = float("nan")
    if len(common) >= 2:
        from scipy.stats import kendalltau

        tau = float(kendalltau([a[n] for n in common], [b[n] for n in common]).statistic)
    return {"factors": common, "order_a": order_a, "order_b": order_b, "same_order": order_a == order_b and len(common) >= 2, "kendall_tau": tau}


def discover_axes(
    pipe: Any,
    images: torch.Tensor,
    factor_values: Optional[np.ndarray] = None,
    factor_names: Optional[Sequence[str]] = None,
    timesteps: Optional[Sequence[int]] = None,
    fraction: float = 0.5,
    kl_threshold: float = 0.1,
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
            codes.append(pipe.encode(images[start : start + batch_size]).mean.double().cpu().numpy())
    out: Dict[str, Any] = {"profile": profile, "levels": levels, "codes": np.concatenate(codes)}
    if factor_values is not None:
        names = list(factor_names) if factor_names is not None else [f"factor{k}" for k in range(np.asarray(factor_values).shape[1])]
        out["alignment"] = factor_alignment(out["codes"], factor_values, names)
        out["factor_dims"] = factor_dimensions(levels, out["alignment"])
        out["factor_noise_levels"] = factor_noise_levels(levels, out["alignment"])
        per_factor = out["factor_noise_levels"]
        out["factor_order"] = sorted((n for n in per_factor if np.isfinite(per_factor[n])), key=lambda n: per_factor[n])
    return out


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
    active = set(levels["active"]) if levels is not None else set(active_dims_by_kl(np.asarray(profile["kl"])[0]))
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
