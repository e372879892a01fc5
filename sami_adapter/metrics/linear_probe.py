"""Linear probe: how well a linear classifier reads a label from the codes (standardised multinomial
logistic regression, as in representation-learning evaluations)."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from ._labelled import cross_validated_accuracy, held_out_accuracy, standardise

PROBE_C = 1.0  # inverse L2 strength of sklearn's default; the codes are standardised, so one value serves every code
PROBE_MAX_ITER = 5000


def _fit_predict(codes_train: np.ndarray, labels_train: np.ndarray, codes_test: np.ndarray, C: float = PROBE_C) -> np.ndarray:
    train, test = standardise(codes_train, codes_test)
    probe = LogisticRegression(C=C, max_iter=PROBE_MAX_ITER)  # lbfgs: multinomial (softmax) for more than two classes
    return probe.fit(train, labels_train).predict(test)


def linear_probe_accuracy(codes_train: np.ndarray, labels_train: np.ndarray, codes_test: np.ndarray, labels_test: np.ndarray,
                          C: float = PROBE_C) -> float:
    """Held-out accuracy of a linear probe.

    Definition: standardise every code dimension with the training codes' mean and standard
    deviation; fit a multinomial logistic regression (softmax over the classes, L2 penalty
    ``1 / (2 C) ||W||²``, sklearn's ``LogisticRegression`` with lbfgs) on the training codes and
    labels; the score is the share of test samples whose most probable class is their label.

    Args:
        codes_train, labels_train: (N, D) codes and (N,) labels (integers or strings) to fit on; at least 2 classes.
        codes_test, labels_test: (M, D) held-out codes and (M,) labels to score on.
        C: inverse regularisation strength.

    Returns:
        The accuracy in [0, 1] (chance is about the largest class's share).
    """
    return held_out_accuracy(lambda a, b, c: _fit_predict(a, b, c, C), codes_train, labels_train, codes_test, labels_test)


def linear_probe_cv_accuracy(codes: np.ndarray, labels: np.ndarray, num_folds: int = 5, seed: int = 0, C: float = PROBE_C) -> float:
    """Stratified ``num_folds``-fold cross-validated accuracy of the linear probe on one labelled set.

    Definition: split the samples into ``num_folds`` class-stratified folds (seeded,
    :func:`~sami_adapter.metrics._labelled.stratified_folds`); predict each fold with the probe of
    :func:`linear_probe_accuracy` fit (standardisation included) on the other folds; the score is
    the share of all samples predicted correctly.

    Args:
        codes, labels: (N, D) codes and (N,) labels; at least 2 classes and ``num_folds`` samples.
        num_folds: folds (5 by default).
        seed: seed of the fold assignment.
        C: inverse regularisation strength.
    """
    return cross_validated_accuracy(lambda a, b, c: _fit_predict(a, b, c, C), codes, labels, num_folds, seed)
