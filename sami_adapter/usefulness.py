"""How useful a code is for a label: a linear probe and kNN on the codes, held out and cross-validated.

The job a representation is usually wanted for is to make a label easy to read off. For labelled
data this module measures that the same way for every model (SAMI, a baseline, PCA of the pixels):

* ``linear_probe``: held-out accuracy of a standardised multinomial logistic regression fit on the
  training codes (:func:`~sami_adapter.metrics.linear_probe_accuracy`);
* ``knn``: held-out accuracy of a 5-nearest-neighbour vote on standardised codes
  (:func:`~sami_adapter.metrics.knn_accuracy`);
* ``linear_probe_cv5``, ``knn_cv5``: the same classifiers' stratified 5-fold cross-validated
  accuracy over every labelled code (training and test together);
* ``majority_class``: the test share of the most common training class, the accuracy of a code that
  carries nothing about the label.

:func:`digits_usefulness` runs it on the real digits (every ``train`` scan fits, every ``test`` scan
scores) and adds each measured attribute's best single dimension; :func:`labelled_usefulness` runs it
on any labelled set, holding out a fixed, seeded, class-stratified share (:data:`LABEL_TEST_FRACTION`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .data.base import stratified_holdout
from .metrics import factor_alignment, knn_accuracy, knn_cv_accuracy, linear_probe_accuracy, linear_probe_cv_accuracy
from .metrics.knn import KNN_K

NUM_FOLDS = 5
LABEL_TEST_FRACTION = 0.2  # the share of a user's labelled images the probes are scored on (stratified by class)
LABEL_SPLIT_SEED = 0


def label_usefulness(codes_train: np.ndarray, labels_train: np.ndarray, codes_test: np.ndarray, labels_test: np.ndarray,
                     num_folds: int = NUM_FOLDS, k: int = KNN_K, seed: int = 0) -> Dict[str, Any]:
    """The usefulness of one representation for one label (module docstring).

    Args:
        codes_train, labels_train: (N, D) codes and (N,) labels the classifiers fit on.
        codes_test, labels_test: (M, D) held-out codes and labels they are scored on.
        num_folds: folds of the cross-validated scores, which run over the N + M codes together.
        k: neighbours of the kNN vote.
        seed: seed of the fold assignment.

    Returns:
        dict with ``linear_probe``, ``linear_probe_cv{num_folds}``, ``knn``, ``knn_cv{num_folds}``,
        ``majority_class``, ``num_train``, ``num_test``, ``num_classes``, ``k``, ``num_folds``, ``latent_dim``.
    """
    held_out = {"linear_probe": linear_probe_accuracy(codes_train, labels_train, codes_test, labels_test),
                "knn": knn_accuracy(codes_train, labels_train, codes_test, labels_test, k=k)}
    codes = np.concatenate([np.asarray(codes_train, dtype=np.float64), np.asarray(codes_test, dtype=np.float64)])
    labels = np.concatenate([np.asarray(labels_train), np.asarray(labels_test)])
    classes, counts = np.unique(np.asarray(labels_train), return_counts=True)
    return {
        "linear_probe": held_out["linear_probe"],
        f"linear_probe_cv{num_folds}": linear_probe_cv_accuracy(codes, labels, num_folds=num_folds, seed=seed),
        "knn": held_out["knn"],
        f"knn_cv{num_folds}": knn_cv_accuracy(codes, labels, k=k, num_folds=num_folds, seed=seed),
        "majority_class": float(np.mean(np.asarray(labels_test) == classes[np.argmax(counts)])),
        "num_train": int(len(labels_train)), "num_test": int(len(labels_test)), "num_classes": int(np.unique(labels).size),
        "k": int(k), "num_folds": int(num_folds), "latent_dim": int(np.asarray(codes_train).shape[1]),
    }


def labelled_usefulness(codes: np.ndarray, labels: Sequence[Any], test_fraction: float = LABEL_TEST_FRACTION,
                        seed: int = LABEL_SPLIT_SEED, **kwargs) -> Dict[str, Any]:
    """:func:`label_usefulness` on one labelled set, a class-stratified share ``test_fraction`` of it held out.

    The held-out samples are :func:`~sami_adapter.data.base.stratified_holdout` of the labels with
    ``seed``: the same images for every model scored on the same data. ``kwargs`` go to
    :func:`label_usefulness`; the result adds ``test_fraction`` and ``split_seed``.
    """
    y = np.asarray(labels)
    z = np.asarray(codes, dtype=np.float64)
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0]:
        raise ValueError(f"codes (N, D) and labels (N,) must share N, got {z.shape} and {y.shape}.")
    test = stratified_holdout(y, test_fraction, seed)
    if not test.any():
        raise ValueError(f"holding out {test_fraction:g} of each class leaves no test image ({y.shape[0]} images); "
                         "label more images or raise the held-out share.")
    out = label_usefulness(z[~test], y[~test], z[test], y[test], **kwargs)
    return {**out, "test_fraction": float(test_fraction), "split_seed": int(seed)}


def best_dimensions(codes: np.ndarray, values: np.ndarray, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """For each attribute, the code dimension with the largest ``|Spearman|`` to it and that value
    (:func:`~sami_adapter.metrics.factor_alignment`): ``{name: {"dim": i, "abs_spearman": r}}``."""
    matrix = factor_alignment(codes, values, list(names))["matrix"]
    return {name: {"dim": int(np.argmax(matrix[:, j])), "abs_spearman": float(matrix[:, j].max())} for j, name in enumerate(names)}


def pca_codes(train: np.ndarray, test: np.ndarray, dims: int) -> tuple:
    """The first ``dims`` principal components of flattened images, fit on ``train``: (train codes, test codes)."""
    x_train = np.asarray(train, dtype=np.float64).reshape(len(train), -1)
    x_test = np.asarray(test, dtype=np.float64).reshape(len(test), -1)
    mean = x_train.mean(axis=0)
    _, _, vt = np.linalg.svd(x_train - mean, full_matrices=False)
    basis = vt[: min(dims, vt.shape[0])].T
    return (x_train - mean) @ basis, (x_test - mean) @ basis


def _digits_measure(c_train: np.ndarray, c_test: np.ndarray, resolution: int, seed: int) -> Dict[str, Any]:
    from .data.digits import Digits, digit_split

    _, f_train, _ = digit_split("train", resolution)
    _, f_test, v_test = digit_split("test", resolution)
    return {**label_usefulness(c_train, f_train[:, 0], c_test, f_test[:, 0], seed=seed),
            "attributes": best_dimensions(c_test, v_test[:, 1:], list(Digits.factor_names[1:]))}


def digits_references(resolution: int, dims: int, seed: int = 0) -> Dict[str, Dict[str, Any]]:
    """:func:`digits_usefulness`'s entries for PCA of the pixels at ``dims`` components (fit on ``train``) and for the
    raw pixels: the numbers a ``dims``-dimensional code of the digits is read against."""
    from .data.digits import digit_split

    x_train, x_test = digit_split("train", resolution)[0], digit_split("test", resolution)[0]
    flat_train, flat_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    return {"pca": _digits_measure(*pca_codes(flat_train, flat_test, dims), resolution, seed),
            "pixels": _digits_measure(flat_train, flat_test, resolution, seed)}


def digits_usefulness(encode_fn, resolution: int, batch_size: int = 256, references: bool = True, seed: int = 0) -> Dict[str, Any]:
    """The usefulness of a representation on the real digits: every ``train`` scan fits, every ``test`` scan scores.

    Args:
        encode_fn: images (N, C, H, W) in [-1, 1] -> codes (N, D), as the evaluation's ``encode_fn``.
        resolution: the images' side (the model's).
        batch_size: images per ``encode_fn`` call.
        references: also score PCA of the pixels at the code's size and the raw pixels (:func:`digits_references`).
        seed: seed of the cross-validation folds.

    Returns:
        :func:`label_usefulness` of the class (1438 training and 359 test scans), plus
        ``attributes``: :func:`best_dimensions` of the test codes for ink, slant, width and height,
        and with ``references`` a ``references`` dict of the same entries for ``pca`` and ``pixels``.
    """
    from .data.digits import digit_split
    from .representation import encode_codes

    c_train = encode_codes(encode_fn, torch.from_numpy(digit_split("train", resolution)[0]), batch_size)
    c_test = encode_codes(encode_fn, torch.from_numpy(digit_split("test", resolution)[0]), batch_size)
    out = {**_digits_measure(c_train, c_test, resolution, seed), "label": "digit class", "data": f"digits at {resolution} px"}
    if references:
        out["references"] = digits_references(resolution, c_train.shape[1], seed)
    return out


def usefulness_rows(usefulness: Optional[Dict[str, Any]], prefix: str = "") -> Dict[str, float]:
    """Table rows (label -> value) of a usefulness result, for :func:`~sami_adapter.report.flat_metrics`."""
    if not usefulness:
        return {}
    f, k = usefulness.get("num_folds", NUM_FOLDS), usefulness.get("k", KNN_K)
    rows = {f"{prefix}linear probe (held-out acc.)": usefulness["linear_probe"],
            f"{prefix}linear probe ({f}-fold CV acc.)": usefulness[f"linear_probe_cv{f}"],
            f"{prefix}kNN, k={k} (held-out acc.)": usefulness["knn"],
            f"{prefix}kNN, k={k} ({f}-fold CV acc.)": usefulness[f"knn_cv{f}"]}
    for name, best in (usefulness.get("attributes") or {}).items():
        rows[f"{prefix}best dimension, abs. Spearman, {name}"] = best["abs_spearman"]
    return rows


def usefulness_markdown(usefulness: Dict[str, Any]) -> str:
    """The usefulness section of a report: what was measured, how, and the numbers (with references when present)."""
    f, k = usefulness["num_folds"], usefulness["k"]
    split = (f"a fixed class-stratified {usefulness['test_fraction']:.0%} of the images, drawn with seed {usefulness['split_seed']}"
             if "test_fraction" in usefulness else "the fixed held-out split")
    lines = [
        f"Label: {usefulness.get('label', 'class')}; {usefulness['num_classes']} classes. The classifiers fit on the codes of "
        f"{usefulness['num_train']} images and are scored on {usefulness['num_test']} others ({split}); every dimension is standardised "
        f"with the training codes' statistics. Linear probe: multinomial logistic regression (L2, C = 1); kNN: a vote of the {k} nearest "
        f"training codes. {f}-fold CV: stratified folds over all {usefulness['num_train'] + usefulness['num_test']} labelled images. "
        f"Predicting the most common class scores {usefulness['majority_class']:.3f}.", "",
    ]
    columns = {"code": usefulness, **{name: ref for name, ref in (usefulness.get("references") or {}).items()}}
    headers = {"code": f"code ({usefulness.get('latent_dim', '?')} dims)", "pca": f"PCA of the pixels ({usefulness.get('latent_dim', '?')})",
               "pixels": "raw pixels"}
    rows = [usefulness_rows(c) for c in columns.values()]
    lines += ["| | " + " | ".join(headers.get(n, n) for n in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in rows[0]:
        lines.append(f"| {label} | " + " | ".join(f"{r[label]:.3f}" if label in r else "–" for r in rows) + " |")
    if usefulness.get("attributes"):
        dims = ", ".join(f"{name} z{best['dim']}" for name, best in usefulness["attributes"].items())
        lines += ["", f"Best single dimension of the code (rank correlation on the held-out images): {dims}."]
    return "\n".join(lines)
