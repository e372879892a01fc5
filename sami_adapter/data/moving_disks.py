"""``moving_disks``: short videos of one disk moving along a smooth random trajectory.

Each sequence is drawn once from the seed:

* start position uniform in the ``disks`` position range ``[0.25 R, 0.75 R]`` (both axes);
* a heading uniform in ``[0, 2 pi)``, turning at a constant rate drawn from
  ``[-MAX_TURN, MAX_TURN]`` radians per frame (straight to gently curving paths);
* a speed per sequence, uniform in ``SPEED_RANGE * R`` pixels per frame;
* the path is folded back into the position range by reflection off its borders, so every step
  keeps its length and the disk stays inside the frame exactly like ``disks``;
* a start radius uniform in the ``disks`` radius range ``[0.08 R, 0.22 R]``, changing linearly by
  a rate from ``[-MAX_RADIUS_RATE, MAX_RADIUS_RATE] * R`` per frame (reflected off the range too);
* a brightness per sequence, uniform in ``[0.5, 1]``, constant over the frames.

Frames are rendered with :func:`sami_adapter.data.disks.render_disks`; per-frame values are
``(x, y, radius, brightness)`` in pixels (brightness in pixel-value units), as in ``disks``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .disks import BRIGHTNESS_RANGE, POSITION_RANGE, RADIUS_RANGE, render_disks

SPEED_RANGE = (0.01, 0.04)
MAX_TURN = 0.3
MAX_RADIUS_RATE = 0.008


def reflect_into(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Fold ``values`` into ``[low, high]`` by mirror reflection off both borders (a triangle wave)."""
    width = high - low
    folded = np.mod(values - low, 2.0 * width)
    return low + np.where(folded > width, 2.0 * width - folded, folded)


class MovingDisks(Dataset):
    """Videos of one disk moving smoothly (see module docstring).

    Args:
        num_sequences: how many videos the dataset holds (rendered lazily).
        num_frames: frames per video ``T`` (>= 2).
        resolution: frame side ``R`` in pixels.
        seed: seed of the trajectory draw; the same seed always gives the same videos.
    """

    factor_names = ("x", "y", "radius", "brightness")
    num_channels = 1

    def __init__(self, num_sequences: int = 2000, num_frames: int = 8, resolution: int = 32, seed: int = 0):
        if num_sequences < 1:
            raise ValueError(f"num_sequences must be >= 1, got {num_sequences}.")
        if num_frames < 2:
            raise ValueError(f"num_frames must be >= 2, got {num_frames}.")
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {resolution}.")
        self.num_sequences = int(num_sequences)
        self.num_frames = int(num_frames)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.factor_values = self.sample_values(self.num_sequences, np.random.default_rng(self.seed))

    def sample_values(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``num`` trajectories: per-frame values (num, T, 4) = (x, y, radius, brightness), float64."""
        res, frames = self.resolution, self.num_frames
        path = self.sample_paths(num, rng, POSITION_RANGE[0] * res, POSITION_RANGE[1] * res)
        r_lo, r_hi = RADIUS_RANGE[0] * res, RADIUS_RANGE[1] * res
        radius0 = rng.uniform(r_lo, r_hi, size=(num, 1))
        radius_rate = rng.uniform(-MAX_RADIUS_RATE * res, MAX_RADIUS_RATE * res, size=(num, 1))
        brightness = rng.uniform(*BRIGHTNESS_RANGE, size=(num, 1))

        radius = reflect_into(radius0 + radius_rate * np.arange(frames), r_lo, r_hi)
        return np.concatenate(
            [path, radius[..., None], np.broadcast_to(brightness[:, None, :], (num, frames, 1))], axis=-1
        ).astype(np.float64)

    def sample_paths(self, num: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
        """Disk centres (num, T, 2) in pixels: a start uniform in ``[lo, hi]^2``, a heading turning at a
        constant rate, a constant speed, folded back into the square by reflection."""
        res, frames = self.resolution, self.num_frames
        start = rng.uniform(lo, hi, size=(num, 2))
        heading = rng.uniform(0.0, 2.0 * np.pi, size=(num, 1))
        turn = rng.uniform(-MAX_TURN, MAX_TURN, size=(num, 1))
        speed = rng.uniform(SPEED_RANGE[0] * res, SPEED_RANGE[1] * res, size=(num, 1))
        angles = heading + turn * np.arange(frames - 1)  # (num, T-1) heading of each step
        step_xy = speed[..., None] * np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (num, T-1, 2)
        path = np.concatenate([start[:, None, :], start[:, None, :] + np.cumsum(step_xy, axis=1)], axis=1)
        return reflect_into(path, lo, hi)

    def render(self, values: np.ndarray) -> torch.Tensor:
        """Videos (N, T, 1, R, R) in [-1, 1] for per-frame values (N, T, 4)."""
        values = np.asarray(values)
        if values.ndim != 3 or values.shape[2] != 4:
            raise ValueError(f"values must have shape (N, T, 4), got {values.shape}.")
        n, t = values.shape[:2]
        frames = render_disks(values.reshape(n * t, 4), self.resolution)
        return frames.view(n, t, 1, self.resolution, self.resolution)

    def sample(self, num: int, rng: np.random.Generator) -> Tuple[torch.Tensor, np.ndarray]:
        """Fresh videos: (num, T, 1, R, R) and their values (num, T, 4)."""
        values = self.sample_values(num, rng)
        return self.render(values), values

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {
            "pixel_values": self.render(self.factor_values[i : i + 1])[0],
            "factor_values": torch.from_numpy(self.factor_values[i].copy()),
        }

    def arrays(self, batch_size: int = 512) -> Tuple[np.ndarray, np.ndarray]:
        """All videos (N, T, 1, R, R) float32 and per-frame values (N, T, 4)."""
        videos = [
            self.render(self.factor_values[s : s + batch_size]).numpy() for s in range(0, self.num_sequences, batch_size)
        ]
        return np.concatenate(videos), self.factor_values.copy()


class MovingBackgroundDisks(MovingDisks):
    """Videos of ``background_disks``: the disk moves as in :class:`MovingDisks` (inside ``[r, R - r]``)
    while the background fades linearly between two intensities drawn from ``[0.2, 0.8]``.

    Per-frame values are ``(x, y, background)``: x, y in pixels, background in [0, 1].
    """

    factor_names = ("x", "y", "background")

    def sample_values(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``num`` videos: per-frame values (num, T, 3) = (x, y, background), float64."""
        from .background_disks import BACKGROUND_RANGE, disk_radius

        r = disk_radius(self.resolution)
        path = self.sample_paths(num, rng, r, self.resolution - r)
        ends = rng.uniform(*BACKGROUND_RANGE, size=(num, 2))
        fade = np.linspace(0.0, 1.0, self.num_frames)
        background = ends[:, :1] + (ends[:, 1:] - ends[:, :1]) * fade  # (num, T)
        return np.concatenate([path, background[..., None]], axis=-1).astype(np.float64)

    def render(self, values: np.ndarray) -> torch.Tensor:
        """Videos (N, T, 1, R, R) in [-1, 1] for per-frame values (N, T, 3)."""
        from .background_disks import render_background_disks

        values = np.asarray(values)
        if values.ndim != 3 or values.shape[2] != 3:
            raise ValueError(f"values must have shape (N, T, 3) = (x, y, background), got {values.shape}.")
        n, t = values.shape[:2]
        return render_background_disks(values.reshape(n * t, 3), self.resolution).view(n, t, 1, self.resolution, self.resolution)
