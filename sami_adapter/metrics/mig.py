"""Mutual Information Gap (Chen et al. 2018), as computed by disentanglement_lib."""

from __future__ import annotations

import numpy as np

from ._discretize import check_pair, discrete_entropy, discrete_mutual_info, histogram_discretize


def mig(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> float:
    """Mutual Information Gap: the mean over varying factors of :func:`mig_per_factor` (definition there)."""
    per_factor = mig_per_factor(codes, factors, num_bins)
    return float(np.nanmean(per_factor))


def mig_per_factor(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """Mutual Information Gap.

    Definition (disentanglement_lib ``mig._compute_mig``): discretise every code dimension into
    ``num_bins`` equal-width bins (:func:`histogram_discretize`), compute the mutual information
    ``I(z_i; v_k)`` between each discretised dimension and each factor, and the factor entropies
    ``H(v_k)`` (both from empirical frequencies, in nats). Then

        MIG = mean_k ( I(z_(1); v_k) - I(z_(2); v_k) ) / H(v_k),

    where ``z_(1)``, ``z_(2)`` are the dimensions with the largest and second largest mutual
    information with factor ``k``. Factors that are constant in the sample (``H = 0``, where
    disentanglement_lib would divide by zero) are left out of the mean.

    Args:
        codes: (N, D) representation, ``D >= 2``.
        factors: (N, K) integer factor indices.
        num_bins: bins per code dimension.

    Returns:
        (K,) the gap of each factor, in [0, 1] (1: the factor is captured by exactly one dimension);
        NaN for a factor that is constant in the sample. :func:`mig` is their mean.
    """
    codes, factors = check_pair(codes, factors)
    if codes.shape[1] < 2:
        raise ValueError("MIG needs at least 2 code dimensions.")
    m = discrete_mutual_info(histogram_discretize(codes, num_bins), factors)
    entropy = discrete_entropy(factors)
    varying = entropy > 0
    if not varying.any():
        raise ValueError("every factor is constant in the sample; MIG is undefined.")
    top = np.sort(m, axis=0)[::-1]
    gaps = np.full(factors.shape[1], np.nan)
    gaps[varying] = (top[0, varying] - top[1, varying]) / entropy[varying]
    return gaps
