"""A small base class for procedural datasets with exact ground-truth factors.

Every dataset here is a generative process ``factors -> image`` that we run ourselves, so the
labels are exact, the data are deterministic by seed and any resolution can be rendered.
Each factor is continuous (``factor_values``) and also has a discrete index in
``range(factor_sizes[k])`` (``factors``), which is what the disentanglement metrics consume.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = ("train", "test")


def stratified_holdout(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the held-out ("test") samples: ``round(test_fraction * n_c)`` members of each class ``c``.

    The classes are taken in sorted order and each class's members are drawn with one generator
    seeded by ``seed``, so the split depends on the labels and the seed only. A class with too few
    members for a rounded share (one member at a fifth) stays wholly on the training side.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    mask = np.zeros(y.shape[0], dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        mask[rng.permutation(members)[: int(round(test_fraction * members.size))]] = True
    return mask


class FactorDataset(Dataset):
    """Base class: ``num_samples`` observations drawn once from ``seed``.

    Subclasses define ``factor_names``, ``factor_sizes``, ``num_channels``,
    ``values_from_indices(indices, rng)`` and ``render(values)``.

    Args:
        num_samples: how many observations the dataset holds (they are rendered lazily).
        resolution: image side in pixels.
        seed: seed of the factor draw; the same seed always gives the same data.
        split: "train" or "test". Procedural draws are fresh for every seed, so the split changes nothing
            here; a finite set of real images (``digits``) holds a fixed set of images out for "test".
    """

    factor_names: Tuple[str, ...] = ()
    factor_sizes: Tuple[int, ...] = ()
    num_channels: int = 1

    def __init__(self, num_samples: int = 10000, resolution: int = 32, seed: int = 0, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        self.split = split
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {resolution}.")
        self.num_samples = int(num_samples)
        self.resolution = int(resolution)
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        self.factor_indices, self.factor_values = self.sample_factors(self.num_samples, rng)

    # -- the generative process -------------------------------------------------------------
    @property
    def num_factors(self) -> int:
        return len(self.factor_sizes)

    def factor_ranges(self) -> Sequence[Tuple[float, float]]:
        """``(low, high)`` of each continuous factor at this resolution (for the default :meth:`values_from_indices`)."""
        raise NotImplementedError

    def values_from_indices(self, indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Continuous factor values (N, K) for integer indices (N, K): by default each drawn uniformly inside
        its bin of ``factor_sizes[k]`` equal bins of :meth:`factor_ranges`."""
        return np.stack([uniform_in_bins(indices[:, k], size, lo, hi, rng)
                         for k, (size, (lo, hi)) in enumerate(zip(self.factor_sizes, self.factor_ranges()))], axis=1)

    def render(self, values: np.ndarray) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] for factor values (N, K)."""
        raise NotImplementedError

    def sample_factors(
        self,
        num: int,
        rng: np.random.Generator,
        fixed_factor: Optional[int] = None,
        fixed_index: Optional[int] = None,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Draw ``num`` factor settings: indices (num, K) int64 and values (num, K) float64.

        With ``fixed_factor=k`` every draw shares factor ``k`` (index ``fixed_index``, random when
        None) and, for continuous factors, the same continuous value: the sampling the FactorVAE
        score needs.
        """
        indices = np.stack([rng.integers(0, size, num) for size in self.factor_sizes], axis=1)
        if fixed_factor is not None:
            if not 0 <= fixed_factor < self.num_factors:
                raise ValueError(f"fixed_factor must be in [0, {self.num_factors}), got {fixed_factor}.")
            index = rng.integers(0, self.factor_sizes[fixed_factor]) if fixed_index is None else fixed_index
            indices[:, fixed_factor] = index
        values = self.values_from_indices(indices, rng)
        if fixed_factor is not None:
            values[:, fixed_factor] = values[0, fixed_factor]
        return indices.astype(np.int64), values

    def sample(
        self, num: int, rng: np.random.Generator, fixed_factor: Optional[int] = None, fixed_index: Optional[int] = None
    ) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Fresh observations: images (num, C, H, W), indices (num, K), values (num, K)."""
        indices, values = self.sample_factors(num, rng, fixed_factor, fixed_index)
        return self.render(values), indices, values

    # -- Dataset / array access -------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        image = self.render(self.factor_values[i : i + 1])[0]
        return {
            "pixel_values": image,
            "factors": torch.from_numpy(self.factor_indices[i]),
            "factor_values": torch.from_numpy(self.factor_values[i]),
        }

    def arrays(self, batch_size: int = 4096) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All observations as arrays: images (N, C, H, W) float32, indices (N, K), values (N, K)."""
        images = [
            self.render(self.factor_values[s : s + batch_size]).numpy() for s in range(0, self.num_samples, batch_size)
        ]
        return np.concatenate(images), self.factor_indices.copy(), self.factor_values.copy()


def uniform_in_bins(indices: np.ndarray, size: int, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """A continuous value drawn uniformly inside bin ``indices`` of ``size`` equal bins of [low, high]."""
    width = (high - low) / size
    return low + (indices + rng.random(indices.shape)) * width


def pixel_centres(resolution: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (y, x), each (1, H, W), in pixel units."""
    coords = torch.arange(resolution, dtype=torch.float32, device=device) + 0.5
    return coords.view(1, -1, 1), coords.view(1, 1, -1)


