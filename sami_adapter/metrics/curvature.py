"""Trajectory curvature: how much paths turn from one step to the next."""

from __future__ import annotations

import numpy as np


def trajectory_curvature(sequences: np.ndarray, eps: float = 1e-12) -> float:
    """Mean turning angle, in degrees, of trajectories.

    Definition: for each sequence ``x_1..x_T`` (extra dimensions flattened, so frames of pixels
    work) take the displacements ``d_t = x_{t+1} - x_t`` and, for each pair of successive
    displacements, the angle ``arccos(<d_t, d_{t+1}> / (|d_t| |d_{t+1}|))``. The score is the
    mean over all such pairs in all sequences. Pairs with a displacement of norm ``<= eps`` have
    no direction and are skipped. A straight path scores 0, a path turning at right angles 90,
    a high-dimensional random walk about 90 and a path that reverses 180.

    Args:
        sequences: (N, T, ...) array or tensor, ``T >= 3``; a single (T, ...) path is not accepted
            (add a leading axis).
        eps: displacement norms at or below this are treated as zero.

    Returns:
        Mean angle in degrees; NaN when no pair of non-zero displacements exists.
    """
    if hasattr(sequences, "detach"):
        sequences = sequences.detach().cpu().numpy()
    x = np.asarray(sequences, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"sequences must have shape (N, T, ...), got {x.shape}.")
    x = x.reshape(x.shape[0], x.shape[1], -1)
    if x.shape[1] < 3:
        raise ValueError(f"need at least 3 steps per sequence, got T={x.shape[1]}.")
    d = np.diff(x, axis=1)
    norms = np.linalg.norm(d, axis=-1)
    a, b = d[:, :-1], d[:, 1:]
    na, nb = norms[:, :-1], norms[:, 1:]
    valid = (na > eps) & (nb > eps)
    if not valid.any():
        return float("nan")
    cos = (a * b).sum(axis=-1)[valid] / (na[valid] * nb[valid])
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).mean())
