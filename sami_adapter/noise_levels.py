"""What a code dimension knows at each noise level: information profiles, characteristic noise levels, each
factor's own noise scale (a probe on noisy images), the mechanism table, and the axis-discovery pass that runs them.

SAMI's encoder ``q(z | x_t, t)`` is defined at every noise level, so each code dimension has an
*information profile*: how much ``q(z_i | x_t)`` tells about the image as ``t`` grows. Coarse
properties (position) survive a lot of noise, fine ones (size, brightness) are lost early, so the
noise level where a dimension's information falls off (its *characteristic noise level*) orders
the axes without any label.

The information measure (:func:`information_profile`) is the Gaussian channel capacity of
dimension ``i`` at timestep ``t``, in nats::

    I_i(t) = 1/2 log(1 + Var_{x, eps}[mu_i(x_t)] / E_{x, eps}[sigma_i^2(x_t)]),
    x_t = a_t x + s_t eps,  (mu_i, sigma_i^2) the mean and variance of q(z_i | x_t, t).

It is the mutual information between ``x_t`` and ``z_i ~ q(z_i | x_t)`` for a Gaussian channel
with the same signal and noise variances (an estimate of ``I(z_i; x_t)``, the information the
noisy image carries about the code). For a Bayes-consistent encoder
``Var[mu_i] + E[sigma_i^2] = 1`` (the prior variance), and ``I_i`` is ``-1/2 log`` of the
fraction of the prior variance left unexplained. The clean value ``I_i(0)`` uses ``x_0`` itself.

Array-level scores (factor alignment, R²) live in :mod:`sami_adapter.metrics`; :mod:`sami_adapter.report`
writes these measurements out.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .encoder import ACTIVE_KL_NATS
from .evaluation import active_dimensions
from .guidance import encoder_noise_level
from .images import unit_from_model
from .metrics import factor_alignment
from .metrics.linear_r2 import r2_score


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
        post = pipe.encode(unit_from_model(images[start : start + batch_size]), timesteps=grid, generator=generator)
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


def _noise_at(profile: Dict[str, Any], t: float) -> tuple:
    """``(a, s)`` at a fractional timestep ``t``: exact from ``alphas_cumprod`` when the profile has
    it, else linear interpolation of ``sigma`` on the grid (``a = sqrt(1 - s^2)``)."""
    if profile.get("alphas_cumprod") is not None:
        alpha, sigma = _noise_levels(torch.as_tensor(np.asarray(profile["alphas_cumprod"]), dtype=torch.float64), [t])
        return float(alpha[0]), float(sigma[0])
    sigma = float(np.interp(t, np.asarray(profile["timesteps"], float), np.asarray(profile["sigma"], float)))
    return math.sqrt(max(1.0 - sigma**2, 0.0)), sigma


def first_crossing(grid: np.ndarray, values: np.ndarray, threshold: float) -> Optional[float]:
    """The first ``t`` on ``grid`` (increasing, from 0) where ``values`` falls below ``threshold``, interpolated
    linearly between the last grid point at or above it and the first below; None when it never does."""
    below = np.flatnonzero(np.asarray(values[1:]) < threshold)
    if below.size == 0:
        return None
    k = int(below[0]) + 1
    hi, lo = values[k - 1], values[k]
    return float(grid[k - 1] + (hi - threshold) / (hi - lo) * (grid[k] - grid[k - 1]))


def characteristic_noise_levels(
    profile: Dict[str, Any],
    fraction: float = 0.5,
    active: Optional[Sequence[int]] = None,
    kl_threshold: float = ACTIVE_KL_NATS,
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
        active: dimensions to measure; default :func:`active_dimensions` of the clean KL ``profile["kl"][0]``.
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
        active = active_dimensions(np.asarray(profile["kl"])[0], kl_threshold)
    active = sorted(int(i) for i in active)
    out = {key: np.full(num_dims, np.nan) for key in ("timestep", "sigma", "alpha", "snr", "log_snr")}
    censored = np.zeros(num_dims, dtype=bool)
    clean = info[0].copy()
    for i in active:
        if not clean[i] > 0:
            continue
        t_star = first_crossing(grid, info[:, i], fraction * clean[i])
        if t_star is None:
            censored[i] = True
            continue
        alpha, sigma = _noise_at(profile, t_star)
        out["timestep"][i], out["alpha"][i], out["sigma"][i] = t_star, alpha, sigma
        out["snr"][i] = alpha**2 / sigma**2 if sigma > 0 else np.inf
        out["log_snr"][i] = math.log(out["snr"][i]) if sigma > 0 else np.inf
    measured = [i for i in active if np.isfinite(out["timestep"][i])]
    order = sorted(measured, key=lambda i: out["timestep"][i]) + [i for i in active if censored[i]]
    return {**out, "clean_information": clean, "censored": censored, "active": active, "order": order, "fraction": fraction}


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


# ---------------------------------------------------------------------------- the mechanism
def factor_recoverability(
    dataset: Any,
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int],
    num_steps: int = 300,
    batch_size: int = 256,
    num_test: int = 2048,
    hidden_dim: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> Dict[str, Any]:
    """How well each ground-truth factor can be read from the noisy image ``x_t``, per noise level.

    At each timestep one probe, the same for every factor and level (an MLP: pixels -> ``hidden_dim``
    -> SiLU -> ``hidden_dim`` -> SiLU -> K standardised factor values), is trained with Adam on fresh
    draws ``x_t = a_t x_0 + s_t eps`` of ``dataset`` and scored on ``num_test`` held-out draws.
    The probe approximates ``E[v_k | x_t]``, so its held-out R² is the share of factor ``k``'s
    variance that survives noise level ``t``: a property of the data and the noise schedule alone,
    with no model in it. Where R² falls to half its clean value is the factor's own noise scale
    (:func:`factor_noise_scales`).

    Args:
        dataset: a :class:`~sami_adapter.data.FactorDataset` (its ``sample`` and ``factor_names``).
        alphas_cumprod: the scheduler's cumulative alphas (the noise levels).
        timesteps: integer timesteps; 0 is added when missing.
        num_steps, batch_size, hidden_dim, learning_rate: the probe's training.
        num_test: held-out draws per level.
        seed: seed of data, noise and probe initialisation.

    Returns:
        dict with ``timesteps`` (L,), ``r2`` (L, K) held-out R² per level and factor, ``names``.
    """
    grid = sorted(set(int(t) for t in timesteps) | {0})
    rng = np.random.default_rng([seed, 41])
    test_images, _, test_values = dataset.sample(num_test, rng)
    mean, std = test_values.mean(0), test_values.std(0) + 1e-12
    alpha, sigma = _noise_levels(torch.as_tensor(alphas_cumprod, dtype=torch.float64), grid)
    g = torch.Generator().manual_seed(seed)
    r2 = np.zeros((len(grid), len(dataset.factor_names)))
    pixels = int(np.prod(test_images.shape[1:]))
    for level, (a, s) in enumerate(zip(alpha.tolist(), sigma.tolist())):
        with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's RNG alone
            torch.manual_seed(seed + level)
            probe = torch.nn.Sequential(torch.nn.Linear(pixels, hidden_dim), torch.nn.SiLU(), torch.nn.Linear(hidden_dim, hidden_dim),
                                        torch.nn.SiLU(), torch.nn.Linear(hidden_dim, len(dataset.factor_names)))
        optimizer = torch.optim.Adam(probe.parameters(), lr=learning_rate)
        for step in range(num_steps):
            images, _, values = dataset.sample(batch_size, rng)
            x_t = a * images + s * torch.randn(images.shape, generator=g)
            target = torch.as_tensor((values - mean) / std, dtype=torch.float32)
            loss = ((probe(x_t.flatten(1)) - target) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            x_t = a * test_images + s * torch.randn(test_images.shape, generator=g)
            predicted = probe(x_t.flatten(1)).double().numpy() * std + mean
        r2[level] = [r2_score(test_values[:, k], predicted[:, k]) for k in range(r2.shape[1])]
    return {"timesteps": np.asarray(grid, dtype=np.int64), "r2": r2, "names": list(dataset.factor_names)}


def factor_noise_scales(recoverability: Dict[str, Any], fraction: float = 0.5) -> Dict[str, float]:
    """Each factor's own noise scale: the timestep where its probe R² (:func:`factor_recoverability`)
    first falls below ``fraction`` of its clean value (the same rule as :func:`characteristic_noise_levels`);
    ``inf`` when it never does on the grid."""
    grid = np.asarray(recoverability["timesteps"], dtype=np.float64)
    r2 = np.asarray(recoverability["r2"], dtype=np.float64)
    out = {}
    for k, name in enumerate(recoverability["names"]):
        t = first_crossing(grid, r2[:, k], fraction * r2[0, k]) if r2[0, k] > 0 else None
        out[name] = float("inf") if t is None else t
    return out


def mechanism_table(levels: Dict[str, Any], alignment: Dict[str, Any], noise_scales: Dict[str, float]) -> Dict[str, Any]:
    """SAMI's claim, measured: is each active dimension's characteristic noise level ordered as the
    noise scale of the factor it codes?

    A dimension codes its best-matching factor (largest ``|rank corr|`` of its clean posterior mean,
    ``alignment`` from :func:`sami_adapter.metrics.factor_alignment`). Over the active dimensions with a
    measured level, ``spearman`` is the rank correlation between the dimension's t* and that
    factor's noise scale (:func:`factor_noise_scales`); NaN with fewer than 3 such dimensions or
    when either side is constant.

    Returns:
        dict with ``rows`` (one per active dimension: ``dim``, ``factor``, ``rank_corr``, ``t_star``,
        ``factor_noise_scale``) and ``spearman``.
    """
    matrix = np.asarray(alignment["matrix"])
    t_star = np.asarray(levels["timestep"], dtype=np.float64)
    rows = []
    for i in (int(d) for d in levels["active"]):
        k = int(np.argmax(matrix[i]))
        name = alignment["names"][k]
        rows.append({"dim": int(i), "factor": name, "rank_corr": float(matrix[i, k]), "t_star": float(t_star[i]),
                     "factor_noise_scale": float(noise_scales[name])})
    measured = [r for r in rows if np.isfinite(r["t_star"]) and np.isfinite(r["factor_noise_scale"])]
    rho = float("nan")
    if len(measured) >= 3 and len({r["t_star"] for r in measured}) > 1 and len({r["factor_noise_scale"] for r in measured}) > 1:
        from scipy.stats import spearmanr

        rho = float(spearmanr([r["t_star"] for r in measured], [r["factor_noise_scale"] for r in measured]).statistic)
    return {"rows": rows, "spearman": rho}


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
