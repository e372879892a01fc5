#!/usr/bin/env python
"""SAMI against β-VAE (β = 1, 4) and a DiffAE-style autoencoder in one harness, side by side.

    python examples/compare.py --dataset disks --budget_seconds 600 --sami_adapter sami-disks-adapter --seeds 0 1

Every baseline uses the SAMI adapter's encoder architecture (block widths, head width, latent size,
resolution), is trained on fresh samples of the same dataset for the same wall-clock budget (by
default the adapter's recorded ``train_seconds``), once per seed, and is evaluated with exactly the
same metrics on exactly the same held-out draws as SAMI (:func:`sami_adapter.report.representation_metrics`;
the posterior mean is the representation). Several ``--sami_adapter`` directories (e.g. two
training seeds) make SAMI's column a mean ± std and are compared on the order in which their
characteristic noise levels put the factors.

Output (``--output_dir``, default ``compare/``): compare.md and compare.json (the table and every
number), reconstructions.png (inputs, then one row per model), metrics.png (bar chart) and one
information-profile plot per SAMI adapter. The SAMI adapter's budget covers the adapter only, not
the pretraining of its base diffusion model; the table says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _args import add_axis_arguments, add_device_arguments, add_metric_arguments, metric_kwargs, moving_disks_for, select_device  # noqa: E402
from sami_adapter import SAMIEncoder, SAMIPipeline  # noqa: E402
from sami_adapter.adapter import read_adapter_config  # noqa: E402
from sami_adapter.baselines import train_beta_vae, train_diffae  # noqa: E402
from sami_adapter.data import DATASETS, FactorDataset  # noqa: E402
from sami_adapter.evaluation import default_timestep_grid, noise_order_agreement  # noqa: E402
from sami_adapter.report import (  # noqa: E402
    EncodeFn,
    aggregate,
    axes_to_json,
    discover_axes,
    flat_metrics,
    mean_code_fn,
    metrics_table_markdown,
    plot_axes,
    plot_metric_bars,
    reconstructions,
    representation_metrics,
    save_image_grid,
    trajectory_curvatures,
    write_json,
)

DEFAULT_BUDGET = 300.0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="disks", choices=sorted(DATASETS), help="Training and evaluation data.")
    p.add_argument("--sami_adapter", nargs="*", default=[], help="SAMI adapter directories (several: e.g. one per training seed).")
    p.add_argument("--budget_seconds", type=float, default=None,
                   help=f"Wall-clock training budget of each baseline run (default: the first adapter's train_seconds, else {DEFAULT_BUDGET:g}).")
    p.add_argument("--max_steps", type=int, default=None, help="Also stop each baseline after this many steps (tests, quick looks).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Training seeds of the baselines.")
    p.add_argument("--betas", type=float, nargs="+", default=[1.0, 4.0], help="β values of the β-VAE.")
    p.add_argument("--no_beta_vae", action="store_true", help="Skip the β-VAE.")
    p.add_argument("--no_diffae", action="store_true", help="Skip the DiffAE baseline.")
    p.add_argument("--latent_dim", type=int, default=None, help="Code size (default: the SAMI adapter's, else 8).")
    p.add_argument("--resolution", type=int, default=None, help="Image side (default: the SAMI adapter's, else 16).")
    p.add_argument("--batch_size", type=int, default=64, help="Baseline training batch size.")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate of the β-VAE.")
    p.add_argument("--diffae_lr", type=float, default=5e-4, help="Adam learning rate of the DiffAE.")
    p.add_argument("--diffae_unet_channels", default="32,64,64", help="DiffAE UNet block widths (default: the disks base model's).")
    p.add_argument("--output_dir", default="compare", help="Where compare.md, compare.json and the figures go.")
    p.add_argument("--save_models", action="store_true", help="Also save every trained baseline (save_pretrained) under OUTPUT_DIR/models/.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the evaluation draws (the same for every model).")
    p.add_argument("--num_reconstructions", type=int, default=8, help="Inputs in reconstructions.png.")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps of SAMI and DiffAE reconstructions.")
    p.add_argument("--no_progress", action="store_true", help="Hide training progress bars.")
    add_device_arguments(p)
    add_axis_arguments(p)
    add_metric_arguments(p)
    args = p.parse_args(argv)
    if args.no_beta_vae and args.no_diffae and not args.sami_adapter:
        p.error("nothing to compare: give --sami_adapter or leave a baseline on")
    return args


def _encoder_architecture(pipes: List[SAMIPipeline], args: argparse.Namespace) -> Dict[str, Any]:
    """The encoder settings every baseline copies: the first SAMI adapter's, else SAMI's defaults."""
    if pipes:
        cfg = pipes[0].encoder.config
    else:  # SAMIEncoder's own defaults
        cfg = SAMIEncoder.from_config({}).config
    arch = {"encoder_channels": tuple(cfg.block_out_channels), "hidden_dim": cfg.hidden_dim, "norm_num_groups": cfg.norm_num_groups,
            "encoder_stem_stride": cfg.stem_stride, "latent_dim": cfg.latent_dim, "resolution": cfg.sample_size}
    if args.latent_dim is not None:
        arch["latent_dim"] = args.latent_dim
    if args.resolution is not None:
        if pipes and args.resolution != arch["resolution"]:
            raise SystemExit(f"--resolution {args.resolution} differs from the SAMI adapter's {arch['resolution']} px.")
        arch["resolution"] = args.resolution
    return arch


def _adapter_seconds(adapter_dir: str) -> Optional[float]:
    try:
        config = read_adapter_config(adapter_dir)
    except OSError:
        return None
    value = (config.get("metrics") or {}).get("train_seconds")
    return float(value) if value is not None else None


def evaluate_model(encode_fn: EncodeFn, dataset: FactorDataset, args: argparse.Namespace, resolution: int, use_trajectories: bool) -> Dict[str, Any]:
    """The metrics (and curvature) of one representation on the shared held-out draws."""
    result = representation_metrics(encode_fn, dataset, **metric_kwargs(args))
    if use_trajectories:
        result["trajectories"] = trajectory_curvatures(encode_fn, moving_disks_for(args, resolution), args.encode_batch_size)
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train the baselines, evaluate everything, write compare.md/compare.json and the figures; returns the summary."""
    args = parse_args(argv)
    device = select_device(args)
    start = time.perf_counter()
    pipes = []
    for adapter_dir in args.sami_adapter:
        pipe = SAMIPipeline.from_pretrained(adapter_dir)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    arch = _encoder_architecture(pipes, args)
    resolution, latent_dim = arch["resolution"], arch["latent_dim"]
    budget = args.budget_seconds
    if budget is None:
        recorded = _adapter_seconds(args.sami_adapter[0]) if args.sami_adapter else None
        budget = recorded if recorded else DEFAULT_BUDGET
    dataset = DATASETS[args.dataset](num_samples=1, resolution=resolution, seed=args.seed + 30_000)
    names = list(dataset.factor_names)
    use_trajectories = args.trajectories if args.trajectories is not None else args.dataset == "disks"
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"Budget per baseline run: {budget:.0f} s; encoder {arch}; seeds {args.seeds}; device {device}.")

    columns: Dict[str, List[Dict[str, Any]]] = {}
    first_models: Dict[str, Any] = {}
    shared = {"latent_dim": latent_dim, "encoder_channels": arch["encoder_channels"], "hidden_dim": arch["hidden_dim"],
              "norm_num_groups": arch["norm_num_groups"], "encoder_stem_stride": arch["encoder_stem_stride"], "batch_size": args.batch_size, "progress": not args.no_progress, "device": device}

    # ---------------------------------------------------------------- SAMI
    axes_runs = []
    images, _, values = dataset.sample(args.num_images, np.random.default_rng([args.seed, 100]))
    for adapter_dir, pipe in zip(args.sami_adapter, pipes):
        result = evaluate_model(mean_code_fn(pipe), dataset, args, resolution, use_trajectories)
        seconds = _adapter_seconds(adapter_dir)
        result["training"] = {"seconds": seconds if seconds is not None else float("nan"), "steps": float("nan")}
        columns.setdefault("SAMI", []).append(result)
        grid = default_timestep_grid(pipe.scheduler.config.num_train_timesteps, args.num_noise_levels)
        axes = discover_axes(pipe, images, values, names, grid, fraction=args.fraction, kl_threshold=args.kl_threshold, seed=args.seed,
                             batch_size=args.encode_batch_size)
        axes_runs.append(axes)
        k = len(axes_runs) - 1
        plot_axes(axes, os.path.join(args.output_dir, f"information_profile_sami{k}.png"), title=os.path.basename(os.path.normpath(adapter_dir)))
        first_models.setdefault("SAMI", pipe)

    # ---------------------------------------------------------------- baselines
    channels = tuple(int(c) for c in args.diffae_unet_channels.split(","))
    for seed in args.seeds:
        train_data = DATASETS[args.dataset](num_samples=1, resolution=resolution, seed=seed)
        runs = []
        if not args.no_beta_vae:
            for beta in args.betas:
                runs.append((f"β-VAE (β={beta:g})", lambda b=beta: train_beta_vae(
                    train_data, beta=b, max_seconds=budget, max_steps=args.max_steps, lr=args.lr, seed=seed, **shared)))
        if not args.no_diffae:
            runs.append(("DiffAE", lambda: train_diffae(
                train_data, max_seconds=budget, max_steps=args.max_steps, lr=args.diffae_lr, seed=seed, unet_channels=channels,
                unet_norm_num_groups=arch["norm_num_groups"], **shared)))
        for name, train in runs:
            model = train()
            result = evaluate_model(mean_code_fn(model), dataset, args, resolution, use_trajectories)
            result["training"] = {"steps": model.training_log["steps"], "seconds": model.training_log["seconds"]}
            result["training_log"] = model.training_log
            result["seed"] = seed
            columns.setdefault(name, []).append(result)
            first_models.setdefault(name, model)
            if args.save_models:
                slug = name.replace("β", "beta").replace(" ", "").replace("(", "-").replace(")", "").replace("=", "")
                model.save_pretrained(os.path.join(args.output_dir, "models", f"{slug}-seed{seed}"))
            print(f"{name} seed {seed}: {model.training_log['steps']} steps in {model.training_log['seconds']:.0f} s; "
                  f"MIG {result['mig']:.3f}, DCI-D {result['dci']['disentanglement']:.3f}")

    # ---------------------------------------------------------------- figures
    n_rec = args.num_reconstructions
    inputs = images[:n_rec]
    rows = [inputs]
    row_names = ["input"]
    for name, model in first_models.items():
        if name == "SAMI":
            rec = reconstructions(model, inputs, args.num_inference_steps, eta=1.0, seed=args.seed)
        elif name == "DiffAE":
            rec = model.reconstruct(inputs, num_inference_steps=args.num_inference_steps, generator=torch.Generator().manual_seed(args.seed))
        else:
            rec = model.reconstruct(inputs)
        rows.append(rec.cpu())
        row_names.append(name)
    save_image_grid(torch.cat(rows), os.path.join(args.output_dir, "reconstructions.png"), nrow=n_rec, scale=4)
    flat = {name: [flat_metrics(r) for r in runs] for name, runs in columns.items()}
    bar_rows = ["MIG", "DCI disentanglement", "DCI completeness", "SAP", "modularity", "FactorVAE score (eval acc.)"]
    plot_metric_bars(flat, os.path.join(args.output_dir, "metrics.png"), bar_rows)

    # ---------------------------------------------------------------- summary
    agreement = None
    if len(axes_runs) >= 2:
        agreement = [noise_order_agreement(axes_runs[0]["factor_noise_levels"], other["factor_noise_levels"]) for other in axes_runs[1:]]
    table = metrics_table_markdown(flat)
    summary = {
        "dataset": args.dataset, "resolution": resolution, "latent_dim": latent_dim, "budget_seconds": budget, "seeds": args.seeds,
        "encoder_architecture": arch, "device": device, "sami_adapters": [os.path.abspath(d) for d in args.sami_adapter],
        "table": {name: aggregate(runs) for name, runs in flat.items()},
        "runs": columns,
        "sami_axes": [axes_to_json(a) for a in axes_runs],
        "noise_order_agreement": agreement,
        "reconstruction_rows": row_names,
        "seconds": round(time.perf_counter() - start, 1),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
    }
    write_json(os.path.join(args.output_dir, "compare.json"), summary)
    lines = [
        "# SAMI vs baselines", "",
        f"Data `{args.dataset}` at {resolution} px; latent_dim {latent_dim}; every encoder is SAMI's architecture "
        f"(widths {list(arch['encoder_channels'])}, stem stride {arch['encoder_stem_stride']}, head {arch['hidden_dim']}). Each baseline run trains for at most "
        f"{budget:.0f} s of wall clock{f' or {args.max_steps} steps' if args.max_steps else ''} (seeds {args.seeds}); "
        "cells are mean ± std over runs. SAMI's training seconds are the adapter's only (its base diffusion model was pretrained "
        "separately). Every model is scored on the same held-out draws with the posterior mean as representation.", "",
        table, "",
    ]
    if axes_runs:
        lines += ["## SAMI characteristic noise levels by factor", ""]
        for k, axes in enumerate(axes_runs):
            fl = axes["factor_noise_levels"]
            order = " < ".join(f"{n} ({fl[n]:.0f})" for n in axes["factor_order"]) or "none measured"
            lines.append(f"- `{args.sami_adapter[k]}`: active dims {axes['levels']['active']}; factor order {order}")
        if agreement:
            for k, a in enumerate(agreement, start=1):
                lines.append(f"- adapter 0 vs adapter {k}: same order {a['same_order']}, Kendall tau {a['kendall_tau']:.2f} over {a['factors']}")
        lines += [""] + [f"![profile {k}](information_profile_sami{k}.png)" for k in range(len(axes_runs))] + [""]
    lines += ["## Figures", "", "![reconstructions](reconstructions.png)", "",
              "Rows: " + ", ".join(row_names) + ".", "", "![metrics](metrics.png)", ""]
    with open(os.path.join(args.output_dir, "compare.md"), "w") as f:
        f.write("\n".join(lines))
    print(table)
    print(f"Written to {args.output_dir}/compare.md ({summary['seconds']:.0f} s).")
    return summary


if __name__ == "__main__":
    main()
