"""``background_disks``: the SAMI paper's synthetic set, one white disk on a grey background.

Three factors that live at different noise scales: the disk's position (x, y) is a small, sharp
feature that drowns in noise early, the background intensity is spread over every pixel and
survives much stronger noise. That gap is what the paper's mechanism (each latent dimension takes
the factor whose characteristic noise scale it matches) needs to separate factors.

=========== ============================================= =====
factor      range (at resolution R, disk radius r = 5R/32)  bins
=========== ============================================= =====
x           [r, R - r] pixels (the disk is always inside)   16
y           [r, R - r] pixels                               16
background  [0.2, 0.8] (intensity in [0, 1])                8
=========== ============================================= =====

Pixel intensity is ``b + (1 - b) * coverage`` (a white disk, value 1.0, over background ``b``),
then mapped to [-1, 1]. Coverage is the same anti-aliasing as ``disks``:
``clip(r - d + 1/2, 0, 1)`` with ``d`` the distance from the pixel centre to the disk centre.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from .base import FactorDataset, pixel_centres

RADIUS_FRACTION = 5.0 / 32.0
BACKGROUND_RANGE = (0.2, 0.8)


def disk_radius(resolution: int) -> float:
    """The fixed disk radius in pixels: 5 px at 32 px, 2.5 px at 16 px."""
    return RADIUS_FRACTION * resolution


def render_background_disks(values: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """Render from values (N, 3) = (x, y, background); x, y in pixels, background in [0, 1].

    Returns (N, 1, R, R) in [-1, 1].
    """
    v = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"background_disks values must have shape (N, 3) = (x, y, background), got {tuple(v.shape)}.")
    yy, xx = pixel_centres(resolution)
    x, y, b = (v[:, k].view(-1, 1, 1) for k in range(3))
    coverage = (disk_radius(resolution) - torch.sqrt((xx - x) ** 2 + (yy - y) ** 2) + 0.5).clamp(0.0, 1.0)
    intensity = b + (1.0 - b) * coverage
    return (2.0 * intensity - 1.0).unsqueeze(1)


class BackgroundDisks(FactorDataset):
    """One white disk of fixed radius on a uniform grey background; factors x, y, background."""

    factor_names = ("x", "y", "background")
    factor_sizes = (16, 16, 8)
    num_channels = 1

    def factor_ranges(self):
        r = disk_radius(self.resolution)
        return [(r, self.resolution - r), (r, self.resolution - r), BACKGROUND_RANGE]

    def render(self, values: np.ndarray) -> torch.Tensor:
        return render_background_disks(values, self.resolution)


def background_disk_fit(images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Measure (x, y, background) of background_disks images, and how well one such disk explains each.

    The background is the median pixel (the disk covers under 8% of the frame); the disk's
    position is the centroid of the excess ``I - b`` over the background; the fit re-renders that
    disk and reports the RMSE in [0, 1] intensity units (``rmse``). A clean image leaves only the
    anti-aliasing mismatch (~0.01-0.02); a second blob, noise or a missing disk leaves much more.
    """
    intensity = ((images.float().clamp(-1, 1) + 1.0) / 2.0)[:, 0]
    res = intensity.shape[-1]
    background = intensity.flatten(1).median(dim=1).values
    excess = (intensity - background.view(-1, 1, 1)).clamp(min=0.0)
    # Pixels barely above the background are noise, not disk; they would pull the centroid to the centre.
    excess = torch.where(excess < 0.1 * (1.0 - background).view(-1, 1, 1), torch.zeros_like(excess), excess)
    yy, xx = pixel_centres(res, device=intensity.device)
    mass = excess.sum(dim=(1, 2)).clamp(min=1e-6)
    x = (excess * xx).sum(dim=(1, 2)) / mass
    y = (excess * yy).sum(dim=(1, 2)) / mass
    fitted = render_background_disks(torch.stack([x, y, background], dim=1).cpu(), res).to(images.device)
    rmse = (((fitted - images.float().clamp(-1, 1)) / 2.0) ** 2).mean(dim=(1, 2, 3)).sqrt()
    return {"x": x, "y": y, "background": background, "rmse": rmse}


def clean_background_disk_fraction(images: torch.Tensor, max_rmse: float = 0.06) -> tuple[float, torch.Tensor]:
    """Share of images that hold one clean background_disks image (fit RMSE below ``max_rmse``), and the verdicts."""
    clean = background_disk_fit(images)["rmse"] < max_rmse
    return clean.float().mean().item(), clean
