"""Linear decodability: R² of a least-squares fit of each factor from the codes."""

from __future__ import annotations

import numpy as np


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
