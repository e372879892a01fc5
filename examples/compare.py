#!/usr/bin/env python
"""SAMI against β-VAE (β = 1, 4), a DiffAE-style autoencoder and PDAE in one harness, side by side.

    python examples/compare.py --dataset disks --budget_seconds 600 --sami_adapter sami-disks-adapter --seeds 0 1

Every baseline uses the SAMI adapter's encoder architecture (block widths, head width, latent size,
resolution), is trained on fresh samples of the same dataset for the same wall-clock budget (by
default the adapter's recorded ``train_seconds``), once per seed, and is evaluated with exactly the
same metrics on exactly the same held-out draws as SAMI (:func:`sami_adapter.representation.representation_metrics`;
the posterior mean is the representation). Several ``--sami_adapter`` directories (e.g. two
training seeds) make SAMI's column a mean ± std and are compared on the order in which their
characteristic noise levels put the factors.

PDAE (``--baselines pdae``, ``pdae:lr=5e-4,snr_gamma=0.1``) trains its encoder and gradient estimator on a
frozen pretrained base: ``--pdae_base``, by default the base of the first ``--sami_adapter`` (the same
frozen model SAMI guides), else the shipped ``models/ddpm-<dataset>-<resolution>`` when there is one, else
``models/ddpm-disks-16``.

Rate study. ``--baselines`` picks the baseline variants (``beta-vae:beta=4``,
``capacity-vae:capacity=5``, ``beta-tcvae:tc_weight=5``, ``factor-vae:tc_weight=10``, ``diffae``, ``pdae``) and
``--rate_study`` adds, for every model, the information its code carries on held-out data (the
mixture lower bound and the moment-matched upper bound on ``I(x; z)``, in nats), the share of clean
prior samples (``z ~ N(0, I)``; disks), the exact-decoder reconstruction R² (disks) and, for SAMI, the
guidance gain. ``--method`` / ``--setting`` name what a SAMI adapter is an instance of. Runs made in
separate processes (one per model, e.g. on a GPU sweep) are merged by ``examples/rate_sweep.py --collect
DIR ...``: one plot per dataset of each metric against the rate, one line per method, and one table.

    python examples/compare.py --dataset disks --sami_adapter out/a --method "SAMI capacity" --setting C=4 --rate_study \
        --baselines --output_dir runs/sami-c4-s0
    python examples/compare.py --dataset disks --baselines beta-vae:beta=1 --seeds 0 --rate_study --output_dir runs/bvae1-s0
    python examples/rate_sweep.py --collect runs/* --output_dir docs/rate-study

Output (``--output_dir``, default ``compare/``): compare.md and compare.json (the table and every
number), reconstructions.png (inputs, then one row per model), metrics.png (bar chart) and one
information-profile plot per SAMI adapter. The SAMI adapter's budget covers the adapter only, not
the pretraining of its base diffusion model; the table says so.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from _args import add_axis_arguments, add_device_arguments, add_metric_arguments, metric_kwargs, moving_disks_for, select_device  # noqa: E402
from sami_adapter import SAMIEncoder, SAMIPipeline  # noqa: E402
from sami_adapter.adapter import load_base_unet_and_scheduler, read_adapter_config, resolve_base_path  # noqa: E402
from sami_adapter.baselines import train_beta_vae, train_diffae, train_pdae  # noqa: E402
from sami_adapter.data import DATASETS, MOVING, FactorDataset  # noqa: E402
from sami_adapter.noise_levels import default_timestep_grid, discover_axes, noise_order_agreement  # noqa: E402
from sami_adapter.representation import (  # noqa: E402
    EncodeFn,
    mean_code_fn,
    rate_study_guidance_gain,
    rate_study_measurements,
    representation_metrics,
    trajectory_curvatures,
)
from sami_adapter.plotting import plot_axes, plot_metric_bars  # noqa: E402
from sami_adapter.rate import RateControl  # noqa: E402
from sami_adapter.usefulness import digits_references, digits_usefulness, usefulness_rows  # noqa: E402
from sami_adapter.report import (  # noqa: E402
    aggregate,
    axes_to_json,
    flat_metrics,
    metrics_table_markdown,
    reconstructions,
    save_image_grid,
    write_json,
)

DEFAULT_BUDGET = 300.0
MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
DEFAULT_BASELINES = ("beta-vae:beta=1", "beta-vae:beta=4", "diffae")
# Baseline kinds of --baselines: display name, and how a spec's parameters become train_beta_vae's arguments.
BASELINE_KINDS = {
    "beta-vae": "β-VAE",
    "capacity-vae": "capacity β-VAE",
    "beta-tcvae": "β-TCVAE",
    "factor-vae": "FactorVAE",
    "diffae": "DiffAE",
    "pdae": "PDAE",
}
DETERMINISTIC = ("diffae", "pdae")  # their code is the encoder's mean: no rate to measure


def parse_baseline(spec: str) -> Dict[str, Any]:
    """``kind[:key=value,...]`` -> {"kind", "method", "setting", "params"} (see the module docstring).

    Keys: ``beta`` (KL weight, default 1), ``capacity`` (nats, capacity-vae; ``gamma`` its weight,
    default 100, ``ramp`` its ramp in steps), ``tc_weight`` (beta-tcvae, factor-vae); every VAE also takes
    ``likelihood`` (``bernoulli``, the default, or ``gaussian``) and ``bias_free=1`` (the SAMI paper's
    bias-free encoder); ``pdae`` takes ``lr`` (default PDAE's 1e-4) and ``snr_gamma`` (its loss weighting, default 0.1).
    """
    kind, _, rest = spec.partition(":")
    if kind not in BASELINE_KINDS:
        raise ValueError(f"unknown baseline {kind!r} in {spec!r}; choose from {sorted(BASELINE_KINDS)}.")
    params: Dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"baseline parameter {item!r} in {spec!r} is not key=value.")
        key = key.strip()
        if key == "likelihood":
            if value not in ("bernoulli", "gaussian"):
                raise ValueError(f"likelihood must be bernoulli or gaussian, got {value!r} in {spec!r}.")
            params[key] = value
        else:
            params[key] = float(value)
    vae = {"likelihood", "bias_free"}
    allowed = {"beta-vae": {"beta"} | vae, "capacity-vae": {"beta", "capacity", "gamma", "ramp"} | vae, "beta-tcvae": {"beta", "tc_weight"} | vae,
               "factor-vae": {"beta", "tc_weight"} | vae, "diffae": set(), "pdae": {"lr", "snr_gamma"}}[kind]
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"baseline {kind} takes {sorted(allowed) or 'no parameters'}, got {sorted(unknown)} in {spec!r}.")
    if kind == "capacity-vae" and "capacity" not in params:
        raise ValueError(f"capacity-vae needs capacity=<nats> in {spec!r}.")
    setting = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "default"
    plain = kind == "diffae" or (kind == "pdae" and not params)
    label = BASELINE_KINDS[kind] if plain else f"{BASELINE_KINDS[kind]} ({setting.replace('beta=', 'β=')})"
    return {"kind": kind, "method": BASELINE_KINDS[kind], "setting": setting, "params": params, "spec": spec, "label": label}


def baseline_rate_control(kind: str, params: Dict[str, float]) -> Optional[RateControl]:
    """The rate terms a baseline kind adds to ``beta * KL``."""
    if kind == "capacity-vae":
        return RateControl(capacity=params["capacity"], capacity_on="kl", capacity_weight=params.get("gamma", 100.0),
                           capacity_ramp_steps=int(params.get("ramp", 0)))
    if kind == "beta-tcvae":
        return RateControl(tc_weight=params.get("tc_weight", 5.0), tc_estimator="minibatch")
    if kind == "factor-vae":
        return RateControl(tc_weight=params.get("tc_weight", 10.0), tc_estimator="discriminator")
    return None


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="disks", choices=sorted(DATASETS), help="Training and evaluation data.")
    p.add_argument("--sami_adapter", nargs="*", default=[], help="SAMI adapter directories (several: e.g. one per training seed).")
    p.add_argument("--budget_seconds", type=float, default=None,
                   help=f"Wall-clock training budget of each baseline run (default: the first adapter's train_seconds, else {DEFAULT_BUDGET:g}).")
    p.add_argument("--max_steps", type=int, default=None, help="Also stop each baseline after this many steps (tests, quick looks).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Training seeds of the baselines.")
    p.add_argument("--baselines", nargs="*", default=list(DEFAULT_BASELINES),
                   help="Baseline variants, e.g. beta-vae:beta=4 capacity-vae:capacity=5 beta-tcvae:tc_weight=5 factor-vae:tc_weight=10 "
                        f"diffae pdae:lr=5e-4 (default: {' '.join(DEFAULT_BASELINES)}). An empty list trains none.")
    p.add_argument("--method", default="SAMI", help="Method name of the --sami_adapter runs (a line in the rate plot).")
    p.add_argument("--setting", default=None, help="Setting name of the --sami_adapter runs (a point on that line; default: the folder name).")
    p.add_argument("--rate_study", action="store_true",
                   help="Also measure the rate I(x; z), prior-sample cleanliness, exact-decoder reconstruction R² and guidance gain.")
    p.add_argument("--rate_images", type=int, default=4096, help="Held-out images of the I(x; z) estimate (its lower bound is at most log N).")
    p.add_argument("--num_prior_samples", type=int, default=512, help="Prior samples of the clean-disk check (DDIM steps: --num_inference_steps, eta 1).")
    p.add_argument("--latent_dim", type=int, default=None, help="Code size (default: the SAMI adapter's, else 8).")
    p.add_argument("--resolution", type=int, default=None, help="Image side (default: the SAMI adapter's, else 16).")
    p.add_argument("--batch_size", type=int, default=64, help="Baseline training batch size.")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate of the β-VAE.")
    p.add_argument("--diffae_lr", type=float, default=5e-4, help="Adam learning rate of the DiffAE.")
    p.add_argument("--diffae_unet_channels", default="32,64,64", help="DiffAE UNet block widths (default: the disks base model's).")
    p.add_argument("--pdae_base", default=None,
                   help="The frozen base of PDAE: a diffusers pipeline folder or UNet (default: the first --sami_adapter's base, else "
                        "models/ddpm-<dataset>-<resolution> when it exists, else models/ddpm-disks-16).")
    p.add_argument("--output_dir", default="compare", help="Where compare.md, compare.json and the figures go.")
    p.add_argument("--save_models", action="store_true", help="Also save every trained baseline (save_pretrained) under OUTPUT_DIR/models/.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the evaluation draws (the same for every model).")
    p.add_argument("--num_reconstructions", type=int, default=8, help="Inputs in reconstructions.png.")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps of SAMI, DiffAE and PDAE reconstructions.")
    p.add_argument("--no_progress", action="store_true", help="Hide training progress bars.")
    add_device_arguments(p)
    add_axis_arguments(p)
    add_metric_arguments(p)
    args = p.parse_args(argv)
    try:
        args.baseline_specs = [parse_baseline(s) for s in args.baselines]
    except ValueError as e:
        p.error(str(e))
    if not args.baseline_specs and not args.sami_adapter:
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


def _adapter_training(adapter_dir: str) -> Dict[str, Any]:
    try:
        return read_adapter_config(adapter_dir).get("training") or {}
    except OSError:
        return {}


def _adapter_seconds(adapter_dir: str) -> Optional[float]:
    try:
        config = read_adapter_config(adapter_dir)
    except OSError:
        return None
    value = (config.get("metrics") or {}).get("train_seconds")
    return float(value) if value is not None else None


def load_pdae_base(args: argparse.Namespace, resolution: int) -> Tuple[str, Any, Dict[str, Any]]:
    """``(name, UNet, scheduler config)`` of PDAE's frozen base (``--pdae_base`` and its defaults, the module docstring)."""
    from diffusers import UNet2DModel

    if args.pdae_base:
        base = args.pdae_base
    elif args.sami_adapter:
        base = resolve_base_path(read_adapter_config(args.sami_adapter[0]), args.sami_adapter[0])
    else:
        shipped = os.path.join(MODELS_DIR, f"ddpm-{args.dataset.replace('_', '-')}-{resolution}")
        base = shipped if os.path.isdir(shipped) else os.path.join(MODELS_DIR, "ddpm-disks-16")
    try:
        unet, scheduler_config = load_base_unet_and_scheduler(base)
    except ValueError as e:
        raise SystemExit(f"--pdae_base: {e}") from e
    if not isinstance(unet, UNet2DModel):
        raise SystemExit(f"PDAE's base {base} is a {type(unet).__name__}; PDAE here takes a pixel-space UNet2DModel (pass one with --pdae_base).")
    if unet.config.sample_size != resolution:
        raise SystemExit(f"PDAE's base {base} is a {unet.config.sample_size} px model and this comparison runs at {resolution} px; "
                         f"pass a {resolution} px base with --pdae_base (examples/pretrain_unet.py --resolution {resolution} makes one).")
    return base, unet, scheduler_config


def evaluate_model(encode_fn: EncodeFn, dataset: FactorDataset, args: argparse.Namespace, resolution: int, use_trajectories: bool) -> Dict[str, Any]:
    """The metrics (and curvature) of one representation on the shared held-out draws."""
    result = representation_metrics(encode_fn, dataset, **metric_kwargs(args))
    if args.dataset == "digits":  # labelled real images: how well each code reads the class
        result["usefulness"] = digits_usefulness(encode_fn, resolution, args.encode_batch_size, references=False, seed=args.seed)
    if use_trajectories:
        result["trajectories"] = trajectory_curvatures(encode_fn, moving_disks_for(args, resolution, args.dataset), args.encode_batch_size)
    return result


def study_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The rate-study flags as :func:`~sami_adapter.representation.rate_study_measurements` arguments."""
    return {"num_images": args.rate_images, "num_prior_samples": args.num_prior_samples, "num_inference_steps": args.num_inference_steps,
            "batch_size": args.encode_batch_size, "kl_threshold": args.kl_threshold, "seed": args.seed}


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
    budget = args.budget_seconds
    if budget is None:
        recorded = _adapter_seconds(args.sami_adapter[0]) if args.sami_adapter else None
        budget = recorded if recorded else DEFAULT_BUDGET
    dataset = DATASETS[args.dataset](num_samples=1, resolution=arch["resolution"], seed=args.seed + 30_000, split="test")
    use_trajectories = args.trajectories if args.trajectories is not None else args.dataset in MOVING
    os.makedirs(args.output_dir, exist_ok=True)
    pdae_base = load_pdae_base(args, arch["resolution"]) if any(spec["kind"] == "pdae" for spec in args.baseline_specs) else None
    print(f"Budget per baseline run: {budget:.0f} s; encoder {arch}; seeds {args.seeds}; device {device}.")

    columns: Dict[str, List[Dict[str, Any]]] = {}
    first_models: Dict[str, Any] = {}
    images, _, values = dataset.sample(args.num_images, np.random.default_rng([args.seed, 100]))
    axes_runs = evaluate_sami(args, pipes, dataset, arch["resolution"], use_trajectories, images, values, columns, first_models)
    train_and_evaluate_baselines(args, arch, budget, device, dataset, use_trajectories, columns, first_models, pdae_base)

    row_names = ["input"] + list(first_models)
    rows = [images[:args.num_reconstructions]] + [reconstructions(model, images[:args.num_reconstructions], args.num_inference_steps, eta=1.0,
                                                                  seed=args.seed) for model in first_models.values()]
    save_image_grid(torch.cat(rows), os.path.join(args.output_dir, "reconstructions.png"), nrow=args.num_reconstructions, scale=4)
    flat = {name: [flat_metrics(r) for r in runs] for name, runs in columns.items()}
    bar_rows = ["MIG", "DCI disentanglement", "DCI completeness", "SAP", "modularity", "FactorVAE score (eval acc.)"]
    plot_metric_bars(flat, os.path.join(args.output_dir, "metrics.png"), bar_rows)

    references = digits_references(arch["resolution"], arch["latent_dim"], args.seed) if args.dataset == "digits" else None
    agreement = None
    if len(axes_runs) >= 2:
        agreement = [noise_order_agreement(axes_runs[0]["factor_noise_levels"], other["factor_noise_levels"]) for other in axes_runs[1:]]
    summary = {
        "dataset": args.dataset, "resolution": arch["resolution"], "latent_dim": arch["latent_dim"], "budget_seconds": budget, "seeds": args.seeds,
        "encoder_architecture": arch, "device": device, "sami_adapters": [os.path.abspath(d) for d in args.sami_adapter],
        "pdae_base": pdae_base[0] if pdae_base else None,
        "table": {name: aggregate(runs) for name, runs in flat.items()},
        "runs": columns,
        "sami_axes": [axes_to_json(a) for a in axes_runs],
        "noise_order_agreement": agreement,
        "usefulness_references": references,
        "reconstruction_rows": row_names,
        "seconds": round(time.perf_counter() - start, 1),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
    }
    write_json(os.path.join(args.output_dir, "compare.json"), summary)
    shown = dict(flat)
    if references:  # the same probes on PCA of the pixels and on the pixels: what a code of this size is read against
        shown.update({f"PCA of the pixels ({arch['latent_dim']})": usefulness_rows(references["pca"]), "raw pixels": usefulness_rows(references["pixels"])})
    write_markdown(args, arch, budget, metrics_table_markdown(shown), axes_runs, agreement, row_names, summary["seconds"], summary["pdae_base"])
    return summary


def evaluate_sami(args, pipes, dataset, resolution: int, use_trajectories: bool, images, values, columns, first_models) -> List[Dict[str, Any]]:
    """Each SAMI adapter's metrics (and rate study) into ``columns``, its axis discovery and profile plot; returns the axes."""
    axes_runs = []
    for k, (adapter_dir, pipe) in enumerate(zip(args.sami_adapter, pipes)):
        result = evaluate_model(mean_code_fn(pipe), dataset, args, resolution, use_trajectories)
        result.update({"method": args.method, "setting": args.setting or os.path.basename(os.path.normpath(adapter_dir)),
                       "seed": _adapter_training(adapter_dir).get("seed")})
        if args.rate_study:
            result["study"] = rate_study_measurements(pipe, dataset, **study_kwargs(args))
            result["study"]["guidance_gain"] = rate_study_guidance_gain(pipe, dataset, args.rate_images, args.seed)
        seconds = _adapter_seconds(adapter_dir)
        result["training"] = {"seconds": seconds if seconds is not None else float("nan"), "steps": float("nan")}
        columns.setdefault("SAMI", []).append(result)
        grid = default_timestep_grid(pipe.scheduler.config.num_train_timesteps, args.num_noise_levels)
        axes = discover_axes(pipe, images, values, list(dataset.factor_names), grid, fraction=args.fraction, kl_threshold=args.kl_threshold,
                             seed=args.seed, batch_size=args.encode_batch_size)
        axes_runs.append(axes)
        plot_axes(axes, os.path.join(args.output_dir, f"information_profile_sami{k}.png"), title=os.path.basename(os.path.normpath(adapter_dir)))
        first_models.setdefault("SAMI", pipe)
    return axes_runs


def train_and_evaluate_baselines(args, arch, budget: float, device: str, dataset, use_trajectories: bool, columns, first_models,
                                 pdae_base: Optional[Tuple[str, Any, Dict[str, Any]]] = None) -> None:
    """Every --baselines variant at every seed: trained on fresh samples, evaluated, saved with --save_models; into ``columns``.
    ``pdae_base``: :func:`load_pdae_base`'s answer, when a variant is PDAE."""
    shared = {"latent_dim": arch["latent_dim"], "encoder_channels": arch["encoder_channels"], "hidden_dim": arch["hidden_dim"],
              "norm_num_groups": arch["norm_num_groups"], "encoder_stem_stride": arch["encoder_stem_stride"], "batch_size": args.batch_size,
              "progress": not args.no_progress, "device": device}
    channels = tuple(int(c) for c in args.diffae_unet_channels.split(","))
    for seed in args.seeds:
        train_data = DATASETS[args.dataset](num_samples=1, resolution=arch["resolution"], seed=seed)
        for spec in args.baseline_specs:
            name, params = spec["label"], spec["params"]
            if spec["kind"] == "diffae":
                model = train_diffae(train_data, max_seconds=budget, max_steps=args.max_steps, lr=args.diffae_lr, seed=seed, unet_channels=channels,
                                     unet_norm_num_groups=arch["norm_num_groups"], **shared)
            elif spec["kind"] == "pdae":
                base, unet, scheduler_config = pdae_base
                pdae_options = {k: params[k] for k in ("lr", "snr_gamma") if k in params}
                model = train_pdae(train_data, unet, scheduler_config, max_seconds=budget, max_steps=args.max_steps, seed=seed, base_model=base,
                                   **pdae_options, **shared)
            else:
                model = train_beta_vae(train_data, beta=params.get("beta", 1.0), max_seconds=budget, max_steps=args.max_steps, lr=args.lr, seed=seed,
                                       rate=baseline_rate_control(spec["kind"], params), likelihood=params.get("likelihood", "bernoulli"),
                                       encoder_bias_free=bool(params.get("bias_free", 0)), **shared)
            result = evaluate_model(mean_code_fn(model), dataset, args, arch["resolution"], use_trajectories)
            result.update({"method": spec["method"], "setting": spec["setting"]})
            if args.rate_study and spec["kind"] not in DETERMINISTIC:
                result["study"] = rate_study_measurements(model, dataset, **study_kwargs(args))
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


def write_markdown(args, arch, budget: float, table: str, axes_runs, agreement, row_names: List[str], seconds: float,
                   pdae_base: Optional[str] = None) -> None:
    """compare.md: the setting, the table, SAMI's factor order by noise level, the figures."""
    lines = [
        "# SAMI vs baselines", "",
        f"Data `{args.dataset}` at {arch['resolution']} px; latent_dim {arch['latent_dim']}; every encoder is SAMI's architecture "
        f"(widths {list(arch['encoder_channels'])}, stem stride {arch['encoder_stem_stride']}, head {arch['hidden_dim']}). Each baseline run trains for at most "
        f"{budget:.0f} s of wall clock{f' or {args.max_steps} steps' if args.max_steps else ''} (seeds {args.seeds}); "
        "cells are mean ± std over runs. SAMI's training seconds are the adapter's only (its base diffusion model was pretrained "
        "separately). Every model is scored on the same held-out draws with the posterior mean as representation."
        + (f" PDAE trains its encoder and gradient estimator on the frozen base `{pdae_base}`." if pdae_base else ""), "",
        table, "",
    ]
    if axes_runs:
        lines += ["## SAMI characteristic noise levels by factor", ""]
        for k, axes in enumerate(axes_runs):
            fl = axes["factor_noise_levels"]
            order = " < ".join(f"{n} ({fl[n]:.0f})" for n in axes["factor_order"]) or "none measured"
            lines.append(f"- `{args.sami_adapter[k]}`: active dims {axes['levels']['active']}; factor order {order}")
        for k, a in enumerate(agreement or [], start=1):
            lines.append(f"- adapter 0 vs adapter {k}: same order {a['same_order']}, Kendall tau {a['kendall_tau']:.2f} over {a['factors']}")
        lines += [""] + [f"![profile {k}](information_profile_sami{k}.png)" for k in range(len(axes_runs))] + [""]
    lines += ["## Figures", "", "![reconstructions](reconstructions.png)", "",
              "Rows: " + ", ".join(row_names) + ".", "", "![metrics](metrics.png)", ""]
    with open(os.path.join(args.output_dir, "compare.md"), "w") as f:
        f.write("\n".join(lines))
    print(table)
    print(f"Written to {args.output_dir}/compare.md ({seconds:.0f} s).")


if __name__ == "__main__":
    main()
