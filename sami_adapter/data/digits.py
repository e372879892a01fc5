"""``digits``: real handwritten digits (the UCI set that scikit-learn ships inside its wheel).

1797 scans of handwritten digits, 8x8 pixels, 17 grey levels (0-16), ten classes, from
``sklearn.datasets.load_digits`` (nothing is downloaded; scikit-learn is the ``eval`` extra).
Unlike the procedural sets this is a finite set of real images, so it has a **fixed held-out
split** that every tool uses: ``split="train"`` (1438 images) and ``split="test"`` (359), drawn once,
stratified by class, with a seed of its own (not the dataset's ``seed``), so a model trained on
``train`` never sees a ``test`` image whatever seeds the tools pass.

**Resampling.** Each 8x8 scan is scaled to [0, 1] (level / 16), upsampled to ``resolution`` with
PIL's bicubic filter on a float image (mode ``F``), clipped to [0, 1] (bicubic overshoots at strokes'
edges) and mapped to [-1, 1], as every dataset here is. Ink is bright (1) on a dark background (-1).

**Factors.** The class label, plus attributes measured on the 8x8 original with intensity weights
``w = level / 16`` at pixel centres (column ``x``, row ``y``, downwards), so they do not depend on the
resolution; each is a soft factor (a measurement, not a generative parameter):

=========== ===================================================================== =====
factor      definition                                                            bins
=========== ===================================================================== =====
label       the digit class, 0-9                                                  10
ink         mean intensity, ``sum w / 64`` (stroke mass)                           8
slant       ``-cov_w(x, y) / var_w(y)``: horizontal shift per row; > 0 leans right  8
width       ``std_w(x)``, in pixels of the 8x8 grid (second-moment width)          8
height      ``std_w(y)``, likewise                                                 8
=========== ===================================================================== =====

The continuous attributes are binned at the deciles-of-eight (equal-count bins over all 1797 scans),
which is what the discrete metrics (MIG, DCI, ...) read; ``factor_values`` holds the measurements.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..extras import import_extra
from .base import SPLITS, FactorDataset, stratified_holdout

TEST_FRACTION = 0.2
SPLIT_SEED = 20_240_601  # the split's own seed: the same held-out images for every tool and every run
ATTRIBUTE_BINS = 8


def load_digit_scans() -> Tuple[np.ndarray, np.ndarray]:
    """The 1797 raw scans (N, 8, 8) float64 in [0, 16] and their labels (N,) int64, from scikit-learn's bundled copy."""
    bunch = import_extra("sklearn.datasets", "The digits data (scikit-learn ships them)").load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def digit_attributes(scans: np.ndarray) -> Dict[str, np.ndarray]:
    """Ink, slant, width and height (see the module docstring) of 8x8 scans (N, 8, 8) in [0, 16]."""
    w = np.asarray(scans, dtype=np.float64) / 16.0
    n, h, wd = w.shape
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(wd) + 0.5, indexing="ij")
    mass = w.sum(axis=(1, 2)).clip(min=1e-9)
    mx = (w * xs).sum(axis=(1, 2)) / mass
    my = (w * ys).sum(axis=(1, 2)) / mass
    dx, dy = xs[None] - mx[:, None, None], ys[None] - my[:, None, None]
    var_x = (w * dx**2).sum(axis=(1, 2)) / mass
    var_y = (w * dy**2).sum(axis=(1, 2)) / mass
    cov = (w * dx * dy).sum(axis=(1, 2)) / mass
    return {"ink": mass / (h * wd), "slant": -cov / var_y.clip(min=1e-9), "width": np.sqrt(var_x), "height": np.sqrt(var_y)}


def upsample_scans(scans: np.ndarray, resolution: int) -> np.ndarray:
    """Scans (N, 8, 8) in [0, 16] as images (N, 1, R, R) float32 in [-1, 1] (PIL bicubic on float images, clipped)."""
    from PIL import Image

    unit = np.asarray(scans, dtype=np.float32) / 16.0
    if resolution == unit.shape[-1]:
        big = unit
    else:
        big = np.stack([np.asarray(Image.fromarray(s, mode="F").resize((resolution, resolution), Image.BICUBIC)) for s in unit])
    return (2.0 * np.clip(big, 0.0, 1.0) - 1.0)[:, None].astype(np.float32)


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` ("train" or "test"): a fixed class-stratified draw of 20% of each class for "test"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    test_mask = stratified_holdout(labels, TEST_FRACTION, SPLIT_SEED)
    return np.flatnonzero(test_mask if split == "test" else ~test_mask)


@lru_cache(maxsize=4)
def _digits_table(resolution: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 1797 images at ``resolution``, the factor indices (N, 5) and values (N, 5); computed once per resolution."""
    scans, labels = load_digit_scans()
    attrs = digit_attributes(scans)
    values = np.stack([labels.astype(np.float64)] + [attrs[k] for k in Digits.factor_names[1:]], axis=1)
    indices = [labels]
    for k in range(1, values.shape[1]):
        edges = np.quantile(values[:, k], np.linspace(0, 1, ATTRIBUTE_BINS + 1)[1:-1])
        indices.append(np.searchsorted(edges, values[:, k], side="right"))
    images = upsample_scans(scans, resolution)
    images.setflags(write=False)
    return images, np.stack(indices, axis=1).astype(np.int64), values


class Digits(FactorDataset):
    """Real handwritten digits at ``resolution`` px with their class and measured attributes (module docstring).

    Args:
        num_samples: how many images the instance holds (drawn from the split, without replacement
            while the split has enough, so ``Digits(359, split="test")`` is every held-out scan once).
        resolution: image side in pixels (16 and 32 are the documented sizes).
        seed: seed of the draw of the held images; it never changes which images are held out.
        split: "train" (1438 scans) or "test" (359), the fixed held-out split.
    """

    factor_names = ("label", "ink", "slant", "width", "height")
    factor_sizes = (10,) + (ATTRIBUTE_BINS,) * 4
    num_channels = 1

    def __init__(self, num_samples: int = 10000, resolution: int = 16, seed: int = 0, split: str = "train"):
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {resolution}.")
        images, indices, values = _digits_table(int(resolution))
        self._ids = split_indices(indices[:, 0], split)
        self._images, self._indices, self._values = images, indices, values
        super().__init__(num_samples=num_samples, resolution=resolution, seed=seed, split=split)

    @property
    def split_size(self) -> int:
        """How many scans the split holds."""
        return int(self._ids.size)

    def _draw(self, num: int, rng: np.random.Generator, fixed_factor: Optional[int], fixed_index: Optional[int]) -> np.ndarray:
        pool = self._ids
        if fixed_factor is not None:
            if not 0 <= fixed_factor < self.num_factors:
                raise ValueError(f"fixed_factor must be in [0, {self.num_factors}), got {fixed_factor}.")
            index = rng.integers(0, self.factor_sizes[fixed_factor]) if fixed_index is None else fixed_index
            pool = pool[self._indices[pool, fixed_factor] == index]
            if pool.size == 0:
                raise ValueError(f"no {self.split} digit has factor {self.factor_names[fixed_factor]} at bin {index}.")
        return rng.choice(pool, size=num, replace=num > pool.size)

    def sample_factors(self, num, rng, fixed_factor=None, fixed_index=None):
        """Factor indices (num, K) and values (num, K) of ``num`` scans drawn from the split."""
        ids = self._draw(num, rng, fixed_factor, fixed_index)
        return self._indices[ids].copy(), self._values[ids].copy()

    def sample(self, num, rng, fixed_factor=None, fixed_index=None):
        """Images (num, 1, R, R) in [-1, 1], factor indices and values of ``num`` scans drawn from the split."""
        ids = self._draw(num, rng, fixed_factor, fixed_index)
        return torch.from_numpy(self._images[ids].copy()), self._indices[ids].copy(), self._values[ids].copy()

    def _held_ids(self) -> np.ndarray:
        # The same draw FactorDataset.__init__ made for factor_indices / factor_values.
        if not hasattr(self, "_held"):
            self._held = self._draw(self.num_samples, np.random.default_rng(self.seed), None, None)
        return self._held

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        j = self._held_ids()[i]
        return {
            "pixel_values": torch.from_numpy(self._images[j].copy()),
            "factors": torch.from_numpy(self._indices[j].copy()),
            "factor_values": torch.from_numpy(self._values[j].copy()),
        }

    def arrays(self, batch_size: int = 4096):
        """The held images (N, 1, R, R) float32, factor indices (N, K) and values (N, K)."""
        ids = self._held_ids()
        return self._images[ids].copy(), self._indices[ids].copy(), self._values[ids].copy()

    def render(self, values):
        raise NotImplementedError("digits are real scans, not rendered from factors: draw them with sample() or arrays().")


def digit_split(split: str, resolution: int = 16) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every scan of ``split`` once, in a fixed order: images (N, 1, R, R) in [-1, 1], factor indices, factor values."""
    images, indices, values = _digits_table(int(resolution))
    ids = split_indices(indices[:, 0], split)
    return images[ids].copy(), indices[ids].copy(), values[ids].copy()


def confident_digit_fraction(images: torch.Tensor, threshold: float = 0.9, resolution: Optional[int] = None) -> Dict[str, float]:
    """The share of ``images`` that a classifier of real digits assigns to one class with probability >= ``threshold``.

    The classifier is a standardised multinomial logistic regression on the pixels of every ``train``
    scan at the images' resolution (scikit-learn). The same share for the real ``test`` scans is the
    reference a sampler's number is read against. Returns ``{"samples": share, "real_test": share,
    "classifier_test_accuracy": accuracy}``.

    Args:
        images: (N, 1, R, R) in [-1, 1], e.g. a base model's samples.
        threshold: the confidence a sample must reach.
        resolution: the pixel side (default: the images').
    """
    import_extra("sklearn", "The digits classifier")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    res = int(resolution or images.shape[-1])
    x_train, f_train, _ = digit_split("train", res)
    x_test, f_test, _ = digit_split("test", res)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    clf.fit(x_train.reshape(len(x_train), -1), f_train[:, 0])
    flat = lambda x: np.asarray(x, dtype=np.float32).reshape(len(x), -1)  # noqa: E731
    share = lambda x: float((clf.predict_proba(flat(x)).max(axis=1) >= threshold).mean())  # noqa: E731
    return {
        "samples": share(images.detach().cpu().float().clamp(-1, 1).numpy()),
        "real_test": share(x_test),
        "classifier_test_accuracy": float(clf.score(flat(x_test), f_test[:, 0])),
    }
