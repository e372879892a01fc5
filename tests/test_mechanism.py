"""SAMI's mechanism, measured: each factor's own noise scale (a probe on noisy images, against a closed
form), the dimension-to-factor table, MIG per factor and the moving background_disks videos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from sami_adapter.data import MovingBackgroundDisks
from sami_adapter.data.base import FactorDataset
from sami_adapter.noise_levels import factor_noise_scales, factor_recoverability, first_crossing, mechanism_table
from sami_adapter.metrics import mig, mig_per_factor

PIXELS = 64


class GreyLevel(FactorDataset):
    """A flat grey 8 x 8 image whose level ``b ~ U[0.2, 0.8]`` is the one factor: pixels ``2 b - 1``."""

    factor_names = ("level",)
    factor_sizes = (8,)

    def factor_ranges(self):
        return [(0.2, 0.8)]

    def render(self, values):
        v = torch.as_tensor(np.asarray(values), dtype=torch.float32)[:, 0]
        return (2 * v - 1).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()


def _linear_r2(alpha_bar: float) -> float:
    """Closed form: the pixel mean ``m = a (2b - 1) + s eps_bar`` (eps_bar ~ N(0, 1/P)) is sufficient, and the
    best linear estimate of ``b`` from it explains ``a^2 Var(2b-1) / (a^2 Var(2b-1) + s^2 / P)`` of its variance."""
    signal = alpha_bar * 4 * 0.6**2 / 12
    return signal / (signal + (1 - alpha_bar) / PIXELS)


def test_probe_recovers_the_closed_form_noise_scale_of_a_grey_level():
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    closed = np.array([_linear_r2(float(a)) for a in alphas])
    t_half = int(np.argmin(np.abs(closed - 0.5 * closed[0])))  # where half the variance is left
    grid = [0, t_half - 150, t_half, t_half + 150, 999]
    out = factor_recoverability(GreyLevel(1, resolution=8, seed=0), alphas, grid, num_steps=250, num_test=2048, seed=1)
    r2 = out["r2"][:, 0]
    assert out["names"] == ["level"] and list(out["timesteps"]) == grid
    # A probe can beat the best linear estimate (the level is uniform, not Gaussian) but not by much.
    for t, value in zip(grid, r2):
        assert closed[t] - 0.06 < value < closed[t] + 0.08, (t, value, closed[t])
    scale = factor_noise_scales(out)["level"]
    assert abs(scale - t_half) < 60, (scale, t_half)


def test_first_crossing_interpolates_and_says_never():
    grid = np.array([0.0, 100.0, 200.0])
    assert first_crossing(grid, np.array([1.0, 0.6, 0.2]), 0.5) == pytest.approx(125.0)
    assert first_crossing(grid, np.array([1.0, 0.9, 0.8]), 0.5) is None
    assert factor_noise_scales({"timesteps": grid, "r2": np.array([[1.0], [0.9], [0.8]]), "names": ["f"]})["f"] == math.inf


def test_mechanism_table_orders_dimensions_by_their_factors_scale():
    levels = {"active": [0, 1, 3], "timestep": np.array([120.0, 500.0, np.nan, 130.0])}
    alignment = {"names": ["x", "background"], "matrix": np.array([[0.9, 0.1], [0.2, 0.95], [0.0, 0.0], [0.7, 0.3]])}
    table = mechanism_table(levels, alignment, {"x": 330.0, "background": 560.0})
    assert [(r["dim"], r["factor"]) for r in table["rows"]] == [(0, "x"), (1, "background"), (3, "x")]
    # t* 120, 500, 130 against scales 330, 560, 330: ranks agree up to the tie -> Spearman 0.866.
    assert table["spearman"] == pytest.approx(math.sqrt(3) / 2)
    inverted = mechanism_table({"active": [0, 1, 3], "timestep": np.array([600.0, 100.0, np.nan, 650.0])}, alignment,
                               {"x": 330.0, "background": 560.0})
    assert inverted["spearman"] == pytest.approx(-math.sqrt(3) / 2)
    assert math.isnan(mechanism_table({"active": [0], "timestep": np.array([1.0])}, alignment, {"x": 1.0, "background": 2.0})["spearman"])


def test_mig_per_factor_is_the_gap_of_each_factor():
    rng = np.random.default_rng(0)
    factors = rng.integers(0, 8, size=(2000, 2))
    codes = np.stack([factors[:, 0] + 0.01 * rng.standard_normal(2000), rng.standard_normal(2000)], axis=1)
    gaps = mig_per_factor(codes, factors, num_bins=8)
    assert gaps[0] > 0.9 and gaps[1] < 0.05  # factor 0 has a dimension of its own, factor 1 none
    assert mig(codes, factors, num_bins=8) == pytest.approx(gaps.mean())


def test_moving_background_disks_move_inside_the_frame_and_fade():
    videos, values = MovingBackgroundDisks(num_sequences=20, num_frames=6, resolution=16, seed=3).arrays()
    assert videos.shape == (20, 6, 1, 16, 16) and values.shape == (20, 6, 3)
    r = 2.5
    assert values[..., :2].min() >= r - 1e-9 and values[..., :2].max() <= 16 - r + 1e-9
    background = values[..., 2]
    assert background.min() >= 0.2 and background.max() <= 0.8
    np.testing.assert_allclose(np.diff(background, 2, axis=1), 0.0, atol=1e-12)  # a linear fade
    corner = (videos[:, :, 0, 0, 0] + 1) / 2  # a corner pixel is background
    np.testing.assert_allclose(corner, background, atol=1e-6)
    steps = np.linalg.norm(np.diff(values[..., :2], axis=1), axis=-1)
    assert steps.max() < 0.04 * 16 + 1e-9 and steps.min() > 0  # the disk moves every frame, at most the top speed
