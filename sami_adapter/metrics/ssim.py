"""Structural similarity (SSIM) of image pairs, for reconstruction quality."""

from __future__ import annotations

import numpy as np


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(r**2) / (2.0 * sigma**2))
    w = np.outer(g, g)
    return w / w.sum()


def _filter_valid(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Correlate (N, H, W) with a (k, k) window over the positions where it fits entirely ('valid')."""
    k = window.shape[0]
    views = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(-2, -1))
    return np.einsum("nhwij,ij->nhw", views, window)


def ssim(images: np.ndarray, references: np.ndarray, data_range: float = 1.0, window_size: int = 7, sigma: float = 1.5) -> np.ndarray:
    """Mean SSIM of each image against its reference (Wang, Bovik, Sheikh & Simoncelli 2004).

    Definition: with local statistics taken under a normalised Gaussian window (``window_size`` x
    ``window_size``, standard deviation ``sigma``) at every position where the window fits inside the
    image (no padding), means ``mu_x, mu_y``, variances ``s_x², s_y²`` and covariance ``s_xy``,

        SSIM(x, y) = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x² + mu_y² + C1)(s_x² + s_y² + C2)),

    ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²``, ``L = data_range``; the image's score is the mean over
    positions and channels. Identical images score 1; the score is symmetric and at most 1.
    The 7-pixel window (scikit-image's default size) fits the 16 px images this project uses;
    the paper's 11-pixel window needs images of at least 11 px.

    Args:
        images, references: (N, C, H, W) or (N, H, W) arrays (or tensors) in a range of width ``data_range``.
        data_range: the width of the pixel range (1 for [0, 1], 2 for [-1, 1]).
        window_size: side of the Gaussian window; at most the image side.
        sigma: the window's standard deviation, in pixels.

    Returns:
        (N,) SSIM per image.
    """
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    if hasattr(references, "detach"):
        references = references.detach().cpu().numpy()
    x, y = np.asarray(images, dtype=np.float64), np.asarray(references, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images and references must have the same shape, got {x.shape} and {y.shape}.")
    if x.ndim == 3:
        x, y = x[:, None], y[:, None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W) or (N, H, W), got shape {x.shape}.")
    n, c, h, w = x.shape
    if window_size > min(h, w):
        raise ValueError(f"window_size {window_size} is larger than the images ({h}x{w}); pass a smaller window_size.")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}.")
    win = _gaussian_window(window_size, sigma)
    x, y = x.reshape(n * c, h, w), y.reshape(n * c, h, w)
    mu_x, mu_y = _filter_valid(x, win), _filter_valid(y, win)
    s_xx = _filter_valid(x * x, win) - mu_x**2
    s_yy = _filter_valid(y * y, win) - mu_y**2
    s_xy = _filter_valid(x * y, win) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    score = ((2 * mu_x * mu_y + c1) * (2 * s_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (s_xx + s_yy + c2))
    return score.reshape(n, c, -1).mean(axis=(1, 2))
