"""``disks``: one anti-aliased grey disk on a black background.

Factors (continuous, each with a discrete index for the metrics):

=========== ======================================= =====
factor      range (in pixels at resolution R)       bins
=========== ======================================= =====
x           [0.25 R, 0.75 R]                         16
y           [0.25 R, 0.75 R]                         16
radius      [0.08 R, 0.22 R]                         8
brightness  [0.5, 1.0] (pixel value of the disk)     8
=========== ======================================= =====

The disk never leaves the frame (0.75 R + 0.22 R < R), so its image moments measure it exactly.
Anti-aliasing uses the pixel's coverage approximated by ``clip(r - d + 1/2, 0, 1)``, with ``d``
the distance from the pixel centre to the disk centre.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from .base import FactorDataset, pixel_centres

POSITION_RANGE = (0.25, 0.75)
RADIUS_RANGE = (0.08, 0.22)
BRIGHTNESS_RANGE = (0.5, 1.0)
BACKGROUND_THRESHOLD = 0.1


def render_disks(values: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """Render disks from values (N, 4) = (x, y, radius, brightness) in pixels; returns (N, 1, R, R) in [-1, 1]."""
    v = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    if v.ndim != 2 or v.shape[1] != 4:
        raise ValueError(f"disk values must have shape (N, 4) = (x, y, radius, brightness), got {tuple(v.shape)}.")
    yy, xx = pixel_centres(resolution)
    x, y, r, b = (v[:, k].view(-1, 1, 1) for k in range(4))
    distance = torch.sqrt((xx - x) ** 2 + (yy - y) ** 2)
    coverage = (r - distance + 0.5).clamp(0.0, 1.0)
    return (2.0 * b * coverage - 1.0).unsqueeze(1)


class Disks(FactorDataset):
    """One anti-aliased disk; factors x, y, radius, brightness (see module docstring)."""

    factor_names = ("x", "y", "radius", "brightness")
    factor_sizes = (16, 16, 8, 8)
    num_channels = 1

    def factor_ranges(self):
        res = self.resolution
        position = (POSITION_RANGE[0] * res, POSITION_RANGE[1] * res)
        return [position, position, (RADIUS_RANGE[0] * res, RADIUS_RANGE[1] * res), BRIGHTNESS_RANGE]

    def render(self, values: np.ndarray) -> torch.Tensor:
        return render_disks(values, self.resolution)


def disk_moments(images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Measure a disk from image moments.

    Images (N, 1, H, W) in [-1, 1] are mapped to intensity ``I = (img + 1) / 2`` (negatives
    clipped, and values below ``BACKGROUND_THRESHOLD`` set to 0). With mass ``m = sum I``: ``x, y`` are the intensity centroid; for a uniform disk of
    radius ``r`` the mean squared distance to the centre is ``r^2 / 2``, so
    ``radius = sqrt(2 (var_x + var_y))``; ``brightness = m / (pi radius^2)``.
    """
    intensity = ((images.float() + 1.0) / 2.0).clamp(min=0.0)[:, 0]
    # Faint background noise over hundreds of pixels would dominate the second moment, so
    # intensities below BACKGROUND_THRESHOLD count as background.
    intensity = torch.where(intensity < BACKGROUND_THRESHOLD, torch.zeros_like(intensity), intensity)
    res = intensity.shape[-1]
    yy, xx = pixel_centres(res, device=intensity.device)
    mass = intensity.sum(dim=(1, 2)).clamp(min=1e-6)
    x = (intensity * xx).sum(dim=(1, 2)) / mass
    y = (intensity * yy).sum(dim=(1, 2)) / mass
    var = (intensity * ((xx - x.view(-1, 1, 1)) ** 2 + (yy - y.view(-1, 1, 1)) ** 2)).sum(dim=(1, 2)) / mass
    # A pixel-coverage disk of radius r has second moment r^2/2 + 1/12 per axis *2 (pixel blur);
    # the 1/6 correction keeps small disks unbiased.
    radius = torch.sqrt((2.0 * (var - 1.0 / 6.0)).clamp(min=1e-6))
    brightness = mass / (np.pi * radius**2)
    return {"x": x, "y": y, "radius": radius, "brightness": brightness, "mass": mass}


def clean_disk_fraction(images: torch.Tensor, max_rmse: float = 0.06) -> tuple[float, torch.Tensor]:
    """Share of images that hold one clean disk, and the per-image verdicts.

    The check: fit a disk to the image by its moments (:func:`disk_moments`), re-render that disk,
    and call the image clean when the RMSE between the two (in [0, 1] intensity units) is below
    ``max_rmse``. Background noise, a second blob, a ring or a non-round shape all leave a large
    residual; a true disk of any size leaves ~0.02 (anti-aliasing mismatch only).
    """
    m = disk_moments(images)
    values = torch.stack([m["x"], m["y"], m["radius"], m["brightness"].clamp(0, 1.5)], dim=1)
    fitted = render_disks(values, images.shape[-1])
    rmse = (((fitted - images.float().clamp(-1, 1)) / 2.0) ** 2).mean(dim=(1, 2, 3)).sqrt()
    clean = rmse < max_rmse
    return clean.float().mean().item(), clean
