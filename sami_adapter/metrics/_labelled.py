"""Checks, standardisation and stratified cross-validation shared by the label-prediction metrics
(:mod:`.linear_probe`, :mod:`.knn`).

Labels are one class per sample: integers or strings (a ``datasets`` ClassLabel column, or the text
of a ``metadata.jsonl`` column), as a 1-D array.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np

# fit_predict(codes_train, labels_train, codes_test) -> predicted labels of codes_test
FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def check_labelled(codes: np.ndarray, labels: np.ndarray, name: str = "codes") -> Tuple[np.ndarray, np.ndarray]:
    """``codes`` as finite float64 (N, D) and ``labels`` as a 1-D array of N classes; ValueError naming what is wrong."""
    z = np.asarray(codes, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {z.shape}.")
    if y.ndim != 1:
        raise ValueError(f"labels of {name} must be one class per sample, shape (N,), got {y.shape}.")
    if z.shape[0] != y.shape[0]:
        raise ValueError(f"{name} and their labels must have the same number of samples, got {z.shape[0]} and {y.shape[0]}.")
    if z.shape[0] == 0:
        raise ValueError(f"{name} are empty.")
    if not np.isfinite(z).all():
        raise ValueError(f"{name} hold NaN or inf values.")
    return z, y


def check_classes(labels: np.ndarray, name: str = "training labels") -> None:
    """A classifier needs at least two classes to learn anything: ValueError otherwise."""
    classes = np.unique(labels)
    if classes.size < 2:
        raise ValueError(f"{name} hold a single class ({classes[0].item()!r}); a label-prediction metric needs at least 2 classes.")


def standardise(train: np.ndarray, test: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Both sets z-scored with the training set's per-dimension mean and standard deviation (a constant
    dimension is only centred)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def stratified_folds(labels: np.ndarray, num_folds: int = 5, seed: int = 0) -> np.ndarray:
    """The fold (0 .. num_folds - 1) of each sample: every class spread over the folds as evenly as possible.

    The members of each class (classes in sorted order) are shuffled with ``seed`` and dealt to the
    folds in turn, each class starting where the previous one stopped; so each fold holds
    ``floor`` or ``ceil`` of ``n_c / num_folds`` members of every class ``c`` and the fold sizes
    differ by at most one.
    """
    y = np.asarray(labels)
    if not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}.")
    if y.shape[0] < num_folds:
        raise ValueError(f"{num_folds}-fold cross-validation needs at least {num_folds} samples, got {y.shape[0]}.")
    rng = np.random.default_rng(seed)
    folds = np.empty(y.shape[0], dtype=np.int64)
    start = 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        folds[members] = (start + np.arange(members.size)) % num_folds
        start = (start + members.size) % num_folds
    return folds


def cross_validated_accuracy(fit_predict: FitPredict, codes: np.ndarray, labels: np.ndarray, num_folds: int, seed: int) -> float:
    """The share of all samples predicted correctly by a classifier fit on the other folds (:func:`stratified_folds`).

    A fold whose training part holds a single class predicts that class.
    """
    z, y = check_labelled(codes, labels)
    check_classes(y, "labels")
    folds = stratified_folds(y, num_folds, seed)
    correct = 0
    for f in range(num_folds):
        test, train = folds == f, folds != f
        if np.unique(y[train]).size < 2:
            predicted = np.full(int(test.sum()), y[train][0])
        else:
            predicted = fit_predict(z[train], y[train], z[test])
        correct += int(np.sum(predicted == y[test]))
    return correct / y.shape[0]


def held_out_accuracy(fit_predict: FitPredict, codes_train, labels_train, codes_test, labels_test) -> float:
    """The share of the test samples predicted correctly by a classifier fit on the training samples."""
    z_train, y_train = check_labelled(codes_train, labels_train, "training codes")
    z_test, y_test = check_labelled(codes_test, labels_test, "test codes")
    if z_train.shape[1] != z_test.shape[1]:
        raise ValueError(f"training and test codes must have the same dimension, got {z_train.shape[1]} and {z_test.shape[1]}.")
    check_classes(y_train)
    return float(np.mean(fit_predict(z_train, y_train, z_test) == y_test))
