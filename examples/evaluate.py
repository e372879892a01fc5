#!/usr/bin/env python
"""Evaluate a SAMI adapter on a dataset with known factors, or on your own images, and write a report folder.

    python examples/evaluate.py sami-disks-adapter --dataset disks --output_dir report
    python examples/evaluate.py sami-digits-adapter --dataset digits --output_dir sami-digits-adapter/evaluation
    python examples/evaluate.py sami-my-adapter --train_data_dir my-images --label_column label --output_dir sami-my-adapter/evaluation

The report folder holds report.md, report.json and PNGs:

* reconstructions.png: held-out inputs (top row) and their reconstructions from the posterior mean;
* traversals.png: one row per active dimension, ordered by characteristic noise level;
* information_profile.png: per-dimension information against noise level;
* samples.png: unconditional samples, ``z ~ N(0, I)``;
* the metric table (MIG, DCI, SAP, modularity, explicitness, FactorVAE) and the per-factor linear
  R² of the posterior mean, the ELBO in bits per dimension, the characteristic-noise-level table
  and, for disks and background_disks adapters, the trajectory curvature on their moving versions (SAMI codes vs pixels);
* for labelled data, the code's usefulness for the label: held-out and 5-fold cross-validated accuracy of a linear
  probe and of a 5-nearest-neighbour vote (``sami_adapter.usefulness``). ``--dataset digits`` measures it for
  the class automatically (fit on every ``train`` scan, scored on every ``test`` scan, against PCA of the pixels at
  the code's size and the raw pixels) with each attribute's best single dimension (ink, slant, width, height).

Your own images: ``--train_data_dir`` / ``--dataset_name`` (the data flags of finetune.py) replace
``--dataset``; there are no factors, so the report holds the axis discovery, the pictures, the ELBO and,
with ``--label_column COL``, the usefulness for that column, a class-stratified ``--label_test_fraction``
of the images (drawn with ``--seed``) held out for the probes' scores. Images are resized (short side,
bicubic) and center-cropped to the UNet's size. With ``--output_dir ADAPTER/evaluation`` the adapter's
model card (README.md) is written again with these numbers.

The defaults run in a few minutes on CPU for the 16 px disks adapter; the metric-size flags trade
time for precision (disentanglement_lib's sizes are far larger).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from _args import (  # noqa: E402
    add_axis_arguments,
    add_device_arguments,
    add_image_source_arguments,
    add_metric_arguments,
    image_data_problem,
    metric_kwargs,
    moving_disks_for,
    open_image_table,
    select_device,
)
from sami_adapter import SAMIPipeline  # noqa: E402
from sami_adapter.adapter import ADAPTER_CONFIG_NAME, read_adapter_config, update_adapter_config  # noqa: E402
from sami_adapter.card import adapter_model_card  # noqa: E402
from sami_adapter.images import model_from_unit  # noqa: E402
from sami_adapter.data import DATASETS, MOVING  # noqa: E402
from sami_adapter.evaluation import elbo_bits_per_dim  # noqa: E402
from sami_adapter.noise_levels import (  # noqa: E402
    default_timestep_grid,
    discover_axes,
    factor_noise_scales,
    factor_recoverability,
    mechanism_table,
)
from sami_adapter.representation import encode_codes, mean_code_fn, representation_metrics, trajectory_curvatures  # noqa: E402
from sami_adapter.plotting import plot_axes, plot_mechanism  # noqa: E402
from sami_adapter.usefulness import LABEL_TEST_FRACTION, digits_usefulness, labelled_usefulness, usefulness_markdown  # noqa: E402
from sami_adapter.report import (  # noqa: E402
    axes_to_json,
    flat_metrics,
    mechanism_markdown,
    metrics_table_markdown,
    profile_table_markdown,
    reconstructions,
    save_image_grid,
    traversal_rows,
    write_json,
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter_dir", help="SAMI adapter directory (what examples/finetune.py writes) or a saved SAMIPipeline.")
    p.add_argument("--dataset", default=None, choices=sorted(DATASETS), help="Evaluation data (default: the adapter's training dataset, else disks).")
    p.add_argument("--output_dir", default="report", help="Report folder.")
    p.add_argument("--seed", type=int, default=0, help="Seed of every draw (data, noise, samples).")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps of reconstructions, traversals and samples.")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta of reconstructions and samples (1: stochastic); traversals always use 0 so a row shares its randomness.")
    p.add_argument("--sami_scale", type=float, default=1.0,
                   help="sami_scale of reconstructions, traversals and samples (1: the exact SAMI decoder; "
                        "above 1 decodes from a sharpened posterior q(z|x_t)^w).")
    p.add_argument("--num_reconstructions", type=int, default=8, help="Images in reconstructions.png.")
    p.add_argument("--num_samples", type=int, default=16, help="Images in samples.png.")
    p.add_argument("--traversal_steps", type=int, default=9, help="Values per traversal row.")
    p.add_argument("--traversal_quantile", type=float, default=0.02,
                   help="Each row spans the [q, 1-q] quantiles of that dimension's posterior mean over the held-out images.")
    p.add_argument("--elbo_images", type=int, default=256, help="Held-out images of the ELBO estimate (at most --num_images).")
    p.add_argument("--elbo_timesteps", type=int, default=8, help="Stratified timesteps per image of the ELBO estimate.")
    p.add_argument("--probe_steps", type=int, default=300,
                   help="Training steps of the noisy-image probe that measures each factor's own noise scale, per noise level (0: skip).")
    add_device_arguments(p)
    add_axis_arguments(p)
    add_metric_arguments(p)
    g = p.add_argument_group("your own images (instead of --dataset)")
    add_image_source_arguments(g)
    g.add_argument("--label_column", default=None,
                   help="A column of class labels (integers or strings, e.g. from a metadata.jsonl): the report then gives the code's "
                        "usefulness for it (linear probe and kNN accuracy).")
    g.add_argument("--label_test_fraction", type=float, default=LABEL_TEST_FRACTION,
                   help="The share of each class held out for the probes' scores (class-stratified, drawn with --seed).")
    args = p.parse_args(argv)
    user_data = bool(args.train_data_dir or args.dataset_name)
    if user_data and args.dataset:
        p.error("use either --dataset or --train_data_dir / --dataset_name, not both")
    if args.label_column and not user_data:
        p.error("--label_column needs --train_data_dir or --dataset_name (the labelled images); a built-in --dataset brings its own factors")
    if not 0.0 < args.label_test_fraction < 1.0:
        p.error("--label_test_fraction must be in (0, 1)")
    problem = image_data_problem(args)
    if problem:
        p.error(problem)
    if args.num_images < 2:
        p.error("--num_images must be >= 2")
    if not 0.0 < args.fraction < 1.0:
        p.error("--fraction must be in (0, 1)")
    if not 0.0 <= args.traversal_quantile < 0.5:
        p.error("--traversal_quantile must be in [0, 0.5)")
    return args


def traversal_values(codes: np.ndarray, dims: List[int], quantile: float, steps: int) -> Dict[str, List[float]]:
    """Each dimension's traversal values: ``steps`` points across the [q, 1-q] quantiles of its posterior mean
    over the held-out codes (a constant dimension gets +-1 around its value)."""
    out = {}
    for d in dims:
        lo, hi = np.quantile(codes[:, d], [quantile, 1 - quantile])
        if hi - lo < 1e-6:
            lo, hi = lo - 1.0, hi + 1.0
        out[f"z{d}"] = np.linspace(lo, hi, steps).tolist()
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the evaluation and write the report; returns the report dict (as saved in report.json)."""
    args = parse_args(argv)
    table = open_image_table(args)  # a missing folder or column fails before any model loads
    device = select_device(args)
    start, timings = time.perf_counter(), {}
    pipe = SAMIPipeline.from_pretrained(args.adapter_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    if pipe.is_latent or pipe.is_text_conditioned:
        raise SystemExit("evaluate.py measures pixel-space, unconditional adapters; this one is latent or text-conditioned.")
    adapter_config = recorded_config(args.adapter_dir)
    resolution = int(pipe.unet.config.sample_size)
    os.makedirs(args.output_dir, exist_ok=True)
    clock = time.perf_counter()
    data = folder_data(args, pipe, table, resolution) if table is not None else builtin_data(args, pipe, adapter_config, resolution)
    timings["data"] = time.perf_counter() - clock  # with the usefulness measurement on labelled data
    dataset, images, title = data["dataset"], data["images"], f"{os.path.basename(os.path.normpath(args.adapter_dir))} on {data['name']}"

    # ---------------------------------------------------------------- axis discovery
    clock = time.perf_counter()
    grid = default_timestep_grid(pipe.scheduler.config.num_train_timesteps, args.num_noise_levels)
    axes = discover_axes(pipe, images, data["values"], data["names"], grid, fraction=args.fraction, kl_threshold=args.kl_threshold,
                         seed=args.seed, batch_size=args.encode_batch_size)
    plot_axes(axes, os.path.join(args.output_dir, "information_profile.png"), title=title)
    timings["axis_discovery"] = time.perf_counter() - clock
    mechanism = None
    if args.probe_steps > 0 and dataset is not None:
        clock = time.perf_counter()
        mechanism = measure_mechanism(args, pipe, dataset, grid, axes, title=title)
        timings["mechanism"] = time.perf_counter() - clock
    clock = time.perf_counter()
    rows, values = draw_pictures(args, pipe, images, axes)
    timings["pictures"] = time.perf_counter() - clock

    # ---------------------------------------------------------------- metrics
    metrics = None
    if dataset is not None:
        clock = time.perf_counter()
        metrics = representation_metrics(mean_code_fn(pipe), dataset, **metric_kwargs(args))
        timings["metrics"] = time.perf_counter() - clock
    clock = time.perf_counter()
    elbo = elbo_bits_per_dim(pipe, images[: min(args.elbo_images, images.shape[0])], args.elbo_timesteps, seed=args.seed,
                             batch_size=args.encode_batch_size)
    timings["elbo"] = time.perf_counter() - clock
    use_trajectories = dataset is not None and (args.trajectories if args.trajectories is not None else data["name"] in MOVING)
    trajectories = None
    if use_trajectories:
        clock = time.perf_counter()
        trajectories = trajectory_curvatures(mean_code_fn(pipe), moving_disks_for(args, resolution, data["name"]), args.encode_batch_size)
        timings["trajectories"] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - start

    report: Dict[str, Any] = {
        "adapter_dir": os.path.abspath(args.adapter_dir),
        "base_model": adapter_config.get("base_model_name_or_path"),
        "unet_mode": adapter_config.get("unet_mode"),
        "adapter_train_seconds": (adapter_config.get("metrics") or {}).get("train_seconds"),
        "dataset": data["name"],
        "data": data["description"],
        "resolution": resolution,
        "latent_dim": pipe.latent_dim,
        "device": device,
        "num_images": int(images.shape[0]),
        "num_inference_steps": args.num_inference_steps,
        "metrics": metrics,
        "usefulness": data["usefulness"],
        "elbo": elbo,
        "trajectories": trajectories,
        "axis_discovery": axes_to_json(axes),
        "mechanism": mechanism,
        "traversal": {"rows": [f"z{d}" for d in rows], "ranges": {k: [v[0], v[-1]] for k, v in values.items()},
                      "values_per_row": args.traversal_steps},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    write_json(os.path.join(args.output_dir, "report.json"), report)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report_markdown(report, axes, args))
    card = refresh_model_card(args)
    print(f"Report written to {os.path.join(args.output_dir, 'report.md')} in {timings['total']:.0f} s" + (f"; model card {card}." if card else "."))
    return report


def builtin_data(args: argparse.Namespace, pipe: SAMIPipeline, adapter_config: Dict[str, Any], resolution: int) -> Dict[str, Any]:
    """Held-out images of a built-in dataset (its ``test`` split: for digits the fixed held-out scans) with their factors,
    and for digits the code's usefulness for the class."""
    name = args.dataset or (adapter_config["training"].get("dataset") if adapter_config["training"].get("dataset") in DATASETS else "disks")
    dataset = DATASETS[name](num_samples=1, resolution=resolution, seed=args.seed + 30_000, split="test")
    if dataset.num_channels != pipe.unet.config.in_channels:
        raise SystemExit(f"{name} has {dataset.num_channels} channel(s) but the adapter's UNet takes {pipe.unet.config.in_channels}.")
    # A finite set (digits) gives each held-out image once rather than repeats.
    num = min(args.num_images, getattr(dataset, "split_size", args.num_images))
    images, _, values = dataset.sample(num, np.random.default_rng([args.seed, 100]))
    usefulness = digits_usefulness(mean_code_fn(pipe), resolution, args.encode_batch_size, seed=args.seed) if name == "digits" else None
    held_out = "the fixed held-out split" if hasattr(dataset, "split_size") else f"fresh held-out draws (seed {args.seed})"
    return {"name": name, "dataset": dataset, "images": images, "values": values, "names": list(dataset.factor_names),
            "usefulness": usefulness, "description": f"`{name}` at {resolution} px, {held_out}"}


def folder_data(args: argparse.Namespace, pipe: SAMIPipeline, table, resolution: int) -> Dict[str, Any]:
    """The user's images (--train_data_dir / --dataset_name), resized and center-cropped as finetune.py reads them, and with
    --label_column the code's usefulness for that column."""
    from sami_adapter.training import ImageDataset

    source = args.train_data_dir or args.dataset_name
    try:
        images = ImageDataset.from_datasets(table, args.image_column, resolution, pipe.unet.config.in_channels, center_crop=True,
                                                  seed=args.seed)
    except ValueError as e:  # a model with other than 1 or 3 channels
        raise SystemExit(f"{source!r}: {e}") from e
    order = np.random.default_rng([args.seed, 100]).permutation(len(images))[: args.num_images]
    shown = torch.stack([images[int(i)]["pixel_values"] for i in order])
    usefulness = None
    if args.label_column:
        labels = read_labels(table, args.label_column)
        encode = mean_code_fn(pipe)
        codes = np.concatenate([encode_codes(encode, torch.stack([images[i]["pixel_values"] for i in range(s, min(s + args.encode_batch_size, len(images)))]))
                                for s in range(0, len(images), args.encode_batch_size)])
        try:
            usefulness = labelled_usefulness(codes, labels, args.label_test_fraction, seed=args.seed)
        except ValueError as e:  # a single class, or too few images to hold any out
            raise SystemExit(f"--label_column {args.label_column!r}: {e}") from e
        usefulness["label"] = args.label_column
    return {"name": os.path.basename(os.path.normpath(source)), "dataset": None, "images": shown, "values": None, "names": None,
            "usefulness": usefulness, "description": f"`{source}`: {len(images)} images, resized and center-cropped to {resolution} px"}


def read_labels(table, column: str) -> np.ndarray:
    """The ``column`` of the table as one class label per image (integers or strings); SystemExit naming a bad entry."""
    labels = list(table[column])
    for i, label in enumerate(labels):
        if label is None:
            raise SystemExit(f"--label_column {column!r}: image {i} has no label; label every image or leave it out of the data.")
        if not isinstance(label, (str, int, np.integer, float)) or isinstance(label, float) and not float(label).is_integer():
            raise SystemExit(f"--label_column {column!r} must hold one class per image (an integer or a string); image {i} has {label!r}.")
    return np.asarray(labels)


def refresh_model_card(args: argparse.Namespace) -> Optional[str]:
    """When the report went to ADAPTER/evaluation, write the adapter's model card again (it shows that report's numbers);
    returns the card's path, or None."""
    evaluation_dir = os.path.join(args.adapter_dir, "evaluation")
    if not os.path.isfile(os.path.join(args.adapter_dir, ADAPTER_CONFIG_NAME)) or os.path.realpath(args.output_dir) != os.path.realpath(evaluation_dir):
        return None
    config = read_adapter_config(args.adapter_dir)
    repo_id = (config.get("training") or {}).get("push_to_hub") if isinstance(config.get("training"), dict) else None
    update_adapter_config(args.adapter_dir, {}, str(adapter_model_card(config, args.adapter_dir, repo_id)))
    return os.path.join(args.adapter_dir, "README.md")


def recorded_config(adapter_dir: str) -> Dict[str, Any]:
    """The adapter's sami_adapter_config.json ({} when unreadable), its ``training`` entry always a dict."""
    try:
        config = read_adapter_config(adapter_dir)
    except OSError:
        config = {}
    return {**config, "training": config.get("training") if isinstance(config.get("training"), dict) else {}}


def measure_mechanism(args: argparse.Namespace, pipe: SAMIPipeline, dataset, grid, axes: Dict[str, Any], title: str) -> Dict[str, Any]:
    """Each factor's own noise scale (a noisy-image probe) against the level of the dimension that codes it; mechanism.png."""
    recover = factor_recoverability(dataset, pipe.scheduler.alphas_cumprod, grid, num_steps=args.probe_steps, seed=args.seed)
    scales = factor_noise_scales(recover, args.fraction)
    mechanism = {**mechanism_table(axes["levels"], axes["alignment"], scales), "factor_noise_scales": scales,
                 "recoverability": {"timesteps": recover["timesteps"], "r2": recover["r2"], "names": recover["names"]}}
    plot_mechanism(axes["profile"], axes["levels"], recover, mechanism, os.path.join(args.output_dir, "mechanism.png"), title=title)
    return mechanism


def draw_pictures(args: argparse.Namespace, pipe: SAMIPipeline, images: torch.Tensor, axes: Dict[str, Any]) -> tuple:
    """reconstructions.png, traversals.png (one row per active dimension, by noise level) and samples.png; returns the
    traversed dimensions and their values."""
    n_rec = min(args.num_reconstructions, images.shape[0])
    rec = reconstructions(pipe, images[:n_rec], args.num_inference_steps, args.eta, args.seed, sami_scale=args.sami_scale)
    save_image_grid(torch.cat([images[:n_rec], rec]), os.path.join(args.output_dir, "reconstructions.png"), nrow=n_rec, scale=4)
    rows = axes["levels"]["order"] or [int(np.argmax(np.asarray(axes["profile"]["kl"])[0]))]
    values = traversal_values(axes["codes"], rows, args.traversal_quantile, args.traversal_steps)
    traversal = traversal_rows(pipe, images[:1], rows, list(values.values()), args.num_inference_steps, args.seed, args.sami_scale)
    save_image_grid(traversal, os.path.join(args.output_dir, "traversals.png"), nrow=args.traversal_steps, scale=4)
    samples = pipe(batch_size=args.num_samples, num_inference_steps=args.num_inference_steps, eta=args.eta,
                   generator=torch.Generator().manual_seed(args.seed + 1), output_type="pt", sami_scale=args.sami_scale).images.cpu()
    samples = model_from_unit(samples)  # pt output is [0, 1] (diffusers); the grid takes the datasets' [-1, 1]
    save_image_grid(samples, os.path.join(args.output_dir, "samples.png"), nrow=min(8, args.num_samples), scale=4)
    return rows, values


def report_markdown(report: Dict[str, Any], axes: Dict[str, Any], args: argparse.Namespace) -> str:
    """The report.md text."""
    metrics, usefulness = report["metrics"], report["usefulness"]
    flat = flat_metrics({**(metrics or {}), "elbo": report["elbo"], "trajectories": report["trajectories"]})  # usefulness: its own section
    fitted = (f"metrics fit on {metrics['num_train']} and score on {metrics['num_test']} observations; FactorVAE with "
              f"{args.factor_vae_train}/{args.factor_vae_eval} votes of {args.factor_vae_batch}") if metrics else "no ground-truth factors"
    lines = [
        "# SAMI evaluation report", "",
        f"- adapter: `{report['adapter_dir']}` (base `{report['base_model']}`, UNet mode {report['unet_mode']}, "
        f"adapter training {report['adapter_train_seconds']} s)",
        f"- data: {report['data']}; latent_dim {report['latent_dim']}",
        f"- representation: the posterior mean of `q(z | x_0)`; {fitted}",
        f"- sampling: DDIM, {args.num_inference_steps} steps, sami_scale {args.sami_scale:g}; device {report['device']}; total {report['seconds']['total']} s", "",
        "## Metrics", "",
        metrics_table_markdown({"SAMI": flat}), "",
    ]
    if metrics:
        lines += ["Linear R² is an in-sample least-squares fit of each continuous factor value from the posterior mean (all dimensions).", ""]
    if usefulness:
        lines += ["## Usefulness for the label", "", usefulness_markdown(usefulness), ""]
    return "\n".join(lines + elbo_lines(report["elbo"]) + axis_lines(report, axes, args) + picture_lines(report, args))


def elbo_lines(elbo: Dict[str, Any]) -> List[str]:
    """The ELBO section of report.md."""
    return [
        "## ELBO", "",
        f"SAMI bound: **{elbo['bpd']:.4f} ± {elbo['bpd_stderr']:.4f} bits/dim** ({elbo['nats_per_image']:.1f} nats per image, "
        f"of which KL {elbo['kl_nats']:.2f} nats); the base model's own bound on the same noise and timesteps (guidance off, no KL): "
        f"{elbo['unguided_bpd']:.4f} bits/dim. {elbo['num_images']} images x {elbo['timesteps_per_image']} stratified timesteps, "
        f"`sami_loss(weighting='elbo', beta=1)`.",
        "The pixels are continuous values in [-1, 1], so this is a continuous-density bpd (it can be negative and is not "
        "the discrete 8-bit bpd of image benchmarks).", "",
    ]


def axis_lines(report: Dict[str, Any], axes: Dict[str, Any], args: argparse.Namespace) -> List[str]:
    """The axis-discovery, mechanism and trajectory sections of report.md."""
    profile, levels = axes["profile"], axes["levels"]
    kl0 = np.asarray(profile["kl"])[0]
    lines = [
        "## Axis discovery", "",
        f"Active dimensions (data-mean KL to the prior > {args.kl_threshold} nats): {levels['active']} of {len(kl0)}. "
        f"KL per dimension: {[round(float(v), 3) for v in kl0]}.", "",
        "Information of `q(z_i | x_t)`: the Gaussian channel capacity `I_i(t) = 1/2 log(1 + Var[mu_i(x_t)] / E[sigma_i^2(x_t)])` "
        f"in nats over {profile['num_images']} held-out images (one noise draw each). A dimension's characteristic noise level t* is "
        f"where `I_i(t)` first falls below {args.fraction:g} of `I_i(0)`, linearly interpolated between the "
        f"{len(profile['timesteps'])} grid levels; `s_t*` is the noise scale there (`x_t = a_t x_0 + s_t eps`).", "",
        profile_table_markdown(profile, levels, axes.get("alignment")), "",
    ]
    if "factor_order" in report["axis_discovery"]:
        order, fl = report["axis_discovery"]["factor_order"], report["axis_discovery"]["factor_noise_levels"]
        lines += [
            "Factor order by characteristic noise level (a factor takes the t* of the measured dimension whose best-matching factor it is; "
            "factors no dimension stands for are left out): " + (" < ".join(f"{n} ({fl[n]:.0f})" for n in order) if order else "none measured")
            + ".", "",
        ]
    lines += ["![information profile](information_profile.png)", ""]
    if report["mechanism"] is not None:
        lines += [
            "## The mechanism: each dimension at its factor's noise scale", "",
            "A factor's own noise scale is where a probe (the same small MLP for every factor, trained on noisy images `x_t` at each "
            f"level) recovers less than {args.fraction:g} of its clean R²; a dimension codes the factor its clean posterior mean is most "
            "rank-correlated with.", "",
            mechanism_markdown(report["mechanism"]), "",
            "![mechanism](mechanism.png)", "",
        ]
    traj = report["trajectories"]
    if traj:
        lines += [
            f"## Trajectory curvature (moving {report['dataset']})", "",
            f"Mean turning angle between successive displacements over {traj['num_sequences']} videos of {traj['num_frames']} frames: "
            f"SAMI posterior means **{traj['latent']:.1f}°**, pixels {traj['pixels']:.1f}°, ground-truth factor path "
            f"{traj['factors']:.1f}°.", "",
        ]
    return lines


def picture_lines(report: Dict[str, Any], args: argparse.Namespace) -> List[str]:
    """The pictures section of report.md."""
    ranges = report["traversal"]["ranges"]
    return [
        "## Pictures", "",
        "![reconstructions](reconstructions.png)", "",
        "Top row: held-out inputs; bottom row: reconstructions from the posterior mean.", "",
        "![traversals](traversals.png)", "",
        "One row per active dimension, ordered by characteristic noise level (lowest t* first): "
        + ", ".join(f"{d} [{lo:.2f}, {hi:.2f}]" for d, (lo, hi) in ranges.items())
        + f". Each row sweeps the [{args.traversal_quantile:g}, {1 - args.traversal_quantile:g}] quantiles of that dimension's posterior "
        "mean over the held-out images, starting from the first image's code, with one shared initial noise.", "",
        "![samples](samples.png)", "",
        "Unconditional samples: `z ~ N(0, I)`, guided DDIM.", "",
    ]


if __name__ == "__main__":
    main()
