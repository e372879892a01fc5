"""Tests of the datasets: determinism, shapes and ranges, fixed-factor sampling, resolution
independence, disk measurements, the moving-disks videos, and the real digits' split and factors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sami_adapter.data import (
    DATASETS,
    BackgroundDisks,
    Disks,
    DSprites,
    MovingDisks,
    background_disk_fit,
    clean_background_disk_fraction,
    clean_disk_fraction,
    disk_moments,
    render_background_disks,
    render_sprites,
)
from sami_adapter.data.disks import POSITION_RANGE, RADIUS_RANGE
from sami_adapter.data.moving_disks import SPEED_RANGE, reflect_into


def test_registry():
    assert DATASETS["disks"] is Disks and DATASETS["dsprites"] is DSprites and DATASETS["background_disks"] is BackgroundDisks


# -- determinism --------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Disks, DSprites, BackgroundDisks])
def test_deterministic_by_seed(cls):
    a, b, c = cls(64, seed=3), cls(64, seed=3), cls(64, seed=4)
    ia, fa, va = a.arrays()
    ib, fb, vb = b.arrays()
    assert np.array_equal(ia, ib) and np.array_equal(fa, fb) and np.array_equal(va, vb)
    assert not np.array_equal(fa, c.factor_indices)
    x1, f1, _ = a.sample(16, np.random.default_rng(7))
    x2, f2, _ = a.sample(16, np.random.default_rng(7))
    assert torch.equal(x1, x2) and np.array_equal(f1, f2)


def test_moving_disks_deterministic_by_seed():
    a, b, c = MovingDisks(8, seed=1), MovingDisks(8, seed=1), MovingDisks(8, seed=2)
    va, fa = a.arrays()
    vb, fb = b.arrays()
    assert np.array_equal(va, vb) and np.array_equal(fa, fb)
    assert not np.allclose(fa, c.factor_values)


# -- shapes and ranges --------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Disks, DSprites, BackgroundDisks])
def test_shapes_and_ranges(cls):
    ds = cls(200, resolution=32, seed=0)
    images, indices, values = ds.arrays()
    k = len(ds.factor_sizes)
    assert images.shape == (200, 1, 32, 32) and images.dtype == np.float32
    assert indices.shape == (200, k) and values.shape == (200, k)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert np.all(indices >= 0) and np.all(indices < np.array(ds.factor_sizes))
    assert ((images + 1) / 2).reshape(200, -1).sum(axis=1).min() > 1.0  # every image shows something
    item = ds[5]
    assert item["pixel_values"].shape == (1, 32, 32)
    assert torch.equal(item["pixel_values"], torch.from_numpy(images[5]))
    assert np.array_equal(item["factors"].numpy(), indices[5])


def test_dsprites_grid_values():
    ds = DSprites(1000, seed=0)
    idx, val = ds.factor_indices, ds.factor_values
    assert ds.factor_names == ("shape", "scale", "orientation", "x", "y")
    assert ds.factor_sizes == (3, 6, 40, 32, 32)
    np.testing.assert_array_equal(val[:, 0], idx[:, 0])
    np.testing.assert_allclose(val[:, 1], 0.5 + 0.1 * idx[:, 1])
    np.testing.assert_allclose(val[:, 2], 2 * np.pi * idx[:, 2] / 39)
    np.testing.assert_allclose(val[:, 3:], idx[:, 3:] / 31)


def test_dsprites_antialiased_and_inside_frame():
    # The extreme settings: largest scale, all shapes, corners of the position grid, many angles.
    rows = [[s, 5, o, x, y] for s in range(3) for o in range(0, 40, 3) for x in (0, 31) for y in (0, 31)]
    ds = DSprites(1, resolution=32)
    images = ds.render(ds.values_from_indices(np.array(rows), np.random.default_rng(0)))
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    assert torch.all(border == -1.0)
    grey = ((images > -1) & (images < 1)).float().sum(dim=(1, 2, 3))
    assert torch.all(grey > 0)  # anti-aliased edges
    hard = render_sprites(ds.values_from_indices(np.array(rows), np.random.default_rng(0)), 32, supersample=1)
    assert set(hard.unique().tolist()) <= {-1.0, 1.0}


def test_dsprites_shapes_differ_and_rotate():
    ds = DSprites(1, resolution=32)
    rng = np.random.default_rng(0)
    base = np.array([[s, 5, 0, 16, 16] for s in range(3)])
    imgs = ds.render(ds.values_from_indices(base, rng))
    for a in range(3):
        for b in range(a + 1, 3):
            assert (imgs[a] - imgs[b]).abs().mean() > 0.02
    # An ellipse turned by a quarter turn is the transpose of itself about the centre pixel grid
    # (its centre sits on a pixel corner at x = y = 0.5 R).
    ell = ds.render(np.array([[1, 1.0, 0.0, 0.5, 0.5], [1, 1.0, np.pi / 2, 0.5, 0.5]]))
    assert torch.allclose(ell[0, 0], ell[1, 0].T, atol=1e-5)
    # The square is symmetric under a quarter turn, the heart is not.
    sq = ds.render(np.array([[0, 1.0, 0.0, 0.5, 0.5], [0, 1.0, np.pi / 2, 0.5, 0.5]]))
    assert torch.allclose(sq[0], sq[1], atol=1e-5)
    heart = ds.render(np.array([[2, 1.0, 0.0, 0.5, 0.5], [2, 1.0, np.pi, 0.5, 0.5]]))
    assert (heart[0] - heart[1]).abs().mean() > 0.02
    assert torch.allclose(heart[0, 0], heart[1, 0].flip(0).flip(1), atol=1e-5)  # a half turn


def test_dsprites_scale_and_position():
    ds = DSprites(1, resolution=64)
    img = ds.render(np.array([[0, s, 0.0, 0.5, 0.5] for s in (0.5, 1.0)] + [[1, 1.0, 0.0, 0.0, 1.0]]))
    area = ((img + 1) / 2).sum(dim=(1, 2, 3))
    # A square of side 0.2 R * scale (up to the 1/4-pixel sub-sampling of its edges).
    np.testing.assert_allclose(area[:2].numpy(), [(0.1 * 64) ** 2, (0.2 * 64) ** 2], rtol=0.05)
    # x = 0 is the left, y = 1 the bottom of the frame.
    mass = ((img[2, 0] + 1) / 2).numpy()
    ys, xs = np.nonzero(mass)
    assert xs.mean() < 20 and ys.mean() > 44


# -- fixed-factor sampling ----------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Disks, DSprites, BackgroundDisks])
def test_fixed_factor_sampling(cls):
    ds = cls(10, resolution=32, seed=0)
    rng = np.random.default_rng(0)
    for k in range(ds.num_factors):
        images, idx, val = ds.sample(32, rng, fixed_factor=k)
        assert np.all(idx[:, k] == idx[0, k]) and np.all(val[:, k] == val[0, k])
        assert len(np.unique(idx[:, (k + 1) % ds.num_factors])) > 1  # the others still vary
        # The fixed factor's effect is identical: with every other factor set to the first
        # draw's value, all images are the same.
        canon = np.repeat(val[:1], 32, axis=0)
        canon[:, k] = val[:, k]
        r = ds.render(canon)
        assert torch.equal(r, r[:1].expand_as(r))
        _, idx2, _ = ds.sample(8, rng, fixed_factor=k, fixed_index=1)
        assert np.all(idx2[:, k] == 1)


def test_dsprites_fixed_shape_and_disks_fixed_position_measured():
    ds = DSprites(10, seed=0)
    images, idx, val = ds.sample(64, np.random.default_rng(1), fixed_factor=0, fixed_index=2)
    assert np.all(idx[:, 0] == 2)
    canon = val.copy()
    canon[:, 1:] = [1.0, 0.0, 0.5, 0.5]
    r = ds.render(canon)
    assert torch.equal(r, ds.render(np.array([[2, 1.0, 0.0, 0.5, 0.5]])).expand_as(r))

    disks = Disks(10, seed=0)
    images, _, val = disks.sample(64, np.random.default_rng(2), fixed_factor=0)
    m = disk_moments(images)
    assert m["x"].std() < 0.05 and m["y"].std() > 1.0


def test_fixed_factor_out_of_range():
    with pytest.raises(ValueError):
        DSprites(4).sample(2, np.random.default_rng(0), fixed_factor=5)


# -- resolution ---------------------------------------------------------------------------------
@pytest.mark.parametrize("res", [8, 17, 32, 64])
def test_any_resolution(res):
    for cls in (Disks, DSprites):
        ds = cls(16, resolution=res, seed=0)
        images, _, _ = ds.arrays()
        assert images.shape == (16, 1, res, res)
        assert images.min() >= -1 and images.max() <= 1


def test_coverage_scales_with_resolution():
    """The same factors cover the same fraction of the frame at any resolution."""
    for cls in (Disks, DSprites):
        small, big = cls(64, resolution=32, seed=0), cls(64, resolution=96, seed=0)
        values = small.factor_values.copy()
        if cls is Disks:
            big_values = values.copy()
            big_values[:, :3] *= 3
        else:
            big_values = values
        frac_small = ((small.render(values) + 1) / 2).mean(dim=(1, 2, 3))
        frac_big = ((big.render(big_values) + 1) / 2).mean(dim=(1, 2, 3))
        np.testing.assert_allclose(frac_small.numpy(), frac_big.numpy(), rtol=0.12)


# -- disks measurements -------------------------------------------------------------------------
def test_disk_moments_recover_factors():
    ds = Disks(400, resolution=32, seed=0)
    images, _, values = ds.arrays()
    m = disk_moments(torch.from_numpy(images))
    for k, name in enumerate(("x", "y", "radius")):
        corr = np.corrcoef(m[name].numpy(), values[:, k])[0, 1]
        assert corr > 0.99, (name, corr)
    np.testing.assert_allclose(m["x"].numpy(), values[:, 0], atol=0.1)


def test_clean_disk_fraction():
    ds = Disks(300, resolution=32, seed=0)
    images = torch.from_numpy(ds.arrays()[0])
    clean, verdicts = clean_disk_fraction(images)
    assert clean > 0.97 and verdicts.shape == (300,)
    noisy = images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    assert clean_disk_fraction(noisy)[0] < 0.03


# -- moving disks -------------------------------------------------------------------------------
def test_moving_disks_shapes_and_ranges():
    md = MovingDisks(num_sequences=40, num_frames=8, resolution=32, seed=0)
    videos, values = md.arrays()
    assert videos.shape == (40, 8, 1, 32, 32) and videos.dtype == np.float32
    assert values.shape == (40, 8, 4) and len(md) == 40
    assert videos.min() >= -1 and videos.max() <= 1
    lo, hi = POSITION_RANGE[0] * 32, POSITION_RANGE[1] * 32
    assert values[..., :2].min() >= lo - 1e-9 and values[..., :2].max() <= hi + 1e-9
    assert values[..., 2].min() >= RADIUS_RANGE[0] * 32 - 1e-9 and values[..., 2].max() <= RADIUS_RANGE[1] * 32 + 1e-9
    assert np.all(values[..., 3] == values[:, :1, 3])  # brightness constant per sequence
    item = md[3]
    assert item["pixel_values"].shape == (8, 1, 32, 32) and item["factor_values"].shape == (8, 4)
    assert torch.equal(item["pixel_values"], torch.from_numpy(videos[3]))
    # The renders show the disk where the values say.
    m = disk_moments(torch.from_numpy(videos.reshape(-1, 1, 32, 32)))
    np.testing.assert_allclose(m["x"].numpy(), values[..., 0].ravel(), atol=0.1)
    np.testing.assert_allclose(m["y"].numpy(), values[..., 1].ravel(), atol=0.1)
    other = MovingDisks(4, num_frames=5, resolution=20, seed=0)
    assert other.arrays()[0].shape == (4, 5, 1, 20, 20)


def test_moving_disks_smooth():
    md = MovingDisks(num_sequences=60, num_frames=8, resolution=32, seed=1)
    videos, values = md.arrays()
    steps = np.linalg.norm(np.diff(values[..., :2], axis=1), axis=-1)
    assert steps.max() <= SPEED_RANGE[1] * 32 + 1e-9
    assert np.abs(np.diff(values[..., 2], axis=1)).max() <= 0.01 * 32
    assert np.mean(steps > 0.5 * SPEED_RANGE[0] * 32) > 0.9  # it does move
    # Successive frames differ far less than frames of different sequences.
    successive = np.abs(np.diff(videos, axis=1)).mean()
    unrelated = np.abs(videos[1:, 0] - videos[:-1, 0]).mean()
    assert successive < 0.4 * unrelated
    # Mostly straight or gently curving: successive steps turn by less than 30 degrees on average
    # (reflections off the borders add the occasional sharp turn).
    d = np.diff(values[..., :2], axis=1)
    cos = (d[:, 1:] * d[:, :-1]).sum(-1) / (np.linalg.norm(d[:, 1:], axis=-1) * np.linalg.norm(d[:, :-1], axis=-1))
    assert np.median(np.degrees(np.arccos(np.clip(cos, -1, 1)))) < 20


def test_reflect_into():
    x = np.array([0.0, 0.5, 1.0, 1.2, -0.3, 2.5, 3.1])
    np.testing.assert_allclose(reflect_into(x, 0.0, 1.0), [0.0, 0.5, 1.0, 0.8, 0.3, 0.5, 0.9])


def test_invalid_arguments():
    with pytest.raises(ValueError):
        MovingDisks(num_frames=1)
    with pytest.raises(ValueError):
        render_sprites(np.zeros((2, 4)), 32)
    with pytest.raises(ValueError):
        render_sprites(np.array([[3, 1.0, 0.0, 0.5, 0.5]]), 32)


# -- background_disks (the SAMI paper's set) -------------------------------------------------------
@pytest.mark.parametrize("res", [16, 32])
def test_background_disks_pixels_factors_and_frame(res):
    ds = BackgroundDisks(500, resolution=res, seed=2)
    images, indices, values = ds.arrays()
    intensity = (images[:, 0] + 1) / 2
    r = 5 * res / 32
    x, y, b = values.T
    assert np.all(x >= r) and np.all(x <= res - r) and np.all(y >= r) and np.all(y <= res - r)  # the disk is inside the frame
    assert b.min() >= 0.2 and b.max() <= 0.8
    assert ds.factor_names == ("x", "y", "background") and ds.factor_sizes == (16, 16, 8)
    # A corner pixel is pure background, the pixel under the disk centre is white (1.0).
    corner = np.minimum.reduce([intensity[:, 0, 0], intensity[:, 0, -1], intensity[:, -1, 0], intensity[:, -1, -1]])
    np.testing.assert_allclose(corner, b, atol=1e-6)
    centre = intensity[np.arange(500), np.floor(y).astype(int), np.floor(x).astype(int)]
    np.testing.assert_allclose(centre, 1.0, atol=1e-6)
    # Coverage: the excess over the background integrates to (1 - b) times the disk's area.
    excess = (intensity - b[:, None, None]).sum(axis=(1, 2)) / (1 - b)
    np.testing.assert_allclose(excess, np.pi * r**2, rtol=0.02)
    # The bins are the factor's equal-width bins.
    assert np.array_equal(indices[:, 2], np.minimum(((b - 0.2) / 0.6 * 8).astype(int), 7))


def test_background_disk_fit_recovers_factors_and_flags_unclean_images():
    ds = BackgroundDisks(400, resolution=16, seed=4)
    images, _, values = ds.arrays()
    fit = background_disk_fit(torch.from_numpy(images))
    for k, name in enumerate(("x", "y", "background")):
        assert np.abs(fit[name].numpy() - values[:, k]).max() < 0.06, name
    assert clean_background_disk_fraction(torch.from_numpy(images))[0] == 1.0
    noisy = torch.from_numpy(images) + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    assert clean_background_disk_fraction(noisy)[0] == 0.0
    blank = render_background_disks(np.array([[8.0, 8.0, 0.5]]), 16) * 0 + 0.0  # grey frame, no disk
    assert not clean_background_disk_fraction(blank)[1].item()
    with pytest.raises(ValueError, match=r"\(N, 3\) = \(x, y, background\)"):
        render_background_disks(np.zeros((2, 4)), 16)


# ------------------------------------------------------------------------------- digits (real scans)
def _rows(images):
    return {image.tobytes() for image in np.asarray(images)}


def test_digits_split_is_fixed_disjoint_and_stratified():
    from sami_adapter.data import Digits, digit_split
    from sami_adapter.data.digits import TEST_FRACTION, load_digit_scans, split_indices

    _, labels = load_digit_scans()
    train, test = split_indices(labels, "train"), split_indices(labels, "test")
    assert (train.size, test.size) == (1438, 359) and not set(train) & set(test) and set(train) | set(test) == set(range(1797))
    for c in range(10):  # every class gives round(20%) of its scans to the held-out side
        assert np.sum(labels[test] == c) == round(TEST_FRACTION * np.sum(labels == c))
    held_out = _rows(digit_split("test", 16)[0])
    for seed in (0, 7):  # the dataset's seed draws from the split, it never moves the split
        data = Digits(359, resolution=16, seed=seed, split="test")
        assert data.split_size == 359 and _rows(data.arrays()[0]) == held_out
    assert not _rows(Digits(1438, resolution=16, seed=3, split="train").arrays()[0]) & held_out
    assert np.array_equal(Digits(20, seed=1).arrays()[0], Digits(20, seed=1).arrays()[0])


def test_digit_attributes_on_constructed_scans():
    """A vertical bar has no slant and is taller than wide; '/' (top to the right, rows counted downwards) has slant +1,
    '\\' slant -1; ink is the mean of level / 16."""
    from sami_adapter.data import digit_attributes

    bar = np.zeros((8, 8))
    bar[1:7, 3:5] = 16.0
    slash = np.zeros((8, 8))
    slash[np.arange(8), 7 - np.arange(8)] = 16.0
    attrs = digit_attributes(np.stack([bar, slash, slash[:, ::-1], bar / 2]))
    assert attrs["slant"][0] == pytest.approx(0.0, abs=1e-12)
    assert attrs["width"][0] == pytest.approx(0.5) and attrs["height"][0] == pytest.approx(np.sqrt(35 / 12))  # std of 2 and 6 unit steps
    assert attrs["slant"][1] == pytest.approx(1.0) and attrs["slant"][2] == pytest.approx(-1.0)
    assert attrs["ink"][0] == pytest.approx(12 / 64) and attrs["ink"][3] == pytest.approx(6 / 64)
    assert attrs["width"][3] == pytest.approx(attrs["width"][0])  # the shape statistics do not depend on the grey level


@pytest.mark.parametrize("res", [8, 16, 32])
def test_digits_shapes_ranges_and_factors(res):
    from sami_adapter.data import Digits, digit_split
    from sami_adapter.data.digits import load_digit_scans

    images, indices, values = Digits(64, resolution=res, seed=2).arrays()
    assert images.shape == (64, 1, res, res) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() <= 1.0 and images.max() > 0.9  # dark background, bright ink, clipped
    assert indices.shape == values.shape == (64, 5) and indices[:, 0].tolist() == values[:, 0].astype(int).tolist()
    assert (indices.min(0) >= 0).all() and (indices.max(0) < np.array(Digits.factor_sizes)).all()
    if res == 8:  # no resampling: the scans themselves, 2 level / 16 - 1
        scans, _ = load_digit_scans()
        x, _, _ = digit_split("train", 8)
        assert _rows(x) <= _rows((2 * scans / 16 - 1)[:, None].astype(np.float32))


def test_digits_without_scikit_learn_names_the_extra():
    import subprocess
    import sys

    block = (
        "import importlib.abc, importlib.machinery, sys\n"
        "class Missing(importlib.abc.Loader):\n"
        "    def create_module(self, spec): raise ModuleNotFoundError(f'No module named {spec.name!r}', name=spec.name)\n"
        "    def exec_module(self, module): pass\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        return importlib.machinery.ModuleSpec(name, Missing()) if name.split('.')[0] == 'sklearn' else None\n"
        "sys.meta_path.insert(0, Block())\n"
        "from sami_adapter.data import Digits\n"
        "try:\n"
        "    Digits(4)\n"
        "except ImportError as e:\n"
        "    print('ERROR', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'ERROR The digits data (scikit-learn ships them) needs scikit-learn, which the core install leaves out: pip install "sami-adapter[eval]"' in out.stdout
