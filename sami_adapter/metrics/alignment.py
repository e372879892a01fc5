"""Factor alignment: how strongly each code dimension tracks each ground-truth factor."""

from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np


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
