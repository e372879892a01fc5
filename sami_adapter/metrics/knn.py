"""k-nearest-neighbour accuracy: how well the codes' neighbourhoods keep a label."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from ._labelled import cross_validated_accuracy, held_out_accuracy, standardise

KNN_K = 5


def _fit_predict(codes_train: np.ndarray, labels_train: np.ndarray, codes_test: np.ndarray, k: int = KNN_K) -> np.ndarray:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}.")
    if codes_train.shape[0] < k:
        raise ValueError(f"k={k} nearest neighbours need at least {k} training codes, got {codes_train.shape[0]}.")
    train, test = standardise(codes_train, codes_test)
    return KNeighborsClassifier(n_neighbors=k).fit(train, labels_train).predict(test)


def knn_accuracy(codes_train: np.ndarray, labels_train: np.ndarray, codes_test: np.ndarray, labels_test: np.ndarray, k: int = KNN_K) -> float:
    """Held-out accuracy of a k-nearest-neighbour classifier on standardised codes.

    Definition: standardise every code dimension with the training codes' mean and standard
    deviation; each test sample gets the most common label among its ``k`` nearest training codes
    in Euclidean distance (equal votes; a tie goes to the class that sorts first, as in sklearn's
    ``KNeighborsClassifier``); the score is the share of test samples given their own label.

    Args:
        codes_train, labels_train: (N, D) codes and (N,) labels (integers or strings); at least 2 classes and ``k`` samples.
        codes_test, labels_test: (M, D) held-out codes and (M,) labels.
        k: neighbours per vote (5 by default).

    Returns:
        The accuracy in [0, 1].
    """
    return held_out_accuracy(lambda a, b, c: _fit_predict(a, b, c, k), codes_train, labels_train, codes_test, labels_test)


def knn_cv_accuracy(codes: np.ndarray, labels: np.ndarray, k: int = KNN_K, num_folds: int = 5, seed: int = 0) -> float:
    """Stratified ``num_folds``-fold cross-validated kNN accuracy on one labelled set.

    Definition: class-stratified seeded folds (:func:`~sami_adapter.metrics._labelled.stratified_folds`);
    each fold is classified as in :func:`knn_accuracy` with the other folds as the training codes
    (standardised with their statistics); the score is the share of all samples given their own label.

    Args:
        codes, labels: (N, D) codes and (N,) labels; at least 2 classes and ``num_folds`` samples.
        k: neighbours per vote.
        num_folds: folds (5 by default).
        seed: seed of the fold assignment.
    """
    return cross_validated_accuracy(lambda a, b, c: _fit_predict(a, b, c, k), codes, labels, num_folds, seed)
