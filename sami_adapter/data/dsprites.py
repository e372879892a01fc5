"""``dsprites``: the dSprites generative process, rendered procedurally at any resolution.

dSprites (Matthey et al. 2017) shows one white sprite on black. Its five factors are discrete
grids, reproduced here (the grid value is the factor value):

=========== ============================================ =====
factor      values                                        size
=========== ============================================ =====
shape       0 square, 1 ellipse, 2 heart                   3
scale       ``linspace(0.5, 1, 6)``                        6
orientation ``linspace(0, 2 pi, 40)`` (radians)            40
x           ``linspace(0, 1, 32)``                         32
y           ``linspace(0, 1, 32)``                         32
=========== ============================================ =====

The original files number the shapes 1, 2, 3; here the shape value equals its index. As in the
original, the orientation grid includes both 0 and 2 pi and the square (90 degrees) and the
ellipse (180 degrees) are symmetric, so some different indices give the same image.

Geometry at resolution ``R`` (pixels, y pointing down): a position ``p`` in [0, 1] puts the
sprite centre at ``(0.2 + 0.6 p) R``. At scale 1 the square has half-side ``0.1 R``, the ellipse
semi-axes ``0.15 R`` x ``0.075 R`` and the heart is the region ``(u^2 + v^2 - 1)^3 - u^2 v^3 <= 0``
with ``(u, v)`` in units of ``0.1 R``; every sprite stays within ``0.15 R`` of its centre, hence
inside the frame. Orientation rotates the sprite counter-clockwise as seen on screen.

Each shape is an implicit function of pixel coordinates (translated, rotated and scaled into the
sprite's frame, then tested for "inside"). Anti-aliasing: the inside test runs on a
``supersample x supersample`` grid of sub-pixel points per pixel, averaged. Only a window of
about ``0.3 R`` pixels around each sprite is evaluated (the rest of the frame is black), which
renders 4096 images at 32 px in about half a second on two CPU cores.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import FactorDataset

SHAPES = ("square", "ellipse", "heart")
SCALES = np.linspace(0.5, 1.0, 6)
ORIENTATIONS = np.linspace(0.0, 2.0 * math.pi, 40)
POSITIONS = np.linspace(0.0, 1.0, 32)
POSITION_MARGIN = 0.2
SQUARE_HALF_SIDE = 0.1
ELLIPSE_AXES = (0.15, 0.075)
HEART_UNIT = 0.1
SPRITE_RADIUS = 0.15  # every sprite lies within this distance (units of R) of its centre


def _inside(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside test for ``shape`` on sprite-frame coordinates in units of ``R`` (v points up)."""
    if shape == 0:
        return torch.maximum(u.abs(), v.abs()) <= SQUARE_HALF_SIDE
    if shape == 1:
        return (u / ELLIPSE_AXES[0]) ** 2 + (v / ELLIPSE_AXES[1]) ** 2 <= 1.0
    if shape == 2:
        u = u / HEART_UNIT
        v = v / HEART_UNIT
        q = u * u + v * v - 1.0
        return q * q * q - u * u * v * v * v <= 0.0
    raise ValueError(f"unknown shape id {shape}; expected 0 ({SHAPES[0]}), 1 ({SHAPES[1]}) or 2 ({SHAPES[2]}).")


def render_sprites(values: np.ndarray | torch.Tensor, resolution: int, supersample: int = 4, chunk: int = 1024) -> torch.Tensor:
    """Render dSprites images from factor values.

    Args:
        values: (N, 5) = (shape id, scale, orientation in radians, x, y) with x, y in [0, 1].
        resolution: image side ``R`` in pixels.
        supersample: sub-pixel samples per pixel side (anti-aliasing); 1 gives a hard mask.
        chunk: images rendered at once (bounds memory).

    Returns:
        Images (N, 1, R, R) in [-1, 1]: -1 background, 1 fully covered pixels.
    """
    v = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    if v.ndim != 2 or v.shape[1] != 5:
        raise ValueError(f"sprite values must have shape (N, 5) = (shape, scale, orientation, x, y), got {tuple(v.shape)}.")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}.")
    res, s = int(resolution), int(supersample)
    # Every sprite lies within SPRITE_RADIUS * R of its centre, so only a W x W window around
    # the centre is rendered and then pasted into a black frame.
    window = min(res, math.ceil(2 * SPRITE_RADIUS * res) + 4)
    sub = (torch.arange(window * s, dtype=torch.float32) + 0.5) / s  # sub-pixel offsets in the window
    pixels = torch.arange(window)
    shapes = v[:, 0].round().long()
    if shapes.numel() and (shapes.min() < 0 or shapes.max() >= len(SHAPES)):
        raise ValueError(f"shape ids must be in [0, {len(SHAPES)}), got {shapes.unique().tolist()}.")
    out = torch.full((v.shape[0], res * res), -1.0)
    for start in range(0, v.shape[0], chunk):
        block = v[start : start + chunk]
        block_shapes = shapes[start : start + chunk]
        for shape in range(len(SHAPES)):
            idx = (block_shapes == shape).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            n = idx.numel()
            scale, angle, px, py = (block[idx, k].view(-1, 1, 1) for k in range(1, 5))
            cx = (POSITION_MARGIN + (1.0 - 2.0 * POSITION_MARGIN) * px) * res  # centre in pixels
            cy = (POSITION_MARGIN + (1.0 - 2.0 * POSITION_MARGIN) * py) * res
            ox = torch.floor(cx - window / 2).clamp(0, res - window)  # window's top-left pixel
            oy = torch.floor(cy - window / 2).clamp(0, res - window)
            # Sample points relative to the centre, in units of R (screen y points down, the
            # sprite frame's v points up).
            dx = (ox + sub.view(1, 1, -1) - cx) / res
            dy = (cy - oy - sub.view(1, -1, 1)) / res
            cos, sin = torch.cos(angle), torch.sin(angle)
            # Rotate the point by -angle (the sprite by +angle), then undo the scale.
            u = (cos * dx + sin * dy) / scale
            w = (cos * dy - sin * dx) / scale
            mask = _inside(shape, u, w).float()
            coverage = mask.view(n, window, s, window, s).mean(dim=(2, 4))
            flat = (oy.long() + pixels.view(1, -1, 1)) * res + (ox.long() + pixels.view(1, 1, -1))
            out[start + idx] = out[start + idx].scatter(1, flat.view(n, -1), (2.0 * coverage - 1.0).view(n, -1))
    return out.view(-1, 1, res, res)


class DSprites(FactorDataset):
    """dSprites, rendered procedurally: factors shape, scale, orientation, x, y (see module docstring).

    Args:
        num_samples: how many observations the dataset holds (rendered lazily).
        resolution: image side in pixels (the original is 64; default 32).
        seed: seed of the factor draw.
        supersample: anti-aliasing sub-samples per pixel side.
    """

    factor_names = ("shape", "scale", "orientation", "x", "y")
    factor_sizes = (3, 6, 40, 32, 32)
    num_channels = 1
    grids = (np.arange(3, dtype=np.float64), SCALES, ORIENTATIONS, POSITIONS, POSITIONS)

    def __init__(self, num_samples: int = 10000, resolution: int = 32, seed: int = 0, supersample: int = 4, split: str = "train"):
        self.supersample = int(supersample)
        super().__init__(num_samples=num_samples, resolution=resolution, seed=seed, split=split)

    def values_from_indices(self, indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Grid values (N, 5) for indices (N, 5); ``rng`` is unused (the factors are discrete)."""
        return np.stack([grid[indices[:, k]] for k, grid in enumerate(self.grids)], axis=1).astype(np.float64)

    def render(self, values: np.ndarray) -> torch.Tensor:
        """Images (N, 1, R, R) in [-1, 1] for values (N, 5)."""
        return render_sprites(values, self.resolution, self.supersample)
