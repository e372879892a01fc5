"""The usefulness of a code for a label: linear probe and kNN accuracy (held-out and stratified CV) on
constructed codes whose answer is known, and the digits / labelled-set measurements built on them."""

import re

import numpy as np
import pytest
import torch

from sami_adapter.data.base import stratified_holdout
from sami_adapter.metrics import knn_accuracy, knn_cv_accuracy, linear_probe_accuracy, linear_probe_cv_accuracy
from sami_adapter.metrics._labelled import stratified_folds
from sami_adapter.usefulness import digits_usefulness, label_usefulness, labelled_usefulness, usefulness_markdown, usefulness_rows


def _clusters(n_per_class, num_classes=4, dims=6, spread=0.1, seed=0):
    """Codes at the corners of a simplex (class c around 5 e_c), far apart compared with their spread."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    centres = 5.0 * np.eye(num_classes, dims)
    return centres[labels] + spread * rng.standard_normal((labels.size, dims)), labels


def test_separable_classes_are_read_perfectly_held_out_and_cross_validated():
    train, y_train = _clusters(30, seed=0)
    test, y_test = _clusters(20, seed=1)
    assert linear_probe_accuracy(train, y_train, test, y_test) == 1.0
    assert knn_accuracy(train, y_train, test, y_test) == 1.0
    assert linear_probe_cv_accuracy(train, y_train) == 1.0
    assert knn_cv_accuracy(train, y_train) == 1.0
    names = np.array(["cat", "dog", "eel", "fox"])  # string labels (a metadata.jsonl column) work the same way
    assert linear_probe_accuracy(train, names[y_train], test, names[y_test]) == 1.0
    assert knn_cv_accuracy(train, names[y_train]) == 1.0


def test_label_independent_codes_score_at_chance():
    rng = np.random.default_rng(3)
    codes, labels = rng.standard_normal((1600, 8)), np.repeat(np.arange(4), 400)
    rng.shuffle(labels)
    # 4 balanced classes: chance 0.25, standard error sqrt(0.25 * 0.75 / 800) = 0.015 held out, 0.011 over 1600
    for score in (linear_probe_accuracy(codes[:800], labels[:800], codes[800:], labels[800:]),
                  knn_accuracy(codes[:800], labels[:800], codes[800:], labels[800:]),
                  linear_probe_cv_accuracy(codes, labels), knn_cv_accuracy(codes, labels)):
        assert abs(score - 0.25) < 0.05, score


def test_knn_votes_among_the_k_nearest_training_codes():
    train, labels = np.array([[0.0], [1.0], [2.0]]), np.array(["a", "a", "b"])
    far = np.array([[10.0]])
    assert knn_accuracy(train, labels, far, np.array(["b"]), k=1) == 1.0  # the nearest code is 2.0, a "b"
    assert knn_accuracy(train, labels, far, np.array(["a"]), k=3) == 1.0  # all three vote: a, a, b
    assert knn_accuracy(train, labels, train, labels, k=1) == 1.0  # each code is its own nearest neighbour


def test_codes_are_standardised_before_they_are_compared():
    """The label lives in a dimension a thousand times smaller than a noise dimension: only after each dimension is
    scaled to unit variance do the neighbours and the probe's penalty see it."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    codes = np.stack([1e-3 * (labels + 0.1 * rng.standard_normal(400)), 1e3 * rng.standard_normal(400)], axis=1)
    order = rng.permutation(400)
    codes, labels = codes[order], labels[order]
    assert knn_accuracy(codes[:200], labels[:200], codes[200:], labels[200:]) > 0.95
    assert linear_probe_accuracy(codes[:200], labels[:200], codes[200:], labels[200:]) > 0.95
    from sklearn.neighbors import KNeighborsClassifier

    unscaled = KNeighborsClassifier(n_neighbors=5).fit(codes[:200], labels[:200]).score(codes[200:], labels[200:])
    assert unscaled < 0.7  # the same vote on the raw codes hears only the noise dimension


def test_cross_validation_folds_are_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [7, 13, 20, 3])
    folds = stratified_folds(labels, num_folds=5, seed=0)
    for c, n in zip(range(4), [7, 13, 20, 3]):
        per_fold = np.bincount(folds[labels == c], minlength=5)
        assert per_fold.min() >= n // 5 and per_fold.max() <= -(-n // 5), (c, per_fold)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == labels.size
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=0))
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=1))


@pytest.mark.parametrize("call, message", [
    (lambda: linear_probe_accuracy(np.zeros((5, 2)), np.arange(4), np.zeros((2, 2)), np.arange(2)),
     "training codes and their labels must have the same number of samples, got 5 and 4."),
    (lambda: knn_accuracy(np.zeros((4, 2)), np.arange(4), np.zeros((2, 3)), np.arange(2)),
     "training and test codes must have the same dimension, got 2 and 3."),
    (lambda: linear_probe_accuracy(np.zeros((4, 2)), np.zeros(4, int), np.zeros((2, 2)), np.zeros(2, int)),
     "training labels hold a single class (0); a label-prediction metric needs at least 2 classes."),
    (lambda: knn_cv_accuracy(np.zeros((6, 2)), np.ones(6, int)), "labels hold a single class (1)"),
    (lambda: knn_accuracy(np.zeros((3, 2)), np.arange(3), np.zeros((1, 2)), np.arange(1)),
     "k=5 nearest neighbours need at least 5 training codes, got 3."),
    (lambda: linear_probe_cv_accuracy(np.zeros((4, 2)), np.arange(4) % 2), "5-fold cross-validation needs at least 5 samples, got 4."),
    (lambda: linear_probe_cv_accuracy(np.zeros((8, 2)), np.arange(8) % 2, num_folds=1), "num_folds must be an integer >= 2, got 1."),
    (lambda: knn_accuracy(np.full((6, 2), np.nan), np.arange(6) % 2, np.zeros((1, 2)), np.arange(1)), "training codes hold NaN or inf values."),
    (lambda: knn_accuracy(np.zeros((6,)), np.arange(6) % 2, np.zeros((1, 2)), np.arange(1)), "training codes must have shape (N, D), got (6,)."),
])
def test_bad_input_is_refused_with_the_problem_named(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_label_usefulness_collects_every_score_and_the_majority_class():
    train, y_train = _clusters(30, seed=0)
    test, y_test = _clusters(20, seed=1)
    out = label_usefulness(train, y_train, test[:50], y_test[:50])  # 20 of class 0, 20 of 1, 10 of 2
    assert {out[k] for k in ("linear_probe", "linear_probe_cv5", "knn", "knn_cv5")} == {1.0}
    assert out["majority_class"] == pytest.approx(20 / 50)  # the most common training class (a tie: 0, the first) on the test set
    assert (out["num_train"], out["num_test"], out["num_classes"], out["latent_dim"]) == (120, 50, 4, 6)
    rows = usefulness_rows(out)
    assert list(rows) == ["linear probe (held-out acc.)", "linear probe (5-fold CV acc.)", "kNN, k=5 (held-out acc.)", "kNN, k=5 (5-fold CV acc.)"]


def test_labelled_usefulness_holds_out_a_fixed_stratified_share():
    codes, labels = _clusters(10, seed=2)
    labels = np.array(["a", "b", "c", "d"])[labels]
    mask = stratified_holdout(labels, 0.2, seed=0)
    assert [int(mask[labels == c].sum()) for c in "abcd"] == [2, 2, 2, 2]
    assert np.array_equal(mask, stratified_holdout(labels, 0.2, seed=0)) and not np.array_equal(mask, stratified_holdout(labels, 0.2, seed=5))
    out = labelled_usefulness(codes, labels)
    assert (out["num_train"], out["num_test"], out["test_fraction"], out["linear_probe"]) == (32, 8, 0.2, 1.0)
    with pytest.raises(ValueError, match="leaves no test image"):
        labelled_usefulness(codes[::10], labels[::10])  # one image per class: nothing to hold out at a fifth


def test_digits_usefulness_reads_the_class_and_the_ink():
    """At 8 px the images are the scans themselves (2 level / 16 - 1), so the mean pixel is an increasing function of
    the ink (|Spearman| 1), and the pixel reference is the probe on the flattened split."""
    from sami_adapter.data import digit_split

    noise = torch.Generator().manual_seed(0)
    out = digits_usefulness(lambda x: torch.cat([x.mean(dim=(1, 2, 3))[:, None], torch.randn(x.shape[0], 1, generator=noise)], 1), 8)
    assert (out["num_train"], out["num_test"], out["num_classes"], out["latent_dim"]) == (1438, 359, 10, 2)
    assert out["attributes"]["ink"] == {"dim": 0, "abs_spearman": pytest.approx(1.0)}
    assert out["references"]["pca"]["latent_dim"] == 2 and out["references"]["pixels"]["latent_dim"] == 64
    (x_train, f_train, _), (x_test, f_test, _) = digit_split("train", 8), digit_split("test", 8)
    pixels = linear_probe_accuracy(x_train.reshape(1438, -1), f_train[:, 0], x_test.reshape(359, -1), f_test[:, 0])
    assert out["references"]["pixels"]["linear_probe"] == pixels > 0.9 > out["linear_probe"]  # two numbers carry less than 64 pixels
    text = usefulness_markdown(out)
    assert "| linear probe (held-out acc.) |" in text and "raw pixels" in text and "1438 images" in text and "ink z0" in text
