"""FactorVAE score (Kim & Mnih 2018), as disentanglement_lib."""

from __future__ import annotations

from typing import Callable, Dict, Union

import numpy as np
import torch

from ..data.base import FactorDataset

RepresentationFn = Callable[[torch.Tensor], Union[np.ndarray, torch.Tensor]]


def _codes(representation_fn: RepresentationFn, images: torch.Tensor) -> np.ndarray:
    """``representation_fn(images)`` as a float64 (N, D) numpy array."""
    codes = representation_fn(images)
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2 or codes.shape[0] != images.shape[0]:
        raise ValueError(f"representation_fn must return (N, D) codes for N={images.shape[0]} images, got {codes.shape}.")
    return codes


def _votes(
    representation_fn: RepresentationFn,
    dataset: FactorDataset,
    num_votes: int,
    batch_size: int,
    rng: np.random.Generator,
    global_std: np.ndarray,
    active: np.ndarray,
) -> np.ndarray:
    """Vote counts (K factors, D dims): for each vote, which dim varied least with which factor fixed."""
    active_dims = np.flatnonzero(active)
    votes = np.zeros((dataset.num_factors, global_std.size), dtype=np.int64)
    for _ in range(num_votes):
        factor = int(rng.integers(dataset.num_factors))
        images, _, _ = dataset.sample(batch_size, rng, fixed_factor=factor)
        codes = _codes(representation_fn, images)[:, active_dims] / global_std[active_dims]
        votes[factor, active_dims[np.argmin(np.var(codes, axis=0, ddof=1))]] += 1
    return votes


def factor_vae_score(
    representation_fn: RepresentationFn,
    dataset: FactorDataset,
    num_train: int = 500,
    num_eval: int = 300,
    batch_size: int = 64,
    num_variance_estimate: int = 2000,
    seed: int = 0,
    prune_threshold: float = 0.05,
) -> Dict[str, float]:
    """FactorVAE disentanglement score as disentanglement_lib's ``factor_vae.compute_factor_vae``.

    Definition:

    1. Global scale: the standard deviation ``s_d`` (ddof=1) of every code dimension over
       ``num_variance_estimate`` random observations. Dimensions with ``s_d < prune_threshold``
       (disentanglement_lib's ``prune_dims.threshold = 0.05``, applied to the standard deviation)
       or ``s_d = 0`` are inactive and never vote.
    2. One vote: draw a factor ``k`` uniformly, then ``batch_size`` observations that all share
       factor ``k`` (``dataset.sample(batch_size, rng, fixed_factor=k)``); divide their codes by
       ``s`` and take the active dimension ``d`` with the smallest variance (ddof=1). The vote is
       the pair ``(d, k)``.
    3. Classifier: from ``num_train`` votes, the majority-vote classifier maps each dimension to
       the factor it was most often paired with. Accuracy = share of votes ``(d, k)`` with
       ``classifier(d) = k``: on the training votes (``train_accuracy``) and on ``num_eval``
       fresh votes (``eval_accuracy``).

    One difference from disentanglement_lib's code, kept on purpose: it takes the ``argmin`` over
    the active dimensions only and records that position as if it were the dimension itself, so
    whenever a dimension before the winner was pruned, the vote names the wrong dimension. Here the
    position is mapped back to the dimension (``active_dims[argmin]``), as the definition says. The
    accuracies come out the same (that relabelling is one-to-one); the votes and the classifier's
    dimension-to-factor map differ whenever a dimension is pruned.

    Args:
        representation_fn: maps images (N, C, H, W) in [-1, 1] to codes (N, D) (numpy or tensor).
        dataset: a :class:`FactorDataset` to draw observations from.
        num_train: votes to build the classifier (disentanglement_lib uses 10000).
        num_eval: votes to evaluate it (disentanglement_lib uses 5000).
        batch_size: observations per vote (64 as disentanglement_lib).
        num_variance_estimate: observations for the global scale (disentanglement_lib: 10000).
        seed: seed of all draws.
        prune_threshold: minimum global standard deviation of an active dimension.

    Returns:
        dict with ``train_accuracy``, ``eval_accuracy`` (0 when no dimension is active) and
        ``num_active_dims``.
    """
    if batch_size < 2 or num_variance_estimate < 2:
        raise ValueError("batch_size and num_variance_estimate must be >= 2.")
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, num_variance_estimate, batch_size):
        images, _, _ = dataset.sample(min(batch_size, num_variance_estimate - start), rng)
        chunks.append(_codes(representation_fn, images))
    global_std = np.std(np.concatenate(chunks), axis=0, ddof=1)
    active = (global_std >= prune_threshold) & (global_std > 0)
    if not active.any():
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}
    train_votes = _votes(representation_fn, dataset, num_train, batch_size, rng, global_std, active)
    classifier = np.argmax(train_votes, axis=0)
    columns = np.arange(train_votes.shape[1])
    eval_votes = _votes(representation_fn, dataset, num_eval, batch_size, rng, global_std, active)
    return {
        "train_accuracy": float(train_votes[classifier, columns].sum() / max(train_votes.sum(), 1)),
        "eval_accuracy": float(eval_votes[classifier, columns].sum() / max(eval_votes.sum(), 1)),
        "num_active_dims": int(active.sum()),
    }
