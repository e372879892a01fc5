"""Tests of the disentanglement metrics: sanity on ideal / rotated / noise codes, hand-computed
values, and agreement with independent re-implementations written in this file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.svm import LinearSVC

from sami_adapter.data import Disks, MovingDisks, disk_moments
from sami_adapter.metrics import (
    completeness_from_importance,
    dci,
    discrete_entropy,
    discrete_mutual_info,
    disentanglement_from_importance,
    explicitness,
    factor_vae_score,
    histogram_discretize,
    mig,
    modularity,
    modularity_from_mutual_info,
    sap,
    sap_score_matrix,
    trajectory_curvature,
)


# -- fixtures: ideal, rotated and noise codes ---------------------------------------------------
N_TRAIN, N_TEST, K, SIZE = 600, 400, 4, 5


def _factors(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SIZE, (n, K))


def _ideal(factors: np.ndarray, seed: int) -> np.ndarray:
    """Codes = factors + tiny noise (one dimension per factor)."""
    return factors + 0.01 * np.random.default_rng(seed).standard_normal(factors.shape)


def _rotate(codes: np.ndarray) -> np.ndarray:
    """Rotate pairs of dimensions (0, 1), (2, 3) by 45 degrees."""
    c = np.cos(np.pi / 4)
    out = codes.copy()
    for a, b in ((0, 1), (2, 3)):
        out[:, a] = c * (codes[:, a] - codes[:, b])
        out[:, b] = c * (codes[:, a] + codes[:, b])
    return out


@pytest.fixture(scope="module")
def codes():
    f_train, f_test = _factors(0, N_TRAIN), _factors(1, N_TEST)
    ideal = (_ideal(f_train, 2), _ideal(f_test, 3))
    rotated = (_rotate(ideal[0]), _rotate(ideal[1]))
    rng = np.random.default_rng(4)
    noise = (rng.standard_normal((N_TRAIN, K)), rng.standard_normal((N_TEST, K)))
    return {"factors": (f_train, f_test), "ideal": ideal, "rotated": rotated, "noise": noise}


# -- independent reference implementations (explicit formulas, no sklearn) ----------------------
def ref_discretize(x: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin id 1..num_bins of each value: floor((x - min) / width) + 1, the maximum in the last bin."""
    out = np.empty(x.shape, dtype=np.int64)
    for d in range(x.shape[1]):
        col = x[:, d]
        lo, hi = col.min(), col.max()
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        width = (hi - lo) / num_bins
        out[:, d] = np.minimum(np.floor((col - lo) / width).astype(np.int64) + 1, num_bins)
    return out


def ref_entropy(a: np.ndarray) -> float:
    """-sum p log p over the empirical distribution of a 1-D discrete array (nats)."""
    _, counts = np.unique(a, return_counts=True)
    p = counts / counts.sum()
    return float(-np.sum(p * np.log(p)))


def ref_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """sum_ij p_ij log(p_ij / (p_i p_j)) from an explicit contingency table (nats)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(table, (ia, ib), 1.0)
    p = table / table.sum()
    pa, pb = p.sum(axis=1), p.sum(axis=0)
    total = 0.0
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            if p[i, j] > 0:
                total += p[i, j] * math.log(p[i, j] / (pa[i] * pb[j]))
    return total


def ref_mi_matrix(codes: np.ndarray, factors: np.ndarray, num_bins: int) -> np.ndarray:
    z = ref_discretize(codes, num_bins)
    return np.array([[ref_mutual_info(z[:, i], factors[:, k]) for k in range(factors.shape[1])] for i in range(z.shape[1])])


def ref_mig(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> float:
    m = ref_mi_matrix(codes, factors, num_bins)
    gaps = []
    for k in range(factors.shape[1]):
        col = sorted(m[:, k], reverse=True)
        gaps.append((col[0] - col[1]) / ref_entropy(factors[:, k]))
    return sum(gaps) / len(gaps)


def ref_modularity(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> float:
    m = ref_mi_matrix(codes, factors, num_bins)
    scores = []
    for row in m:
        theta = max(row)
        if theta == 0:
            scores.append(0.0)
            continue
        template = [theta if v == theta else 0.0 for v in row]  # the ideal row keeps only the max
        deviation = sum((v - t) ** 2 for v, t in zip(row, template)) / (theta**2 * (len(row) - 1))
        scores.append(1.0 - deviation)
    return sum(scores) / len(scores)


def ref_sap_continuous(codes: np.ndarray, factors: np.ndarray) -> float:
    scores = np.zeros((codes.shape[1], factors.shape[1]))
    for i in range(codes.shape[1]):
        z = codes[:, i] - codes[:, i].mean()
        for k in range(factors.shape[1]):
            y = factors[:, k] - factors[:, k].mean()
            scores[i, k] = (z @ y) ** 2 / ((z @ z) * (y @ y))
    gaps = [np.partition(scores[:, k], -2)[-1] - np.partition(scores[:, k], -2)[-2] for k in range(factors.shape[1])]
    return float(np.mean(gaps))


def ref_sap_discrete(c_train, f_train, c_test, f_test) -> float:
    """The classifier is part of SAP's definition; everything around it is re-written here."""
    gaps = []
    for k in range(f_train.shape[1]):
        accs = []
        for i in range(c_train.shape[1]):
            clf = LinearSVC(C=0.01, class_weight="balanced", dual=False).fit(c_train[:, [i]], f_train[:, k])
            accs.append(float((clf.predict(c_test[:, [i]]) == f_test[:, k]).sum()) / len(f_test))
        best, second = sorted(accs)[-1], sorted(accs)[-2]
        gaps.append(best - second)
    return sum(gaps) / len(gaps)


def ref_dci_d_c(importance: np.ndarray) -> tuple[float, float]:
    r = importance + 1e-11
    d_codes, k_factors = r.shape
    p_rows = r / r.sum(axis=1, keepdims=True)
    d_per_code = 1 + (p_rows * np.log(p_rows)).sum(axis=1) / math.log(k_factors)
    p_cols = r / r.sum(axis=0, keepdims=True)
    c_per_factor = 1 + (p_cols * np.log(p_cols)).sum(axis=0) / math.log(d_codes)
    total = importance.sum()
    return float(d_per_code @ (importance.sum(axis=1) / total)), float(c_per_factor @ (importance.sum(axis=0) / total))


def ref_curvature(seqs: np.ndarray) -> float:
    angles = []
    for seq in seqs.reshape(seqs.shape[0], seqs.shape[1], -1):
        for t in range(len(seq) - 2):
            a, b = seq[t + 1] - seq[t], seq[t + 2] - seq[t + 1]
            na, nb = math.sqrt(a @ a), math.sqrt(b @ b)
            if na > 1e-12 and nb > 1e-12:
                angles.append(math.degrees(math.acos(max(-1.0, min(1.0, (a @ b) / (na * nb))))))
    return sum(angles) / len(angles)


# -- discretisation and information -------------------------------------------------------------
def test_histogram_discretize_matches_disentanglement_lib_rule():
    x = np.array([[0.0, 5.0], [0.5, 5.0], [1.0, 5.0], [0.49, 5.0]])
    out = histogram_discretize(x, num_bins=2)
    np.testing.assert_array_equal(out[:, 0], [1, 2, 2, 1])  # the maximum falls in the last bin
    # A constant dimension v gets the edges [v - .5, v, v + .5]: every sample in bin 2.
    np.testing.assert_array_equal(out[:, 1], [2, 2, 2, 2])
    rng = np.random.default_rng(0)
    for bins in (3, 20):
        y = rng.standard_normal((300, 4)) * [1, 10, 0.01, 100]
        d = histogram_discretize(y, bins)
        assert d.min() >= 1 and d.max() == bins
        np.testing.assert_array_equal(d, ref_discretize(y, bins))


def test_entropy_and_mutual_info_by_hand():
    f = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    np.testing.assert_allclose(discrete_entropy(f), [math.log(2)] * 2, atol=1e-15)
    c1 = np.array([0, 1, 1, 1])
    m = discrete_mutual_info(np.stack([f[:, 0], c1], axis=1), f)
    expected = 1.5 * math.log(2) - 0.75 * math.log(3)
    np.testing.assert_allclose(m, [[math.log(2), 0.0], [expected, expected]], atol=1e-15)


# -- MIG ----------------------------------------------------------------------------------------
def test_mig_hand_computed():
    """Factors f0 = [0,0,1,1], f1 = [0,1,0,1]; codes z0 = f0, z1 = [0,1,1,1].

    I(z0; f0) = ln 2, I(z0; f1) = 0, I(z1; f0) = I(z1; f1) = 1.5 ln 2 - 0.75 ln 3, H(f) = ln 2:
    MIG = ((ln 2 - a) / ln 2 + a / ln 2) / 2 = 1/2 exactly.
    """
    f = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    z = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    assert mig(z, f) == pytest.approx(0.5, abs=1e-12)
    assert modularity(z, f) == pytest.approx(0.5, abs=1e-12)  # z0 modular (1), z1 split evenly (0)
    assert mig(f.astype(float), f) == pytest.approx(1.0, abs=1e-12)
    # A code that identifies every sample informs both factors fully: gaps 0 and 1.
    assert mig(np.array([[0.0, 3.0], [0.0, 2.0], [1.0, 1.0], [1.0, 0.0]]), f) == pytest.approx(0.5, abs=1e-12)


def test_mig_sanity(codes):
    f = codes["factors"][0]
    ideal, rotated, noise = mig(codes["ideal"][0], f), mig(codes["rotated"][0], f), mig(codes["noise"][0], f)
    assert ideal > 0.9
    assert rotated < 0.6 and rotated < ideal - 0.3
    assert noise < 0.05


def test_mig_agrees_with_reference():
    rng = np.random.default_rng(10)
    for trial in range(3):
        f = rng.integers(0, 4, (500, 3))
        c = rng.standard_normal((500, 5)) + 0.5 * f[:, [0, 1, 2, 0, 1]]
        assert abs(mig(c, f) - ref_mig(c, f)) < 1e-10
        assert abs(mig(c, f, num_bins=7) - ref_mig(c, f, num_bins=7)) < 1e-10


# -- modularity / explicitness ------------------------------------------------------------------
def test_modularity_sanity(codes):
    f = codes["factors"][0]
    ideal, rotated, noise = (modularity(codes[k][0], f) for k in ("ideal", "rotated", "noise"))
    assert ideal > 0.9
    assert rotated < ideal - 0.2
    assert noise < ideal - 0.5  # random MI rows are not one-hot: about 0.3, not 0, by definition


def test_modularity_from_mutual_info_by_hand():
    m = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]])
    # Row 2: delta = 1 / (1 * 2) -> 0.5; row 3: no information -> 0; row 4: (4+1+1-4)/(4*2) -> 0.75.
    assert modularity_from_mutual_info(m) == pytest.approx((1.0 + 0.5 + 0.0 + 0.75) / 4, abs=1e-15)


def test_modularity_agrees_with_reference():
    rng = np.random.default_rng(11)
    for _ in range(3):
        f = rng.integers(0, 3, (400, 3))
        c = rng.standard_normal((400, 4)) + f[:, [0, 1, 2, 2]] * [1.0, 0.5, 2.0, -1.0]
        assert abs(modularity(c, f) - ref_modularity(c, f)) < 1e-10
        assert abs(modularity(c, f, num_bins=5) - ref_modularity(c, f, num_bins=5)) < 1e-10


def test_explicitness(codes):
    (ft, fe), (ct, ce), (nt, ne) = codes["factors"], codes["ideal"], codes["noise"]
    assert explicitness(ct, ft, ce, fe) > 0.85
    assert abs(explicitness(nt, ft, ne, fe) - 0.5) < 0.05
    # Binary factor, one informative dimension: perfectly separable.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 1))
    assert explicitness(y + 0.01 * rng.standard_normal((200, 1)), y, y + 0.01 * rng.standard_normal((200, 1)), y) == 1.0


# -- SAP ----------------------------------------------------------------------------------------
def test_sap_sanity(codes):
    (ft, fe) = codes["factors"]
    cont = {k: sap(codes[k][0], ft, codes[k][1], fe, continuous_factors=True) for k in ("ideal", "rotated", "noise")}
    assert cont["ideal"] > 0.95
    assert cont["rotated"] < 0.5
    assert cont["noise"] < 0.05
    disc = {k: sap(codes[k][0], ft, codes[k][1], fe) for k in ("ideal", "rotated", "noise")}
    # A one-feature linear SVM separates only some of 5 ordered classes, so the discrete score of
    # ideal codes is well below 1 (disentanglement_lib's behaviour); it is still far above the rest.
    assert disc["ideal"] > 0.35
    assert disc["rotated"] < disc["ideal"] - 0.2
    assert disc["noise"] < 0.05


def test_sap_hand_computed():
    f = np.array([[0, 0], [1, 0], [2, 1], [3, 1]])
    z = f.astype(float)
    # corr(f0, f1)^2 = 2^2 / (5 * 1) = 0.8: S = [[1, .8], [.8, 1]] -> gaps 0.2, 0.2.
    np.testing.assert_allclose(sap_score_matrix(z, f, z, f, continuous_factors=True), [[1.0, 0.8], [0.8, 1.0]], atol=1e-14)
    assert sap(z, f, z, f, continuous_factors=True) == pytest.approx(0.2, abs=1e-14)
    # Binary factors, each read from its own dimension: accuracies 1 and 0.5.
    fb = np.array([[0, 0], [0, 1], [1, 0], [1, 1]] * 10)
    assert sap(fb.astype(float), fb, fb.astype(float), fb) == pytest.approx(0.5, abs=1e-14)


def test_sap_agrees_with_reference():
    rng = np.random.default_rng(12)
    f_train, f_test = rng.integers(0, 3, (300, 2)), rng.integers(0, 3, (200, 2))
    mix = np.array([[1.0, 0.2, 0.5], [0.1, 1.0, -0.5]])
    c_train = f_train @ mix + 0.5 * rng.standard_normal((300, 3))
    c_test = f_test @ mix + 0.5 * rng.standard_normal((200, 3))
    assert abs(sap(c_train, f_train, c_test, f_test, continuous_factors=True) - ref_sap_continuous(c_train, f_train)) < 1e-10
    assert abs(sap(c_train, f_train, c_test, f_test) - ref_sap_discrete(c_train, f_train, c_test, f_test)) < 1e-10


# -- DCI ----------------------------------------------------------------------------------------
def test_dci_from_importance_by_hand():
    assert disentanglement_from_importance(np.eye(3)) == pytest.approx(1.0, abs=1e-8)
    assert completeness_from_importance(np.eye(3)) == pytest.approx(1.0, abs=1e-8)
    assert disentanglement_from_importance(np.ones((3, 3))) == pytest.approx(0.0, abs=1e-12)
    assert completeness_from_importance(np.ones((3, 3))) == pytest.approx(0.0, abs=1e-12)
    # Both codes explain factor 0 only: each code is perfectly disentangled, factor 0 is split
    # evenly over 2 codes (completeness 0) and factor 1 has no weight.
    r = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert disentanglement_from_importance(r) == pytest.approx(1.0, abs=1e-8)
    assert completeness_from_importance(r) == pytest.approx(0.0, abs=1e-12)
    # Row [3, 1]: 1 - H_2(3/4, 1/4).
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert disentanglement_from_importance(np.array([[3.0, 1.0], [0.0, 0.0]])) == pytest.approx(1 - h, abs=1e-8)
    rng = np.random.default_rng(13)
    for shape in ((4, 3), (6, 2), (2, 5)):
        imp = rng.random(shape)
        d, c = ref_dci_d_c(imp)
        assert abs(disentanglement_from_importance(imp) - d) < 1e-10
        assert abs(completeness_from_importance(imp) - c) < 1e-10


def test_dci_sanity(codes):
    (ft, fe) = codes["factors"]
    fast = {"n_estimators": 30}
    ideal = dci(codes["ideal"][0], ft, codes["ideal"][1], fe, max_train_samples=400)
    assert set(ideal) == {"disentanglement", "completeness", "informativeness_train", "informativeness_test"}
    assert ideal["disentanglement"] > 0.9 and ideal["completeness"] > 0.9
    assert ideal["informativeness_test"] > 0.95
    rotated = dci(codes["rotated"][0], ft, codes["rotated"][1], fe, max_train_samples=400, gbt_params=fast)
    assert rotated["disentanglement"] < ideal["disentanglement"] - 0.25
    assert rotated["completeness"] < ideal["completeness"] - 0.25
    noise = dci(codes["noise"][0], ft, codes["noise"][1], fe, max_train_samples=400, gbt_params=fast)
    assert noise["disentanglement"] < 0.1
    assert noise["informativeness_test"] < 0.3  # chance is 1/5
    again = dci(codes["rotated"][0], ft, codes["rotated"][1], fe, max_train_samples=400, gbt_params=fast)
    assert again == rotated  # deterministic by seed


# -- FactorVAE ----------------------------------------------------------------------------------
def _moments(images: torch.Tensor) -> np.ndarray:
    m = disk_moments(images)
    return torch.stack([m["x"], m["y"], m["radius"], m["brightness"]], dim=1).numpy()


def test_factor_vae_score_disks():
    ds = Disks(16, resolution=32, seed=0)
    kw = dict(num_train=60, num_eval=40, batch_size=32, num_variance_estimate=400, seed=0)
    ideal = factor_vae_score(_moments, ds, **kw)
    assert ideal["train_accuracy"] > 0.8 and ideal["eval_accuracy"] > 0.8
    assert ideal["num_active_dims"] == 4
    assert factor_vae_score(_moments, ds, **kw) == ideal  # deterministic by seed

    # A near-constant extra dimension is pruned (std < 0.05) instead of winning every vote.
    def with_constant(images: torch.Tensor) -> np.ndarray:
        z = _moments(images)
        return np.concatenate([z, 1e-3 * np.random.default_rng(0).standard_normal((len(z), 1))], axis=1)

    pruned = factor_vae_score(with_constant, ds, **kw)
    assert pruned["num_active_dims"] == 4 and pruned["eval_accuracy"] > 0.8

    # Codes that mix x and y (rotated by 45 degrees) cannot tell those two factors apart.
    def mixed(images: torch.Tensor) -> np.ndarray:
        z = _moments(images)
        z[:, :2] = _rotate(np.concatenate([z[:, :2], z[:, :2]], axis=1))[:, :2]
        return z

    assert factor_vae_score(mixed, ds, **kw)["eval_accuracy"] < 0.8


# -- curvature ----------------------------------------------------------------------------------
def test_trajectory_curvature():
    t = np.linspace(0, 1, 10)[:, None]
    line = (t * np.array([1.0, 2.0, -3.0]))[None]
    assert trajectory_curvature(line) == pytest.approx(0.0, abs=1e-6)
    square = np.array([[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0], [1, 0]]], dtype=float)
    assert trajectory_curvature(square) == pytest.approx(90.0, abs=1e-10)
    back = np.array([[[0.0], [1.0], [0.0]]])
    assert trajectory_curvature(back) == pytest.approx(180.0, abs=1e-10)
    walk = np.cumsum(np.random.default_rng(0).standard_normal((20, 10, 2000)), axis=1)
    assert trajectory_curvature(walk) == pytest.approx(90.0, abs=2.0)
    # A zero-length step is skipped: only the right-angle pair counts.
    paused = np.array([[[0, 0], [0, 0], [1, 0], [1, 1]]], dtype=float)
    assert trajectory_curvature(paused) == pytest.approx(90.0, abs=1e-10)
    assert math.isnan(trajectory_curvature(np.zeros((2, 4, 3))))
    rng = np.random.default_rng(1)
    seqs = rng.standard_normal((5, 7, 3))
    assert abs(trajectory_curvature(seqs) - ref_curvature(seqs)) < 1e-10


def test_trajectory_curvature_on_pixels():
    videos = torch.from_numpy(MovingDisks(10, num_frames=6, resolution=16, seed=0).arrays()[0])
    value = trajectory_curvature(videos)  # (N, T, 1, H, W): pixels flattened
    assert 0.0 < value < 180.0
    assert value == pytest.approx(ref_curvature(videos.numpy().astype(np.float64)), abs=1e-8)


def test_ssim_closed_forms_and_a_direct_computation():
    from sami_adapter.metrics import ssim

    rng = np.random.default_rng(3)
    x = rng.random((3, 1, 9, 9))
    assert np.allclose(ssim(x, x), 1.0)
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    assert np.allclose(ssim(x, y), ssim(y, x)) and (ssim(x, y) < 1).all()
    # Flat images: both variances vanish, so SSIM is the luminance term (2ab + C1) / (a² + b² + C1).
    a, b = 0.3, 0.7
    c1 = 0.01**2
    flat = ssim(np.full((1, 8, 8), a), np.full((1, 8, 8), b))
    assert flat[0] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    # A 7x7 image has one window position: SSIM is the formula on the Gaussian-weighted statistics.
    u, v = rng.random((7, 7)), rng.random((7, 7))
    r = np.arange(7) - 3.0
    w = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    mu_u, mu_v = (w * u).sum(), (w * v).sum()
    s_uu, s_vv, s_uv = (w * u * u).sum() - mu_u**2, (w * v * v).sum() - mu_v**2, (w * u * v).sum() - mu_u * mu_v
    c2 = 0.03**2
    expected = (2 * mu_u * mu_v + c1) * (2 * s_uv + c2) / ((mu_u**2 + mu_v**2 + c1) * (s_uu + s_vv + c2))
    assert ssim(u[None], v[None])[0] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="window_size 7 is larger than the images"):
        ssim(np.zeros((1, 5, 5)), np.zeros((1, 5, 5)))
    with pytest.raises(ValueError, match="same shape"):
        ssim(np.zeros((1, 8, 8)), np.zeros((2, 8, 8)))
