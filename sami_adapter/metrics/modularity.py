"""Modularity and explicitness (Ridgeway & Zemel 2018), as disentanglement_lib."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from ._discretize import check_pair, discrete_mutual_info, histogram_discretize


def modularity_from_mutual_info(mutual_info: np.ndarray) -> float:
    """Modularity of a (D codes, K factors) mutual-information matrix ``m``.

    Per code ``i`` with ``theta_i = max_k m[i, k]``: the deviation from the ideal one-factor
    template is ``delta_i = (sum_k m[i, k]^2 - theta_i^2) / (theta_i^2 (K - 1))`` and the code's
    modularity is ``1 - delta_i`` (0 when ``theta_i = 0``). The score is the mean over codes.
    """
    m = np.asarray(mutual_info, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"mutual_info must be (D, K) with K >= 2, got {m.shape}.")
    squared = m**2
    top = squared.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = (squared.sum(axis=1) - top) / (top * (m.shape[1] - 1.0))
    score = np.where(top == 0.0, 0.0, 1.0 - delta)
    return float(np.mean(score))


def modularity(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> float:
    """Modularity score as disentanglement_lib's ``modularity_explicitness``.

    Definition: discretise the codes into ``num_bins`` equal-width bins per dimension, take the
    mutual information matrix ``m[i, k] = I(z_i; v_k)`` (nats), then
    ``mean_i (1 - (sum_k m[i, k]^2 - max_k m[i, k]^2) / (max_k m[i, k]^2 (K - 1)))``, a code with
    no information scoring 0 (:func:`modularity_from_mutual_info`).

    Args:
        codes: (N, D) representation.
        factors: (N, K) integer factor indices, ``K >= 2``.
        num_bins: bins per code dimension.

    Returns:
        The score in [0, 1] (1: every code dimension carries information about one factor only).
    """
    codes, factors = check_pair(codes, factors)
    return modularity_from_mutual_info(discrete_mutual_info(histogram_discretize(codes, num_bins), factors))


def _roc_auc(classes: np.ndarray, y: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest ROC-AUC over the classes that have both positives and negatives in ``y``."""
    aucs = []
    for c, label in enumerate(classes):
        positive = y == label
        if 0 < positive.sum() < y.size:
            aucs.append(roc_auc_score(positive, proba[:, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


def explicitness(
    codes_train: np.ndarray,
    factors_train: np.ndarray,
    codes_test: np.ndarray,
    factors_test: np.ndarray,
) -> float:
    """Explicitness score (test) as disentanglement_lib's ``modularity_explicitness``.

    Definition: standardise the codes with the training mean and standard deviation; for each
    factor fit ``sklearn.linear_model.LogisticRegression()`` (default settings) on the training
    codes and score the predicted class probabilities on the test codes by the macro-averaged
    one-vs-rest ROC-AUC (each class against the rest); the score is the mean over factors.
    Classes absent from the test set (or present in all of it) are left out of the average,
    where disentanglement_lib's label binarizer would fail.

    Args:
        codes_train, factors_train: (N, D) codes and (N, K) factor indices to fit on.
        codes_test, factors_test: held-out codes and factors to score.

    Returns:
        Mean test ROC-AUC in [0, 1] (0.5 for uninformative codes).
    """
    codes_train, factors_train = check_pair(codes_train, factors_train)
    codes_test, factors_test = check_pair(codes_test, factors_test)
    mean, std = codes_train.mean(axis=0), codes_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x_train, x_test = (codes_train - mean) / std, (codes_test - mean) / std
    scores = []
    for k in range(factors_train.shape[1]):
        y = factors_train[:, k]
        if np.unique(y).size < 2:
            continue
        clf = LogisticRegression().fit(x_train, y)
        scores.append(_roc_auc(clf.classes_, factors_test[:, k], clf.predict_proba(x_test)))
    return float(np.nanmean(scores)) if scores else float("nan")
