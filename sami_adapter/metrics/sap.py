"""SAP: Separated Attribute Predictability (Kumar et al. 2018), as disentanglement_lib."""

from __future__ import annotations

import numpy as np
from sklearn.svm import LinearSVC

from ._discretize import check_pair


def sap_score_matrix(
    codes_train: np.ndarray,
    factors_train: np.ndarray,
    codes_test: np.ndarray,
    factors_test: np.ndarray,
    continuous_factors: bool = False,
) -> np.ndarray:
    """The (D codes, K factors) predictability matrix behind :func:`sap`.

    * discrete factors: ``S[i, k]`` is the test accuracy of ``LinearSVC(C=0.01,
      class_weight="balanced")`` trained to predict factor ``k`` from code dimension ``i`` alone;
    * continuous factors: ``S[i, k] = cov(z_i, v_k)^2 / (var(z_i) var(v_k))`` on the training
      data (the R^2 of a linear fit; 0 when ``var(z_i) <= 1e-12``); the test data are unused.

    The SVM is solved in the primal (``dual=False``): the same strictly convex problem as
    disentanglement_lib's dual solver, but deterministic and fast for one feature.
    """
    codes_train, factors_train = check_pair(codes_train, factors_train)
    codes_test, factors_test = check_pair(codes_test, factors_test)
    num_codes, num_factors = codes_train.shape[1], factors_train.shape[1]
    score = np.zeros((num_codes, num_factors), dtype=np.float64)
    for i in range(num_codes):
        z = codes_train[:, i]
        for k in range(num_factors):
            y = factors_train[:, k]
            if continuous_factors:
                cov = np.cov(z, y.astype(np.float64), ddof=1)
                var_z, var_y = cov[0, 0], cov[1, 1]
                score[i, k] = cov[0, 1] ** 2 / (var_z * var_y) if var_z > 1e-12 and var_y > 0 else 0.0
            elif np.unique(y).size < 2:
                score[i, k] = np.mean(factors_test[:, k] == y[0])
            else:
                clf = LinearSVC(C=0.01, class_weight="balanced", dual=False)
                clf.fit(z[:, None], y)
                score[i, k] = np.mean(clf.predict(codes_test[:, i : i + 1]) == factors_test[:, k])
    return score


def sap(
    codes_train: np.ndarray,
    factors_train: np.ndarray,
    codes_test: np.ndarray,
    factors_test: np.ndarray,
    continuous_factors: bool = False,
) -> float:
    """SAP score as disentanglement_lib's ``sap_score._compute_sap``.

    Definition: build the predictability matrix ``S`` (D codes x K factors,
    :func:`sap_score_matrix`: single-dimension linear-SVM test accuracy for discrete factors,
    linear-fit R^2 for continuous ones); for each factor take the gap between its largest and
    second largest entry over code dimensions; SAP is the mean gap over factors.

    Args:
        codes_train, factors_train: (N, D) codes and (N, K) factors to fit on.
        codes_test, factors_test: held-out codes and factors (unused when ``continuous_factors``).
        continuous_factors: treat the factors as continuous values instead of classes.

    Returns:
        The score (1 at best for continuous factors; high when one dimension alone predicts
        each factor, 0 when the two best dimensions are equally predictive).
    """
    s = sap_score_matrix(codes_train, factors_train, codes_test, factors_test, continuous_factors)
    if s.shape[0] < 2:
        raise ValueError("SAP needs at least 2 code dimensions.")
    top = np.sort(s, axis=0)
    return float(np.mean(top[-1, :] - top[-2, :]))
