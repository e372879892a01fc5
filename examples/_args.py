"""Command-line flags that examples/evaluate.py and examples/compare.py share.

The library takes explicit parameters; this file turns the shared metric-size flags into them.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict

from sami_adapter.data import MovingDisks


def add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    """The metric-size flags (defaults: a few CPU minutes at 16 px)."""
    g = parser.add_argument_group("metric sizes")
    g.add_argument("--num_train", type=int, default=2000, help="Labelled observations the metrics fit on (disentanglement_lib: 10000).")
    g.add_argument("--num_test", type=int, default=1000, help="Held-out observations the metrics score on (disentanglement_lib: 5000).")
    g.add_argument("--num_bins", type=int, default=20, help="Histogram bins of MIG and modularity.")
    g.add_argument("--dci_max_train", type=int, default=None, help="Fit DCI's classifiers on at most this many observations.")
    g.add_argument("--dci_estimators", type=int, default=None, help="n_estimators of DCI's gradient boosting (default: sklearn's 100).")
    g.add_argument("--factor_vae_train", type=int, default=500, help="FactorVAE training votes (disentanglement_lib: 10000).")
    g.add_argument("--factor_vae_eval", type=int, default=300, help="FactorVAE evaluation votes (disentanglement_lib: 5000).")
    g.add_argument("--factor_vae_batch", type=int, default=64, help="Observations per FactorVAE vote.")
    g.add_argument("--num_variance_estimate", type=int, default=2000, help="Observations of FactorVAE's global scale.")
    g.add_argument("--trajectories", dest="trajectories", action="store_true", default=None,
                   help="Measure trajectory curvature on moving_disks (default: on for disks).")
    g.add_argument("--no_trajectories", dest="trajectories", action="store_false", help="Skip the trajectory curvature.")
    g.add_argument("--num_sequences", type=int, default=200, help="moving_disks videos for the trajectory curvature.")
    g.add_argument("--num_frames", type=int, default=8, help="Frames per moving_disks video.")
    g.add_argument("--encode_batch_size", type=int, default=256, help="Images per encoder call.")


def metric_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """:func:`sami_adapter.report.representation_metrics` keyword arguments from the flags above."""
    return {
        "num_train": args.num_train, "num_test": args.num_test, "seed": args.seed, "batch_size": args.encode_batch_size,
        "num_bins": args.num_bins, "dci_max_train": args.dci_max_train, "dci_estimators": args.dci_estimators,
        "factor_vae_train": args.factor_vae_train, "factor_vae_eval": args.factor_vae_eval,
        "factor_vae_batch": args.factor_vae_batch, "num_variance_estimate": args.num_variance_estimate,
    }


def moving_disks_for(args: argparse.Namespace, resolution: int) -> MovingDisks:
    """The held-out ``moving_disks`` set of the curvature measurement (seed offset from ``--seed``)."""
    return MovingDisks(num_sequences=args.num_sequences, num_frames=args.num_frames, resolution=resolution, seed=args.seed + 20_000)
