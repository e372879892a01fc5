"""Command-line flags that the example scripts share.

The library takes explicit parameters; this file defines the flags several scripts take (metric
sizes, axis discovery, device for evaluate.py and compare.py; the encoder's widths for finetune.py and
benchmark.py; the image-data flags of finetune.py, pretrain_unet.py and evaluate.py) and turns them
into those parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
from typing import Any, Dict, Optional, Tuple

import torch

from sami_adapter import hf_data
from sami_adapter.data import MOVING, MovingDisks
from sami_adapter.encoder import ACTIVE_KL_NATS


ENCODER_CHANNELS_RULE = "comma-separated multiples of 8 (the encoder's GroupNorm has 8 groups)"


def parse_encoder_channels(text: str) -> Tuple[int, ...]:
    """``--encoder_channels``, e.g. ``"32,64"``, as block widths; ValueError naming the rule otherwise."""
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        channels = ()
    if not channels or min(channels) < 8 or any(c % 8 for c in channels):
        raise ValueError(ENCODER_CHANNELS_RULE)
    return channels


def add_axis_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the axis-discovery pass (information profile, characteristic noise levels)."""
    g = parser.add_argument_group("axis discovery")
    g.add_argument("--num_images", type=int, default=512, help="Held-out images of the information profile (evaluate.py: also of the ELBO).")
    g.add_argument("--num_noise_levels", type=int, default=21, help="Timesteps of the information profile (evenly spaced, 0 included).")
    g.add_argument("--fraction", type=float, default=0.5,
                   help="Characteristic noise level: where a dimension's information falls below this share of its clean value.")
    g.add_argument("--kl_threshold", type=float, default=ACTIVE_KL_NATS, help="Active dimension: data-mean KL to the prior above this many nats.")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--num_threads``; :func:`select_device` applies them."""
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu).")
    parser.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")


def select_device(args: argparse.Namespace) -> str:
    """Apply ``--num_threads`` and return the device of ``--device`` (cuda when available, else cpu)."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


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
                   help="Measure trajectory curvature on the dataset's moving version (default: on for disks and background_disks).")
    g.add_argument("--no_trajectories", dest="trajectories", action="store_false", help="Skip the trajectory curvature.")
    g.add_argument("--num_sequences", type=int, default=200, help="moving_disks videos for the trajectory curvature.")
    g.add_argument("--num_frames", type=int, default=8, help="Frames per moving_disks video.")
    g.add_argument("--encode_batch_size", type=int, default=256, help="Images per encoder call.")


def metric_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """:func:`sami_adapter.representation.representation_metrics` keyword arguments from the flags above."""
    return {
        "num_train": args.num_train, "num_test": args.num_test, "seed": args.seed, "batch_size": args.encode_batch_size,
        "num_bins": args.num_bins, "dci_max_train": args.dci_max_train, "dci_estimators": args.dci_estimators,
        "factor_vae_train": args.factor_vae_train, "factor_vae_eval": args.factor_vae_eval,
        "factor_vae_batch": args.factor_vae_batch, "num_variance_estimate": args.num_variance_estimate,
    }


def moving_disks_for(args: argparse.Namespace, resolution: int, dataset: str = "disks") -> MovingDisks:
    """The held-out videos of the curvature measurement (the moving version of ``dataset``; seed offset from ``--seed``)."""
    return MOVING[dataset](num_sequences=args.num_sequences, num_frames=args.num_frames, resolution=resolution, seed=args.seed + 20_000)


def add_image_source_arguments(group) -> None:
    """The flags that name the user's images: a folder or a `datasets` dataset, and its image column."""
    group.add_argument("--train_data_dir", default=None,
                       help="A folder of images (searched recursively) read with `datasets`' imagefolder builder: a metadata.jsonl "
                            "beside them adds columns such as captions or labels. Instead of --dataset.")
    group.add_argument("--dataset_name", default=None,
                       help="A `datasets` dataset: a Hub id (e.g. huggan/smithsonian_butterflies_subset), a local folder that "
                            "datasets.load_dataset reads (images, parquet/csv/json files), or a folder written by save_to_disk.")
    group.add_argument("--dataset_config_name", default=None, help="Configuration of --dataset_name, when it has several.")
    group.add_argument("--cache_dir", default=None, help="Where `datasets` keeps downloaded and prepared data (default: its own cache).")
    group.add_argument("--image_column", default="image", help="Image column of --dataset_name / --train_data_dir.")


def add_image_training_arguments(group) -> None:
    """How training reads the user's images: crop, flip, decoding workers."""
    group.add_argument("--center_crop", action="store_true", help="Center-crop folder images (default: random crop).")
    group.add_argument("--random_flip", action="store_true", help="Randomly flip folder images horizontally.")
    group.add_argument("--dataloader_num_workers", type=int, default=0,
                       help="Processes that decode file data (0: in the training process). Results do not depend on it.")


def image_data_problem(args: argparse.Namespace) -> Optional[str]:
    """The image-data flags' problem (:func:`add_image_source_arguments`, :func:`add_image_training_arguments`), or None. A --dataset_name is looked up (a
    local folder resolved, a Hub id asked for with a 10 s limit) but nothing is downloaded or decoded."""
    if args.train_data_dir and args.dataset_name:
        return "use either --train_data_dir or --dataset_name, not both"
    if args.train_data_dir and not os.path.isdir(args.train_data_dir):
        return f"--train_data_dir {args.train_data_dir!r} is not a directory"
    if getattr(args, "dataloader_num_workers", 0) < 0:
        return f"--dataloader_num_workers must be an integer >= 0, got {args.dataloader_num_workers!r}"
    if args.dataset_config_name and not args.dataset_name:
        return "--dataset_config_name needs --dataset_name (the dataset it configures)"
    if args.dataset_name:
        problem = hf_data.source_problem(args.dataset_name, args.dataset_config_name, args.cache_dir)
        if problem and "has no configuration" in problem:
            return f"--dataset_config_name names a configuration of --dataset_name: {problem}"
        if problem:
            return f"--dataset_name takes a Hub dataset id, a local dataset folder or a save_to_disk folder: {problem}"
    elif args.train_data_dir and importlib.util.find_spec("datasets") is None:
        return f"--train_data_dir {hf_data.DATASETS_HINT}"
    return None


def open_image_table(args: argparse.Namespace, accelerator=None):
    """The `datasets.Dataset` of --dataset_name / --train_data_dir with its columns checked (--image_column and,
    where the script has them, --caption_column and --label_column); None for a built-in --dataset.

    With an ``accelerator`` one process prepares the `datasets` cache and the others then read it.
    """
    if not (args.train_data_dir or args.dataset_name):
        return None
    flag, source = ("--train_data_dir", args.train_data_dir) if args.train_data_dir else ("--dataset_name", args.dataset_name)
    try:
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            table = hf_data.load_split(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.cache_dir)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, DatasetGenerationError, ...)
        found = "no images found: " if type(e).__name__ == "EmptyDatasetError" else ""
        raise SystemExit(f"{flag} {source!r}: {found}`datasets` could not load it ({type(e).__name__}: {e})") from e
    if len(table) == 0:
        raise SystemExit(f"{flag} {source!r}: the training data is empty (no images found); pass a folder or dataset with images.")
    for column_flag in ("image_column", "caption_column", "label_column"):
        column = getattr(args, column_flag, None)
        if column is not None and column not in table.column_names:
            raise SystemExit(f"--{column_flag} {column!r} is not a column of {source} (columns: {', '.join(table.column_names)}); "
                             f"pass --{column_flag} with one of them.")
    return table
