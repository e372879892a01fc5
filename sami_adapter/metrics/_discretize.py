"""Discretisation and discrete information measures shared by the metrics.

These follow ``disentanglement_lib.evaluation.metrics.utils`` (Locatello et al. 2019), with the
arrays laid out as (N samples, D dims) instead of disentanglement_lib's (D, N).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import mutual_info_score


def as_2d(array: np.ndarray, name: str) -> np.ndarray:
    """``np.asarray(array)`` checked to be 2-D (N, D); a 1-D array becomes (N, 1)."""
    a = np.asarray(array)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {a.shape}.")
    return a


def check_pair(codes: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``codes`` as float (N, D) and ``factors`` as (N, K) after checking their sample counts agree."""
    codes = as_2d(codes, "codes").astype(np.float64)
    factors = as_2d(factors, "factors")
    if codes.shape[0] != factors.shape[0]:
        raise ValueError(f"codes and factors must have the same number of samples, got {codes.shape[0]} and {factors.shape[0]}.")
    if codes.shape[0] < 2:
        raise ValueError("at least 2 samples are needed.")
    return codes, factors


def histogram_discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """Discretise each code dimension into ``num_bins`` equal-width bins over its own [min, max].

    As disentanglement_lib's ``_histogram_discretize``: per dimension ``d``, the edges are
    ``np.histogram(codes[:, d], num_bins)[1]`` (``num_bins + 1`` equally spaced edges from the
    minimum to the maximum; a constant dimension gets the range ``[v - 0.5, v + 0.5]``) and the
    bin is ``np.digitize(codes[:, d], edges[:-1])``, an integer in ``1..num_bins`` (the maximum
    falls into the last bin).

    Args:
        codes: (N, D) array.
        num_bins: number of bins per dimension.

    Returns:
        (N, D) int64 bin ids.
    """
    codes = as_2d(codes, "codes")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
    out = np.zeros(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram(codes[:, d], num_bins)[1]
        out[:, d] = np.digitize(codes[:, d], edges[:-1])
    return out


def discrete_mutual_info(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mutual information matrix (in nats) between the columns of two discrete arrays.

    ``m[i, j] = I(a[:, i]; b[:, j])`` from the empirical joint distribution
    (``sklearn.metrics.mutual_info_score``), as disentanglement_lib's ``discrete_mutual_info``.

    Args:
        a: (N, D) discrete array (e.g. discretised codes).
        b: (N, K) discrete array (e.g. factor indices).

    Returns:
        (D, K) float64 matrix.
    """
    a, b = as_2d(a, "a"), as_2d(b, "b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of rows, got {a.shape[0]} and {b.shape[0]}.")
    m = np.zeros((a.shape[1], b.shape[1]), dtype=np.float64)
    for i in range(a.shape[1]):
        for j in range(b.shape[1]):
            m[i, j] = mutual_info_score(b[:, j], a[:, i])
    return m


def discrete_entropy(factors: np.ndarray) -> np.ndarray:
    """Empirical entropy (in nats) of each column of a discrete (N, K) array: ``H_j = I(f_j; f_j)``."""
    factors = as_2d(factors, "factors")
    return np.array([mutual_info_score(factors[:, j], factors[:, j]) for j in range(factors.shape[1])], dtype=np.float64)
