"""DCI: Disentanglement, Completeness, Informativeness (Eastwood & Williams 2018), as disentanglement_lib."""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import scipy.stats
from sklearn.ensemble import GradientBoostingClassifier

from ._discretize import check_pair


def disentanglement_from_importance(importance: np.ndarray) -> float:
    """DCI disentanglement of a (D codes, K factors) importance matrix ``R``.

    Per code ``i``: ``D_i = 1 - H_K(P_i)`` with ``P_i = R[i, :] / sum_k R[i, k]`` and ``H_K`` the
    entropy with logarithm base ``K`` (``1e-11`` is added to every entry, as disentanglement_lib
    does, so empty rows count as uniform). The score is ``sum_i rho_i D_i`` with code weights
    ``rho_i = sum_k R[i, k] / sum R`` (uniform when ``R`` is all zero).
    """
    r = np.asarray(importance, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"importance must be (D, K) with K >= 2, got {r.shape}.")
    per_code = 1.0 - scipy.stats.entropy(r.T + 1e-11, base=r.shape[1])
    if r.sum() == 0.0:
        r = np.ones_like(r)
    weights = r.sum(axis=1) / r.sum()
    return float(np.sum(per_code * weights))


def completeness_from_importance(importance: np.ndarray) -> float:
    """DCI completeness of a (D codes, K factors) importance matrix ``R``.

    Per factor ``k``: ``C_k = 1 - H_D(R[:, k] / sum_i R[i, k])`` (entropy base ``D``, ``1e-11``
    added as in disentanglement_lib), averaged with factor weights ``sum_i R[i, k] / sum R``. With
    gradient-boosting importances every column sums to 1, so this is the plain mean over factors.
    """
    r = np.asarray(importance, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2:
        raise ValueError(f"importance must be (D, K) with D >= 2, got {r.shape}.")
    per_factor = 1.0 - scipy.stats.entropy(r + 1e-11, base=r.shape[0])
    if r.sum() == 0.0:
        r = np.ones_like(r)
    weights = r.sum(axis=0) / r.sum()
    return float(np.sum(per_factor * weights))


def dci_importance(
    codes_train: np.ndarray,
    factors_train: np.ndarray,
    codes_test: np.ndarray,
    factors_test: np.ndarray,
    seed: int = 0,
    gbt_params: Optional[Dict[str, Any]] = None,
) -> tuple[np.ndarray, float, float]:
    """Importance matrix (D, K) and mean train / test accuracies of one gradient-boosted classifier per factor.

    ``R[:, k] = |feature_importances_|`` of ``GradientBoostingClassifier(**gbt_params)`` fitted to
    predict factor ``k`` from all code dimensions (sklearn defaults, as disentanglement_lib).
    """
    codes_train, factors_train = check_pair(codes_train, factors_train)
    codes_test, factors_test = check_pair(codes_test, factors_test)
    params = dict(gbt_params or {})
    params.setdefault("random_state", seed)
    importance = np.zeros((codes_train.shape[1], factors_train.shape[1]), dtype=np.float64)
    train_acc, test_acc = [], []
    for k in range(factors_train.shape[1]):
        model = GradientBoostingClassifier(**params)
        model.fit(codes_train, factors_train[:, k])
        importance[:, k] = np.abs(model.feature_importances_)
        train_acc.append(np.mean(model.predict(codes_train) == factors_train[:, k]))
        test_acc.append(np.mean(model.predict(codes_test) == factors_test[:, k]))
    return importance, float(np.mean(train_acc)), float(np.mean(test_acc))


def dci(
    codes_train: np.ndarray,
    factors_train: np.ndarray,
    codes_test: np.ndarray,
    factors_test: np.ndarray,
    seed: int = 0,
    max_train_samples: Optional[int] = None,
    gbt_params: Optional[Dict[str, Any]] = None,
) -> Dict[str, float]:
    """DCI scores as disentanglement_lib's ``dci._compute_dci``.

    Definition: for each factor ``k`` fit a gradient-boosted tree classifier (sklearn
    ``GradientBoostingClassifier``, default settings) predicting ``k`` from the codes; the absolute
    feature importances form column ``k`` of the importance matrix ``R`` (D codes x K factors).

    * disentanglement: ``sum_i rho_i (1 - H_K(R[i, :] / sum_k R[i, k]))`` with
      ``rho_i = sum_k R[i, k] / sum R`` (:func:`disentanglement_from_importance`);
    * completeness: ``sum_k w_k (1 - H_D(R[:, k] / sum_i R[i, k]))`` with
      ``w_k = sum_i R[i, k] / sum R`` (equal weights here; :func:`completeness_from_importance`);
    * informativeness_train / informativeness_test: mean over factors of the classifiers'
      accuracy on the training / test codes.

    Args:
        codes_train, factors_train: (N, D) codes and (N, K) factor indices to fit on.
        codes_test, factors_test: held-out (M, D) codes and (M, K) factor indices.
        seed: ``random_state`` of the classifiers (and of the optional subsampling).
        max_train_samples: fit on a random subset of at most this many training samples (speed).
        gbt_params: extra ``GradientBoostingClassifier`` arguments (e.g. ``n_estimators``).

    Returns:
        dict with keys ``disentanglement``, ``completeness``, ``informativeness_train``,
        ``informativeness_test``.
    """
    codes_train, factors_train = check_pair(codes_train, factors_train)
    if max_train_samples is not None and codes_train.shape[0] > max_train_samples:
        keep = np.sort(np.random.default_rng(seed).choice(codes_train.shape[0], max_train_samples, replace=False))
        codes_train, factors_train = codes_train[keep], factors_train[keep]
    importance, train_acc, test_acc = dci_importance(codes_train, factors_train, codes_test, factors_test, seed, gbt_params)
    return {
        "disentanglement": disentanglement_from_importance(importance),
        "completeness": completeness_from_importance(importance),
        "informativeness_train": train_acc,
        "informativeness_test": test_acc,
    }
