#!/usr/bin/env python
"""Train a SAMI adapter on a pretrained diffusers UNet (frozen, LoRA or joint), with Accelerate.

With no arguments it trains the embedded offline default: an 8-dimensional adapter for the small
16 px `disks` UNet that ships in `models/ddpm-disks-16`, on CPU, in a few minutes, and writes the
adapter plus a report (reconstructions, traversals, per-dimension KL, guidance gain) to
`sami-disks-adapter/`.

    accelerate launch examples/finetune.py
    accelerate launch examples/finetune.py --pretrained_model_name_or_path google/ddpm-cifar10-32 \\
        --train_data_dir ./images --resolution 32 --output_dir sami-cifar
    accelerate launch examples/finetune.py --dataset_name huggan/smithsonian_butterflies_subset ...  # or a local folder
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/finetune.py ...

Every batch, noise draw and timestep is a function of (seed, step), so a run resumed with
`--resume_from_checkpoint latest` ends bit-identical to an uninterrupted one, and N processes at
batch B with A accumulation steps see exactly what one process sees at batch N*A*B (free bits
included: they compare the KL of the whole step with their threshold). File data (`datasets`) is
decoded by a DataLoader per process, each taking only its own items of the global batch.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params
from tqdm.auto import tqdm

from _args import add_image_source_arguments, add_image_training_arguments, image_data_problem, open_image_table, parse_encoder_channels  # noqa: E402
from sami_adapter import SAMIEncoder, SAMILossOutput, SAMIPipeline, nested_guidance_bands  # noqa: E402
from sami_adapter.rate import RateControl, TCDiscriminator, discriminator_step  # noqa: E402
from sami_adapter import adapter as adapter_lib  # noqa: E402
from sami_adapter.card import adapter_model_card  # noqa: E402
from sami_adapter.hub import upload_to_hub  # noqa: E402
from sami_adapter.data import DATASETS, HELD_OUT_SEED_OFFSET  # noqa: E402
from sami_adapter.encoder import ACTIVE_KL_NATS, TRAVERSAL_RANGE  # noqa: E402
from sami_adapter.evaluation import DISK_DATASETS, GAIN_BANDS, active_dimensions, band_gains  # noqa: E402
from sami_adapter.base_model import is_text_conditioned, load_base_unet_and_scheduler, load_latent_components  # noqa: E402
from sami_adapter.lora import add_lora  # noqa: E402
from sami_adapter.latent import LatentCache, images_to_latents, prompt_embeddings, vae_scale_factor  # noqa: E402
from sami_adapter.representation import mean_code_fn  # noqa: E402
from sami_adapter.usefulness import digits_usefulness  # noqa: E402
from sami_adapter.training import (  # noqa: E402
    ImageDataset,
    SAMIObjective,
    StepBatches,
    StepItems,
    StepShardSampler,
    beta_at,
    timestep_distribution,
)
from sami_adapter.report import reconstructions, save_image_grid, traversal_rows, write_report  # noqa: E402

logger = get_logger(__name__)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASE = os.path.join(REPO_ROOT, "models", "ddpm-disks-16")
# The shipped base UNet of each built-in dataset (frozen and LoRA runs default to it).
DEFAULT_BASES = {"disks": DEFAULT_BASE, "background_disks": os.path.join(REPO_ROOT, "models", "ddpm-background-disks-16"),
                 "digits": os.path.join(REPO_ROOT, "models", "ddpm-digits-16")}

# Presets: flag defaults that an explicit flag still overrides. "adapter" is the frozen-UNet recipe
# of the shipped default; "paper" is the SAMI paper's own setting (joint training from scratch, the
# noise-blind bias-free encoder, uniform timesteps, an exponential KL ramp, no free bits, clip 1, EMA).
# The paper states its KL weight against a per-pixel *mean* error; this script sums the error over
# pixels, so the preset's per-pixel values are multiplied by the pixel count C * H * W
# (5e-6 -> 0.00128 and 1e-4 -> 0.0256 at 16 px). The paper's ramp goes on to 1e-3 over a far longer
# GPU run; here that end priced the position out of the code entirely, so the preset stops at 1e-4.
# The paper's learning rate (1e-4) is for that long run; 5e-4 forms the code within a CPU budget.
# "images" is the adapter recipe for real photographs and scans: what tells such images apart (a digit's
# identity, an object's shape) is settled at middle noise levels, while the "low" emphasis of the disks
# recipe spends the code on the fine detail a frozen decoder finds cheapest to be told (stroke mass).
RECIPES = {
    "adapter": {},
    "images": {"timestep_sampling": "mid"},
    "paper": {"unet_mode": "full", "encoder_type": "paper", "timestep_sampling": "uniform", "beta_per_pixel": (5e-6, 1e-4), "free_bits": 0.0,
              "latent_noise_warmup_steps": 0, "learning_rate": 5e-4, "unet_learning_rate": 5e-4, "max_grad_norm": 1.0, "use_ema": True,
              "lr_scheduler": "constant_with_warmup", "max_train_steps": 3000},
}
DATASET_RECIPES = {"background_disks": "paper", "digits": "images"}
# Fixed choices that no documented run varies (diffusers' scripts' defaults where they have one).
LR_WARMUP_STEPS = 50
EMA_DECAY = 0.999
CHECKPOINTS_TOTAL_LIMIT = 2
REPORT_SAMI_SCALE = 3.0  # the report also decodes at this scale: it removes the exact decoder's wrong-position outliers
EVAL_ETA = 1.0  # stochastic DDIM for validation and report decodes: its noise corrects the step errors of sharp posteriors
# --encoder_type: SAMIEncoder's time_conditioning and bias_free.
ENCODER_TYPES = {"timed": (True, False), "time_blind": (False, False), "paper": (False, True)}


def recipe_help() -> str:
    lines = []
    for name, preset in RECIPES.items():
        sets = ", ".join(f"--{k} {v}" if not isinstance(v, bool) else f"--{k}" for k, v in preset.items() if k != "beta_per_pixel")
        if "beta_per_pixel" in preset:
            lo, hi = preset["beta_per_pixel"]
            sets += f", --beta {lo:g},{hi:g} per pixel (x C*H*W in this script's units)"
        lines.append(f"{name}: {sets or 'the flag defaults below'}")
    return ("Preset of flag defaults (explicit flags override it). Default: paper for --dataset background_disks, images for --dataset digits, adapter otherwise. "
            + "; ".join(lines) + ".")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES), help=recipe_help())
    for add_group in (add_model_arguments, add_data_arguments, add_objective_arguments, add_rate_arguments, add_optimisation_arguments,
                      add_output_arguments):
        add_group(p)
    apply_recipe(p, argv)
    args = p.parse_args(argv)
    if args.pretrained_model_name_or_path is None and args.unet_mode != "full":
        args.pretrained_model_name_or_path = DEFAULT_BASES.get(args.dataset, DEFAULT_BASE)
    if args.unet_learning_rate is None:
        args.unet_learning_rate = args.learning_rate / 5
    args.beta, args.beta_final = args.beta if isinstance(args.beta, tuple) else (args.beta, None)
    problem = check_args(args)
    if problem:
        p.error(problem)
    args.rate = rate_control_from_args(args)
    args.guidance_bands = parse_noise_bands(args.noise_bands, args.latent_dim)
    return args


def add_model_arguments(p) -> None:
    g = p.add_argument_group("model and encoder")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Diffusers UNet repo id or directory (a pipeline with unet/ or a bare UNet), e.g. google/ddpm-cifar10-32. "
                        "Default: the embedded 16 px disks UNet (models/ddpm-disks-16); with --unet_mode full and no base, a UNet is trained from scratch.")
    g.add_argument("--unet_mode", default="frozen", choices=adapter_lib.UNET_MODES,
                   help="frozen: train only the encoder; lora: also LoRA on the UNet (peft; the attention projections of a text-conditioned "
                        "UNet, else conv1, conv2, time_emb_proj and any attention); full: train UNet and encoder jointly.")
    g.add_argument("--lora_rank", type=int, default=4, help="LoRA rank.")
    g.add_argument("--latent_dim", type=int, default=8, help="Size of the SAMI code z.")
    g.add_argument("--encoder_channels", default="32,64", help="Encoder down-block widths (each block after the first halves the resolution).")
    g.add_argument("--encoder_hidden_dim", type=int, default=256, help="Width of the encoder's head (the layer between its pooled features and mean/log-variance).")
    g.add_argument("--encoder_type", default="timed", choices=sorted(ENCODER_TYPES),
                   help="timed: the encoder sees the noise level; time_blind: it does not (an ablation); paper: the SAMI paper's noise-blind, "
                        "bias-free encoder (no additive constant before the head, normalisation without mean or offset, a middle block).")
    g.add_argument("--noise_bands", default=None,
                   help="Noise bands of the guidance: 'nested' (dimension i guides only below T (D - i) / D) or one upper timestep per "
                        "dimension, comma-separated. Default: every dimension guides at every noise level.")
    g.add_argument("--init_encoder", default=None,
                   help="Start from another model's encoder: a folder saved by compare.py --save_models (a β-VAE / β-TCVAE) or an "
                        "adapter. Its architecture replaces --encoder_channels/--encoder_type; --latent_dim must match.")
    g.add_argument("--anchor_weight", type=float, default=10.0,
                   help="With --init_encoder: weight of || mu(x_0) - mu_init(x_0) ||^2, annealed linearly to 0 over --anchor_steps.")
    g.add_argument("--anchor_steps", type=int, default=0, help="With --init_encoder: steps over which the anchor is annealed away (0: no anchor).")


def add_data_arguments(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="disks", choices=sorted(DATASETS), help="Built-in procedural dataset (fresh samples every step).")
    add_image_source_arguments(g)
    g.add_argument("--caption_column", default=None,
                   help="Caption column: a text-conditioned base then trains on these captions instead of the empty prompt.")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Share of captions replaced by the empty prompt (keeps the unconditional model, for classifier-free guidance).")
    g.add_argument("--resolution", type=int, default=None, help="Training resolution; default: the UNet's sample_size.")
    add_image_training_arguments(g)
    g.add_argument("--cache_latents", action="store_true",
                   help="Latent diffusion: store VAE latents of folder images on disk (safetensors) and reuse them in later epochs. "
                        "Needs deterministic preprocessing (--center_crop, no --random_flip).")


def add_objective_arguments(p) -> None:
    g = p.add_argument_group("objective")
    g.add_argument("--beta", type=beta_arg, default=0.01,
                   help="KL weight. With --weighting elbo in ELBO units (1 = the bound; < 1 rewards information in z); with simple "
                        "(the default) only the KL's weight against the unweighted denoising error. Two comma-separated values move it "
                        "geometrically from the first to the second over the run.")
    g.add_argument("--weighting", default="simple", choices=["simple", "elbo"], help="Denoising-error weights: unit (simple) or the exact ELBO weights.")
    g.add_argument("--timestep_sampling", default="low", choices=["uniform", "mid", "low"],
                   help="uniform over [0, T); mid: 75%% from [100, 900] + 25%% uniform; low: 75%% from [0, 500] + 25%% uniform. "
                        "With --weighting elbo the sampling is importance-corrected and the loss stays a bound (only its variance changes); "
                        "with simple the emphasised noise levels really weigh more.")
    g.add_argument("--free_bits", type=float, default=0.5, help="Per-dimension mean KL (nats) below which KL is not penalised; 0 disables. The mean is over the whole "
                        "optimiser step (every process and accumulation step), so it does not depend on how the batch is split.")
    g.add_argument("--latent_noise_warmup_steps", type=int, default=500,
                   help="Scale the reparameterisation noise of z ~ q(z|x_0) from 0 (z = posterior mean) to 1 over this many steps. "
                        "A zero-initialised encoder sits at a saddle where sampled z is pure noise; without that noise the "
                        "guidance pays off from the first step.")
    g.add_argument("--intervention_weight", type=float, default=0.0,
                   help="Weight of the per-dimension intervention loss: moving the denoised estimate along one dimension's guidance "
                        "field should change the re-encoded code in that dimension only.")


def add_rate_arguments(p) -> None:
    g = p.add_argument_group("rate control (price the information in z, not the prior mismatch)")
    g.add_argument("--capacity", type=capacity_arg, default=None,
                   help="Capacity target C in nats: adds |R - C|, R an upper bound on I(x; z) (the total KL minus the moment-matched "
                        "aggregate mismatch, which an input-independent posterior cannot meet; Burgess et al. 2018 target the KL). "
                        "Comma-separated values (one per dimension) put one target on each dimension's own rate; unequal targets "
                        "make the posterior widths differ, which breaks the rotation symmetry of an equal-rate code.")
    g.add_argument("--capacity_ramp_steps", type=int, default=0, help="Ramp C linearly to --capacity over this many steps.")
    g.add_argument("--capacity_start", type=float, default=0.0, help="The ramp's first value, as a fraction of --capacity (0: from zero).")
    g.add_argument("--mismatch_weight", type=float, default=0.0,
                   help="Weight of KL(N(m, S) || N(0, I)) of the batch's moment-matched aggregate posterior (mean, scale, correlations).")
    g.add_argument("--tc_weight", type=float, default=0.0,
                   help="Weight of the total correlation of the code (added to --beta on TC), by FactorVAE's density-ratio discriminator "
                        "(trained alongside, one step after each encoder step).")
    g.add_argument("--tc_on", default="sample", choices=["sample", "mean"], help="TC of z ~ q(z|x) (sample) or of the posterior means (mean).")


def add_optimisation_arguments(p) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimiser step.")
    g.add_argument("--max_train_steps", type=int, default=2500, help="Optimiser steps (2500: the rate study's point for the default recipe; see docs/rate-study.md).")
    g.add_argument("--learning_rate", type=float, default=1e-3, help=f"Peak learning rate of the encoder (after {LR_WARMUP_STEPS} warm-up steps).")
    g.add_argument("--unet_learning_rate", type=float, default=None, help="Learning rate of UNet/LoRA weights (default: --learning_rate / 5).")
    g.add_argument("--lr_scheduler", default="cosine", help="diffusers get_scheduler name (constant, linear, cosine, ...).")
    g.add_argument("--max_grad_norm", type=float, default=10.0, help="Gradient clipping norm.")
    g.add_argument("--use_ema", action="store_true", help=f"Keep an EMA (decay {EMA_DECAY}) of the trainable weights and save it.")
    g.add_argument("--seed", type=int, default=0, help="Seed of initialisation, data, noise and timesteps.")
    g.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"],
                   help="Mixed precision (default: your `accelerate config`, else no). Under bf16/fp16 the frozen modules (UNet "
                        "outside full mode, VAE, text encoder) are cast to that dtype, trained weights stay fp32, and TF32 matmuls "
                        "are allowed on Ampere and newer GPUs.")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations in the backward pass (encoder, and a trained UNet): less memory, slower steps.")
    g.add_argument("--num_threads", type=int, default=None, help="CPU threads per process (default: the cores divided among the processes).")


def add_output_arguments(p) -> None:
    g = p.add_argument_group("output, checkpoints and logging")
    g.add_argument("--output_dir", default="sami-disks-adapter", help="Adapter directory (checkpoints go to checkpoint-<step>/ inside).")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start afresh in an --output_dir that holds an earlier run: its checkpoints, logs and validation images are "
                        "removed at the start; its adapter and report are replaced only once this run has finished.")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save a resumable checkpoint every N steps (the last --checkpoints_total_limit are kept).")
    g.add_argument("--checkpoints_total_limit", type=int, default=CHECKPOINTS_TOTAL_LIMIT,
                   help="How many checkpoints to keep (the newest; 0 keeps every one, e.g. to evaluate the code along training).")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest', a checkpoint name inside --output_dir (checkpoint-500) or a checkpoint directory.")
    g.add_argument("--logging_dir", default="logs", help="Tracker and train_log.jsonl folder, relative to --output_dir (or absolute).")
    g.add_argument("--logging_steps", type=int, default=50, help="Log losses, per-dimension KL and guidance gain every N steps.")
    g.add_argument("--report_to", default="tensorboard",
                   help="Accelerate tracker ('tensorboard', 'wandb', 'none'): losses, and the validation images too; skipped when not installed.")
    g.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                   help="Upload the adapter (with a model card) to this Hub repo (created if needed; the cached login is used).")
    g = p.add_argument_group("evaluation (examples/evaluate.py measures a saved adapter in full)")
    g.add_argument("--validation_steps", type=int, default=500, help="Write reconstruction/traversal PNGs every N steps (0: only at the end).")
    g.add_argument("--num_eval_images", type=int, default=512, help="Held-out images of the final report.")
    g.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps of validation and report images.")
    g.add_argument("--no_report", action="store_true",
                   help=f"Skip the final evaluation report (guidance gain, KL, reconstructions, also at sami_scale {REPORT_SAMI_SCALE:g}).")


def apply_recipe(parser, argv) -> None:
    """Set the defaults of ``--recipe`` (or of the dataset's default recipe) on ``parser``."""
    known, _ = parser.parse_known_args(argv)
    name = known.recipe or DATASET_RECIPES.get(known.dataset, "adapter")
    preset = {"recipe": name, **RECIPES[name]}
    if "beta_per_pixel" in preset:
        lo, hi = preset.pop("beta_per_pixel")
        channels = DATASETS[known.dataset].num_channels if not (known.train_data_dir or known.dataset_name) else 1
        pixels = channels * (known.resolution or 16) ** 2
        preset.update(beta=(lo * pixels, hi * pixels))
    parser.set_defaults(**preset)


def check_args(args) -> str | None:
    """The first flag that cannot work, as a message naming it and what it takes; None when all can.

    Every flag is checked here, before any model is loaded, so that a run never fails after training
    (or writes nothing) because of a flag only the evaluation reads.
    """
    from diffusers.optimization import SchedulerType

    def bad(name, value, wanted):
        return f"--{name} must be {wanted}, got {value!r}"

    for name in ("learning_rate", "unet_learning_rate"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            return bad(name, value, "a finite number > 0")
    for name in ("free_bits", "max_grad_norm", "intervention_weight"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            return bad(name, value, "a finite number >= 0")
    if not all(math.isfinite(b) and b >= 0 for b in (args.beta, args.beta_final or 0.0)):
        if args.beta_final is None:
            return bad("beta", args.beta, "a finite number >= 0")
        return bad("beta", f"{args.beta},{args.beta_final}", "two finite numbers >= 0")
    for name in ("latent_dim", "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "lora_rank", "checkpointing_steps",
                 "logging_steps", "num_eval_images", "num_inference_steps"):
        if getattr(args, name) < 1:
            return bad(name, getattr(args, name), "an integer >= 1")
    for name in ("latent_noise_warmup_steps", "validation_steps", "checkpoints_total_limit"):
        if getattr(args, name) < 0:
            return bad(name, getattr(args, name), "an integer >= 0")
    if args.anchor_steps < 0 or not (math.isfinite(args.anchor_weight) and args.anchor_weight >= 0):
        return bad("anchor_steps" if args.anchor_steps < 0 else "anchor_weight",
                   args.anchor_steps if args.anchor_steps < 0 else args.anchor_weight, "a number >= 0")
    if args.anchor_steps and not args.init_encoder:
        return "--anchor_steps needs --init_encoder: the anchor holds the code of the encoder the run starts from."
    if isinstance(args.capacity, tuple) and len(args.capacity) != args.latent_dim:
        return (f"--capacity has {len(args.capacity)} per-dimension targets but --latent_dim is {args.latent_dim}; "
                "give one value or one per dimension.")
    try:
        rate_control_from_args(args)
        parse_noise_bands(args.noise_bands, args.latent_dim)
    except ValueError as e:
        return str(e)
    if args.resolution is not None and args.resolution < 1:
        return bad("resolution", args.resolution, "an integer >= 1 (or left out: the UNet's sample_size)")
    if args.num_threads is not None and args.num_threads < 1:
        return bad("num_threads", args.num_threads, "an integer >= 1")
    try:
        parse_encoder_channels(args.encoder_channels)
    except ValueError as e:
        return bad("encoder_channels", args.encoder_channels, str(e))
    if args.encoder_hidden_dim < 1:
        return bad("encoder_hidden_dim", args.encoder_hidden_dim, "an integer >= 1")
    if args.lr_scheduler not in [t.value for t in SchedulerType]:
        return bad("lr_scheduler", args.lr_scheduler, f"one of {', '.join(t.value for t in SchedulerType)}")
    if args.pretrained_model_name_or_path in DEFAULT_BASES.values() and not os.path.isdir(args.pretrained_model_name_or_path):
        return (f"the shipped base {args.pretrained_model_name_or_path} is missing; rebuild it with "
                f"python examples/pretrain_unet.py --dataset {args.dataset} --output_dir {args.pretrained_model_name_or_path}")
    if args.cache_latents and (args.random_flip or not args.center_crop or not (args.train_data_dir or args.dataset_name)):
        return "--cache_latents needs an image dataset with deterministic preprocessing: --center_crop and no --random_flip"
    earlier = earlier_run(args.output_dir)
    if earlier and not args.overwrite_output_dir and not args.resume_from_checkpoint:
        return (f"--output_dir {args.output_dir} already holds a run ({', '.join(earlier[:4])}); pass --overwrite_output_dir to "
                "replace it, --resume_from_checkpoint latest to continue it, or another --output_dir")
    return run_problem(args) or data_problem(args)  # last: it may look the dataset up on the Hub


def run_problem(args) -> str | None:
    """The checkpoint flag's problem, or None."""
    if args.resume_from_checkpoint not in (None, "latest") and resolve_checkpoint(args) is None:
        return (f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is neither a checkpoint in --output_dir {args.output_dir} "
                f"nor a directory; pass 'latest', a checkpoint-<step> name from {args.output_dir}, or a checkpoint's path")
    return None


def data_problem(args) -> str | None:
    """The data flags' problem, or None. A --dataset_name is looked up (a local folder resolved, a Hub id
    asked for with a 10 s limit) but nothing is downloaded or decoded."""
    if not 0 <= args.proportion_empty_prompts <= 1:
        return f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts!r}"
    if args.caption_column and not (args.dataset_name or args.train_data_dir):
        return "--caption_column needs --dataset_name or --train_data_dir (the procedural --dataset has no captions)"
    if args.proportion_empty_prompts > 0 and not args.caption_column:
        return "--proportion_empty_prompts needs --caption_column (without captions every prompt is already the empty one)"
    return image_data_problem(args)


def resolve_checkpoint(args) -> str | None:
    """--resume_from_checkpoint as a folder: 'latest' is the newest checkpoint in --output_dir, a name is
    looked for inside --output_dir first (as in diffusers' scripts), then taken as a path. None when absent."""
    value = args.resume_from_checkpoint
    if value == "latest":
        found = checkpoint_dirs(args.output_dir)
        return os.path.join(args.output_dir, found[-1]) if found else None
    for path in (os.path.join(args.output_dir, value), value):
        if os.path.isdir(path):
            return path
    return None


def earlier_run(output_dir) -> list:
    """What an earlier run left in ``output_dir`` (a reusable latent cache does not count)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n != "latent_cache" and not n.startswith("."))


def clear_earlier_run(output_dir) -> None:
    """--overwrite_output_dir: remove the earlier run's checkpoints, logs and validation images now.

    Its adapter and report stay until this run has saved its own, so a run that fails or diverges
    leaves a working adapter behind.
    """
    keep = set(adapter_lib.ADAPTER_PARTS) | {"report", "latent_cache"}
    for name in earlier_run(output_dir):
        if name not in keep:
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


@torch.no_grad()
def step_kl_per_dim(accelerator, encoder, cleans) -> torch.Tensor:
    """Per-dimension KL of ``q(z | x_0)`` averaged over the whole optimiser step: every micro-batch on every process.

    Free bits compare this with their threshold, so that the clamp sees the same batch mean whatever
    the number of processes and accumulation steps.
    """
    with torch.no_grad(), accelerator.autocast():
        total = sum(encoder(c).kl_per_dim().float().sum(0) for c in cleans)
    count = torch.tensor([float(sum(c.shape[0] for c in cleans))], device=total.device)
    if accelerator.num_processes > 1:
        total, count = accelerator.reduce(total, reduction="sum"), accelerator.reduce(count, reduction="sum")
    return total / count


class TrainingDiverged(SystemExit):
    """A non-finite loss, gradient or weight: the run stops (non-zero exit) and saves nothing."""


def stop_if_diverged(accelerator, step: int, what: str, value: torch.Tensor, output_dir: str) -> None:
    """Stop every rank together when ``value`` is not finite on any of them."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(value).all()) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        raise TrainingDiverged(
            f"Training diverged at step {step}: the {what} is not finite (NaN or inf). Nothing from this run was saved; "
            f"{output_dir} keeps its earlier adapter, if any. Lower --learning_rate or --max_grad_norm, or check the data."
        )


def collapse_warning(kl_per_dim: list[float], gain: float, step: int, max_steps: int, threshold: float = ACTIVE_KL_NATS) -> str | None:
    """A message when the code carries (almost) nothing: every dimension's KL below ``threshold``
    nats, or guidance that does not lower the denoising error. None when all is well."""
    if step < max(50, 0.05 * max_steps):
        return None
    if max(kl_per_dim) < threshold:
        return (f"Posterior collapse at step {step}: every latent dimension has KL < {threshold} nats, so z carries no "
                "information. Lower --beta, raise --free_bits, or emphasise mid noise levels (--timestep_sampling mid).")
    if gain <= 0:
        return (f"No guidance gain at step {step} (unguided - guided = {gain:.4g} <= 0): the encoder's guidance does not "
                "help the denoiser. Lower --learning_rate or --beta, or check the base model.")
    return None


def rate_control_from_args(args):
    """The RateControl of the flags, or None when no rate flag is set."""
    control = RateControl(capacity=args.capacity, capacity_ramp_steps=args.capacity_ramp_steps, capacity_start=args.capacity_start,
                          mismatch_weight=args.mismatch_weight, tc_weight=args.tc_weight, tc_on=args.tc_on)
    active = control.capacity is not None or control.mismatch_weight > 0 or control.tc_weight > 0
    return control if active else None


def capacity_arg(value: str):
    """``--capacity``: one number of nats, or comma-separated numbers (one target per dimension)."""
    try:
        values = [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nats or comma-separated numbers (one per dimension), got {value!r}") from None
    return values[0] if len(values) == 1 else tuple(values)


def beta_arg(value: str):
    """``--beta``: one weight, or ``start,end`` (moved geometrically from start to end over the run)."""
    try:
        values = [float(v) for v in value.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a number or start,end, got {value!r}")
    return values[0] if len(values) == 1 else tuple(values)


def load_init_encoder(path: str, latent_dim: int) -> SAMIEncoder:
    """The encoder of a saved β-VAE / β-TCVAE (``compare.py --save_models``) or of an adapter, for ``--init_encoder``."""
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(os.path.join(path, "encoder", "config.json")):
        encoder = SAMIEncoder.from_pretrained(os.path.join(path, "encoder"))
    elif os.path.isfile(config_path) and json.load(open(config_path)).get("_class_name") == "BetaVAE":
        from sami_adapter.baselines.beta_vae import BetaVAE

        encoder = BetaVAE.from_pretrained(path).encoder
    else:
        raise SystemExit(f"--init_encoder {path!r} is neither an adapter (encoder/config.json) nor a baseline saved by "
                         "compare.py --save_models (config.json of a BetaVAE); point it at one of those folders.")
    if encoder.config.latent_dim != latent_dim:
        raise SystemExit(f"--init_encoder has a {encoder.config.latent_dim}-dimensional code but --latent_dim is {latent_dim}; "
                         f"pass --latent_dim {encoder.config.latent_dim}.")
    return encoder


@torch.no_grad()
def anchor_codes(anchor, clean: torch.Tensor) -> torch.Tensor:
    """The anchor encoder's posterior means of the clean images (its own noise level 0)."""
    return anchor(clean).mean


def parse_noise_bands(value, latent_dim, num_train_timesteps=1000):
    """--noise_bands: None, 'nested' or a comma-separated list of upper timesteps."""
    if value is None:
        return None
    if value == "nested":
        return nested_guidance_bands(latent_dim, num_train_timesteps)
    try:
        bands = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"--noise_bands must be 'nested' or comma-separated timesteps, got {value!r}") from None
    if len(bands) != latent_dim:
        raise ValueError(f"--noise_bands needs one upper timestep per latent dimension ({latent_dim}), got {len(bands)}")
    return bands


def build_unet(args):
    """The base UNet and training scheduler (or a fresh UNet for joint training from scratch)."""
    if args.pretrained_model_name_or_path is None:
        resolution = args.resolution or 16
        channels = DATASETS[args.dataset].num_channels
        unet = UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=1,
                           block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)
        return unet, DDPMScheduler(num_train_timesteps=1000)
    unet, scheduler_config = load_base_unet_and_scheduler(args.pretrained_model_name_or_path)
    return unet, DDPMScheduler.from_config(scheduler_config)


def make_pipeline(encoder, unet, noise_scheduler, components) -> SAMIPipeline:
    pipe = SAMIPipeline(unet=unet, scheduler=DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False), encoder=encoder,
                        **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def save_validation(pipe, images, path, seed, latent_dim, steps, eta):
    """Reconstructions (input row, reconstruction row) and one traversal row per dimension, as one PNG."""
    values = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, images.shape[0]).tolist()
    rows = [images.cpu(), reconstructions(pipe, images, steps, eta, seed), traversal_rows(pipe, images[:1], range(latent_dim), values, steps, seed)]
    return save_image_grid(torch.cat(rows), path, nrow=images.shape[0], scale=4)


def checkpoint_dirs(output_dir):
    if not os.path.isdir(output_dir):
        return []
    dirs = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    return sorted(dirs, key=lambda d: int(d.split("-")[-1]))


class Run:
    """What set-up builds and the training step, its logging and the save share."""

    def __init__(self, args, accelerator, unet, noise_scheduler, components: Dict[str, Any], unet_kwargs_one: Dict[str, torch.Tensor],
                 resolution: int):
        self.args, self.accelerator, self.unet, self.noise_scheduler = args, accelerator, unet, noise_scheduler
        self.components, self.unet_kwargs_one, self.resolution = components, unet_kwargs_one, resolution
        self.objective = self.optimizer = self.lr_scheduler = self.lora_config = self.anchor = None
        self.param_groups: List[Dict[str, Any]] = []
        self.trainable: List[torch.Tensor] = []
        self.held_out = self.batches = self.timestep_probs = self.cache = self.loader = None
        self.sample_shape: tuple = ()
        self.discriminator = self.disc_optimizer = self.ema = None
        self.run_config: Dict[str, Any] = {}
        self.start_step, self.start_time = 0, 0.0
        self.window: Dict[str, list] = {k: [] for k in WINDOW_KEYS}

    @property
    def vae(self):
        return self.components.get("vae")

    @property
    def log_path(self) -> str:
        return os.path.join(self.args.output_dir, self.args.logging_dir, "train_log.jsonl")


WINDOW_KEYS = ("loss", "diffusion", "unguided", "kl_per_dim", "t", "guided_err", "unguided_err", "terms")


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    start_time = time.time()
    table = open_image_table(args, accelerator)  # before the models: a missing column or split fails at once
    run = build_models(args, accelerator)
    run.start_time = start_time
    build_data(run, table)
    prepare(run)
    resume(run)

    progress = tqdm(range(run.start_step, args.max_train_steps), initial=run.start_step, total=args.max_train_steps,
                    disable=not accelerator.is_local_main_process, desc="SAMI")
    run.objective.train()
    for step in range(run.start_step, args.max_train_steps):
        beta = train_step(run, step)
        progress.update(1)
        if (step + 1) % args.logging_steps == 0 or step + 1 == args.max_train_steps:
            log_window(run, step + 1, beta, progress)
        if accelerator.is_main_process and args.validation_steps and (step + 1) % args.validation_steps == 0 and step + 1 < args.max_train_steps:
            validate(run, step + 1)
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < args.max_train_steps:
            stop_if_diverged(accelerator, step + 1, "weight", torch.stack([p.detach().float().abs().max() for p in run.trainable]), args.output_dir)
            save_checkpoint(accelerator, args, step + 1, run.run_config)
    progress.close()
    save(run, max(run.start_step, args.max_train_steps))
    tear_down(run)


def make_accelerator(args) -> Accelerator:
    """The Accelerator (trackers that are installed), logging, the output folder cleared by --overwrite_output_dir,
    CPU threads and the seed."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,  # None: what `accelerate config` / `accelerate launch` set
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    if args.report_to != "none":
        try:
            __import__(args.report_to if args.report_to != "tensorboard" else "torch.utils.tensorboard")
        except Exception:
            accelerator.log_with = []
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if args.overwrite_output_dir and not args.resume_from_checkpoint:
        if accelerator.is_main_process:
            clear_earlier_run(args.output_dir)
        accelerator.wait_for_everyone()
    if accelerator.device.type == "cpu":
        # `accelerate launch` exports OMP_NUM_THREADS=1; on CPU give each process its share of the cores instead.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(args.num_threads or max(1, cores // accelerator.num_processes))
    set_seed(args.seed)
    return accelerator


def build_models(args, accelerator) -> Run:
    """The base UNet and scheduler, the latent-diffusion components, the encoder (and its anchor), LoRA, and the
    objective with its optimiser and learning-rate schedule."""
    unet, noise_scheduler = build_unet(args)
    # Latent diffusion (Stable Diffusion-style bases): SAMI works on the VAE latents the UNet denoises.
    components = load_latent_components(args.pretrained_model_name_or_path) if args.pretrained_model_name_or_path else {}
    resolution = fitting_resolution(args, unet, components)
    run = Run(args, accelerator, unet, noise_scheduler, components, base_conditioning(args, unet, components), resolution)
    setup_precision_and_memory(args, accelerator, unet, components)
    if run.vae is not None:
        run.vae.requires_grad_(False).eval().to(accelerator.device)
    time_conditioning, bias_free = ENCODER_TYPES[args.encoder_type]
    encoder = SAMIEncoder(in_channels=unet.config.in_channels, sample_size=unet.config.sample_size, latent_dim=args.latent_dim,
                          block_out_channels=parse_encoder_channels(args.encoder_channels), hidden_dim=args.encoder_hidden_dim,
                          time_conditioning=time_conditioning, guidance_bands=args.guidance_bands, bias_free=bias_free)
    if args.init_encoder:  # its architecture replaces the flags', so the adapter's metadata says what was trained
        encoder = load_init_encoder(args.init_encoder, args.latent_dim)
        args.encoder_type = next(k for k, v in ENCODER_TYPES.items() if v == (encoder.config.time_conditioning, encoder.config.bias_free))
        args.encoder_channels = ",".join(str(c) for c in encoder.config.block_out_channels)
        args.encoder_hidden_dim = encoder.config.hidden_dim
        if args.anchor_steps:
            run.anchor = copy.deepcopy(encoder).requires_grad_(False).eval().to(accelerator.device)  # the start, kept fixed
    if args.gradient_checkpointing:
        encoder.enable_gradient_checkpointing()
    if args.unet_mode == "frozen":
        unet.requires_grad_(False).eval()
    elif args.unet_mode == "lora":
        unet.requires_grad_(False)
        targets = ["to_q", "to_k", "to_v", "to_out.0"] if run.unet_kwargs_one else None  # a text-conditioned UNet: its attention
        run.lora_config = add_lora(unet, rank=args.lora_rank, target_modules=targets)
        cast_training_params(unet, dtype=torch.float32)  # the LoRA weights are trained, and fp16/bf16 updates would underflow
    if args.gradient_checkpointing and args.unet_mode != "frozen":  # a frozen UNet runs without autograd: nothing to save
        unet.enable_gradient_checkpointing()
    run.objective = SAMIObjective(encoder, unet, args.unet_mode != "frozen", lora_only=args.unet_mode == "lora")
    run.param_groups = [{"params": list(encoder.parameters()), "lr": args.learning_rate}]
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    if unet_params:
        run.param_groups.append({"params": unet_params, "lr": args.unet_learning_rate})
    run.optimizer = torch.optim.AdamW(run.param_groups, weight_decay=0.0)
    run.lr_scheduler = get_scheduler(args.lr_scheduler, run.optimizer, num_warmup_steps=LR_WARMUP_STEPS * accelerator.num_processes,
                                     num_training_steps=args.max_train_steps * accelerator.num_processes)
    return run


def fitting_resolution(args, unet, components) -> int:
    """--resolution, or the UNet's (times the VAE's factor); a resolution the UNet does not take stops the run."""
    vae = components.get("vae")
    scale = vae_scale_factor(vae) if vae is not None else 1
    resolution = args.resolution or unet.config.sample_size * scale
    if resolution != unet.config.sample_size * scale:
        raise SystemExit(f"--resolution {resolution} does not fit the UNet (sample_size {unet.config.sample_size}"
                         f"{f' x VAE factor {scale}' if vae is not None else ''}); use --resolution {unet.config.sample_size * scale}.")
    return resolution


def base_conditioning(args, unet, components) -> Dict[str, torch.Tensor]:
    """The UNet's extra inputs for one image: the empty prompt's embedding for a text-conditioned UNet, else none."""
    if is_text_conditioned(unet):
        if "text_encoder" not in components or "tokenizer" not in components:
            raise SystemExit("This UNet is text-conditioned but the base model has no text_encoder/tokenizer to embed the empty prompt.")
        from sami_adapter.latent import empty_prompt_embeddings

        return {"encoder_hidden_states": empty_prompt_embeddings(components["text_encoder"], components["tokenizer"], 1)}
    if args.caption_column:
        raise SystemExit(f"--caption_column {args.caption_column!r}: this UNet is not text-conditioned (no cross_attention_dim), so "
                         "captions cannot condition it; leave the flag out to train on the images alone.")
    return {}


def build_data(run: Run, table) -> None:
    """The training and held-out data, the step batches, the timestep distribution and the latent cache."""
    args, unet = run.args, run.unet
    pixel_channels = run.vae.config.in_channels if run.vae is not None else unet.config.in_channels
    if table is not None:
        try:
            dataset = ImageDataset.from_datasets(table, args.image_column, run.resolution, pixel_channels, caption_column=args.caption_column,
                                                       center_crop=args.center_crop, random_flip=args.random_flip, seed=args.seed)
        except ValueError as e:  # a model with other than 1 or 3 channels
            raise SystemExit(f"{args.train_data_dir or args.dataset_name!r}: {e}") from e
        run.held_out = dataset
    else:
        dataset = DATASETS[args.dataset](num_samples=1, resolution=run.resolution, seed=args.seed)
        if dataset.num_channels != pixel_channels:
            raise SystemExit(f"--dataset {args.dataset} has {dataset.num_channels} channel(s) but the model takes {pixel_channels}.")
        run.held_out = DATASETS[args.dataset](num_samples=max(args.num_eval_images, 16), resolution=run.resolution,
                                              seed=args.seed + HELD_OUT_SEED_OFFSET, split="test")
    # One draw per optimiser step, sliced into micro-batches and then among processes: N processes with
    # A accumulation steps at batch B see exactly what one process sees at batch N * A * B.
    run.batches = StepBatches(dataset, args.train_batch_size * run.accelerator.num_processes * args.gradient_accumulation_steps, args.seed,
                              empty_prompt_share=args.proportion_empty_prompts)
    run.timestep_probs = timestep_distribution(args.timestep_sampling, run.noise_scheduler.config.num_train_timesteps)
    run.sample_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if args.cache_latents and run.vae is not None:
        run.cache = LatentCache(os.path.join(args.output_dir, "latent_cache"),
                                fingerprint=LatentCache.fingerprint_of(base=args.pretrained_model_name_or_path, resolution=run.resolution,
                                                                       data=args.train_data_dir or args.dataset_name))


def prepare(run: Run) -> None:
    """The TC discriminator (when the rate control needs one), accelerate's wrapping, and the EMA."""
    args, accelerator = run.args, run.accelerator
    if args.rate is not None and args.rate.needs_discriminator:
        discriminator = TCDiscriminator(latent_dim=args.latent_dim)
        run.discriminator, run.disc_optimizer = accelerator.prepare(discriminator, discriminator.make_optimizer())
    run.objective, run.optimizer, run.lr_scheduler = accelerator.prepare(run.objective, run.optimizer, run.lr_scheduler)
    if args.unet_mode == "frozen":
        run.unet.to(accelerator.device)
    run.trainable = [p for group in run.param_groups for p in group["params"]]
    if args.use_ema:
        run.ema = EMAModel(run.trainable, decay=EMA_DECAY)
        run.ema.to(accelerator.device)
        accelerator.register_for_checkpointing(run.ema)


def resume(run: Run) -> None:
    """The run's identity for its checkpoints, the checkpoint to resume from, the data loader from there, the trackers."""
    args, accelerator, encoder = run.args, run.accelerator, run.accelerator.unwrap_model(run.objective).encoder
    run.run_config = {"base_model_name_or_path": args.pretrained_model_name_or_path, "unet_mode": args.unet_mode, "latent_dim": args.latent_dim,
                      "resolution": run.resolution, "encoder_channels": args.encoder_channels, "encoder_stem_stride": encoder.config.stem_stride}
    # Recorded only when used, so checkpoints of runs without these options resume the same way.
    if args.guidance_bands:
        run.run_config["guidance_bands"] = list(args.guidance_bands)
    if run.discriminator is not None:
        run.run_config["tc_discriminator"] = True
    if encoder.config.bias_free:
        run.run_config["bias_free_encoder"] = True
    if encoder.config.hidden_dim != 256:  # 256 was the only width before --encoder_hidden_dim
        run.run_config["encoder_hidden_dim"] = encoder.config.hidden_dim
    if args.resume_from_checkpoint:
        path = resolve_checkpoint(args)  # only 'latest' can find nothing here: check_args refused other missing names
        if path is None:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}; starting from scratch.")
        else:
            run.start_step = load_checkpoint(accelerator, path, run.run_config)
    run.loader = step_loader(args, run.batches, accelerator, run.start_step)
    if accelerator.is_main_process:
        accelerator.init_trackers("sami", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        os.makedirs(os.path.join(args.output_dir, args.logging_dir), exist_ok=True)


def micro_batches(run: Run, step: int) -> list:
    """This process's micro-batches of optimiser step ``step``: (tensors, clean UNet input, captions) each."""
    args, accelerator = run.args, run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    step_batch = run.batches.batch(step, run.timestep_probs, run.noise_scheduler.config.num_train_timesteps, args.latent_dim, run.sample_shape,
                                   with_images=run.loader is None)
    micro_size = args.train_batch_size * world
    parts = []
    for micro in range(args.gradient_accumulation_steps):
        local = {k: v[micro * micro_size : (micro + 1) * micro_size].chunk(world)[rank].to(accelerator.device) for k, v in step_batch.items()}
        captions = next_items(run.loader, step, local, accelerator.device) if run.loader is not None else None
        clean = local["images"]
        if run.vae is not None:  # VAE latents once per batch, no gradients; from disk when cached
            clean = run.cache.get_or_compute(run.vae, local["indices"], clean) if run.cache is not None else images_to_latents(run.vae, clean)
            clean = clean.float()
        parts.append((local, clean, captions))
    return parts


def train_step(run: Run, step: int) -> float:
    """One optimiser step: the SAMI loss and its backward over every micro-batch, the discriminator's step after
    the model's (one order for SAMI and the baselines), the EMA; its numbers go into ``run.window``. Returns beta."""
    args, accelerator = run.args, run.accelerator
    beta = beta_at(step, args.max_train_steps, args.beta, args.beta_final)
    noise_scale = min(1.0, step / args.latent_noise_warmup_steps) if args.latent_noise_warmup_steps else 1.0
    anchor_weight = args.anchor_weight * max(0.0, 1.0 - step / args.anchor_steps) if run.anchor is not None else 0.0
    parts = micro_batches(run, step)
    kl_reference = None  # one batch on one process: the loss's own batch mean is the step's (no second encoder pass)
    if args.free_bits > 0 and (len(parts) > 1 or accelerator.num_processes > 1):
        kl_reference = step_kl_per_dim(accelerator, accelerator.unwrap_model(run.objective).encoder, [p[1] for p in parts])
    discriminator = accelerator.unwrap_model(run.discriminator) if run.discriminator is not None else None
    for micro, (local, clean, captions) in enumerate(parts):
        unet_kwargs = unet_conditioning(run.unet_kwargs_one, run.components, captions, clean.shape[0], accelerator.device)
        with accelerator.accumulate(run.objective), accelerator.autocast():
            out = SAMILossOutput(**run.objective(
                clean, run.noise_scheduler, unet_kwargs=unet_kwargs, beta=beta, weighting=args.weighting, timesteps=local["timesteps"],
                timestep_probs=run.timestep_probs, noise=local["noise"], latent_noise=local["latent_noise"] * noise_scale,
                free_bits=args.free_bits, kl_reference=kl_reference, rate=args.rate, step=step,
                anchor_mean=anchor_codes(run.anchor, clean) if anchor_weight > 0 else None, anchor_weight=anchor_weight,
                tc_discriminator=discriminator, intervention_weight=args.intervention_weight, intervention_dims=local["intervention_dims"]))
            stop_if_diverged(accelerator, step + 1, "loss", out.loss.detach(), args.output_dir)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(run.trainable, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
                if accelerator.mixed_precision != "fp16":  # fp16's loss scaler skips overflowing steps by design
                    stop_if_diverged(accelerator, step + 1, "gradient norm", grad_norm.detach(), args.output_dir)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        disc_loss = None
        if run.discriminator is not None:
            with accelerator.accumulate(run.discriminator):
                codes = out.posterior_mean if args.tc_on == "mean" else out.z
                g = torch.Generator().manual_seed(int(np.random.default_rng([args.seed, step, micro, 3]).integers(0, 2**62)))
                disc_loss = discriminator_step(run.discriminator, run.disc_optimizer, codes, g, backward=accelerator.backward)
        record(run, out, disc_loss)
    if run.ema is not None:
        run.ema.step(run.trainable)
    return beta


def record(run: Run, out: SAMILossOutput, disc_loss: Optional[torch.Tensor]) -> None:
    """One micro-batch's losses, KL, errors and rate terms into the logging window."""
    window = run.window
    scalars = {k: v for k, v in (out.rate or {}).items() if v.ndim == 0}
    if out.rate is not None:
        scalars.update({f"mismatch_dim_{i}": v for i, v in enumerate(out.rate["mismatch_per_dim"])})
    if out.intervention_loss is not None:
        scalars["intervention"] = out.intervention_loss
    if disc_loss is not None:
        scalars["discriminator_loss"] = disc_loss.detach()
    if scalars:  # one device sync for all of them
        values = torch.stack([v.float().to(run.accelerator.device) for v in scalars.values()]).tolist()
        window["terms"].append(dict(zip(scalars, values)))
    window["loss"].append(out.loss.item()); window["diffusion"].append(out.diffusion_loss.item())
    window["unguided"].append(out.unguided_diffusion_loss.item()); window["kl_per_dim"].append(out.kl_per_dim.detach().cpu())
    window["t"].append(out.timesteps.cpu()); window["guided_err"].append(out.guided_error.cpu()); window["unguided_err"].append(out.unguided_error.cpu())


def log_window(run: Run, global_step: int, beta: float, progress) -> None:
    """The logging window's means (losses, guidance gain overall and per noise band, KL per dimension, rate terms) to the
    trackers, train_log.jsonl and the progress bar; a warning when the code collapses. Empties the window."""
    window, accelerator = run.window, run.accelerator
    kl = torch.stack(window["kl_per_dim"]).mean(0)
    diffusion, unguided = float(np.mean(window["diffusion"])), float(np.mean(window["unguided"]))
    logs = {"step": global_step, "loss": float(np.mean(window["loss"])), "diffusion_loss": diffusion, "unguided_loss": unguided,
            "guidance_gain": unguided - diffusion, "relative_gain": 1 - diffusion / max(unguided, 1e-12), "kl": float(kl.sum()),
            "beta": beta, "lr": run.lr_scheduler.get_last_lr()[0]}
    logs.update({f"kl_dim_{i}": float(v) for i, v in enumerate(kl)})
    if window["terms"]:
        logs.update({k: float(np.mean([t[k] for t in window["terms"]])) for k in window["terms"][0]})
    bands = band_gains(torch.cat(window["t"]), torch.cat(window["guided_err"]), torch.cat(window["unguided_err"]), GAIN_BANDS)
    logs.update({f"gain_t{k}": v for k, v in bands.items()})
    progress.set_postfix(loss=f"{logs['loss']:.2f}", gain=f"{logs['relative_gain']:.1%}", active=len(active_dimensions(kl.tolist())))
    accelerator.log(logs, step=global_step)
    if accelerator.is_main_process:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(logs) + "\n")
        warning = collapse_warning(kl.tolist(), unguided - diffusion, global_step, run.args.max_train_steps)
        if warning:
            logger.warning(warning)
    run.window = {k: [] for k in WINDOW_KEYS}


def validate(run: Run, global_step: int) -> None:
    """The validation picture of this step (reconstructions and traversals), to disk and to the trackers."""
    args = run.args
    pipe = make_pipeline(run.accelerator.unwrap_model(run.objective).encoder, run.unet, run.noise_scheduler, run.components)
    with run.accelerator.autocast():  # under mixed precision, trained fp32 weights (LoRA) meet the frozen fp16/bf16 ones
        path = save_validation(pipe, held_out_images(run.held_out, 8, run.accelerator.device),
                               os.path.join(args.output_dir, "validation", f"step-{global_step}.png"), args.seed, args.latent_dim,
                               args.num_inference_steps, EVAL_ETA)
    log_validation_image(run.accelerator, path, global_step)
    run.objective.train()


def save(run: Run, global_step: int) -> None:
    """Every rank's weights checked equal and finite; then the adapter, its model card, the report and the upload."""
    args, accelerator = run.args, run.accelerator
    accelerator.wait_for_everyone()
    # Every rank must hold the same weights after DDP training; record the evidence.
    checksum = torch.stack([p.detach().double().sum() for p in run.trainable]).sum().view(1).to(accelerator.device)
    rank_checksums = accelerator.gather(checksum).cpu().tolist()
    stop_if_diverged(accelerator, global_step, "weight", checksum, args.output_dir)
    if not accelerator.is_main_process:
        return
    train_seconds = time.time() - run.start_time
    model = accelerator.unwrap_model(run.objective)
    if run.ema is not None:
        run.ema.copy_to(run.trainable)
    base_ref = args.pretrained_model_name_or_path
    if base_ref and os.path.isdir(base_ref):
        base_ref = os.path.relpath(os.path.abspath(base_ref), os.path.abspath(args.output_dir))
    report = {"train_seconds": round(train_seconds, 1), "rank_weight_checksums": rank_checksums, "mixed_precision": accelerator.mixed_precision}
    extra = {"training": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}, "metrics": report}
    # The adapter first: an evaluation that fails must not cost the trained weights.
    adapter_lib.save_adapter(args.output_dir, model.encoder, base_ref, unet=model.unet, unet_mode=args.unet_mode, lora_config=run.lora_config,
                             extra=extra)
    write_model_card(args)
    logger.info(f"Adapter saved to {args.output_dir} ({train_seconds:.0f} s)")
    if not args.no_report:
        report = {**evaluation_report(run, model), **report}
        adapter_lib.update_adapter_config(args.output_dir, {"metrics": report})
        write_model_card(args)
        logger.info(f"Report: {json.dumps(report)}")
    if args.push_to_hub:
        upload_to_hub(args.output_dir, args.push_to_hub, ignore=[f"{args.logging_dir}/*"])


def evaluation_report(run: Run, model) -> Dict[str, Any]:
    """finetune's report (report/ beside the adapter): measured in fp32 whatever the training precision, so that
    its numbers compare across runs."""
    args = run.args
    for module in (model.unet, run.components.get("vae"), run.components.get("text_encoder")):
        if module is not None and module.dtype != torch.float32:
            module.to(dtype=torch.float32)
    pipe = make_pipeline(model.encoder, model.unet, run.noise_scheduler, run.components)
    images = held_out_images(run.held_out, args.num_eval_images, run.accelerator.device)
    report_dir = os.path.join(args.output_dir, "report")
    shutil.rmtree(report_dir, ignore_errors=True)  # no picture of an earlier run may stay next to this one's
    procedural = not (args.train_data_dir or args.dataset_name)
    disks = args.dataset if args.dataset in DISK_DATASETS and procedural else None
    report = write_report(pipe, images, report_dir, run.noise_scheduler, seed=args.seed, num_inference_steps=args.num_inference_steps,
                          eta=EVAL_ETA, sami_scale=REPORT_SAMI_SCALE, disk_factors=disks)
    if args.dataset == "digits" and procedural and run.vae is None:  # labelled real images: how well the code reads the class
        report["usefulness"] = digits_usefulness(mean_code_fn(pipe), run.resolution, references=False, seed=args.seed)
    return report


def tear_down(run: Run) -> None:
    """Both ranks leave together, and the DDP model goes before the process group.

    A rank that tears the process group down while rank 0 is still saving makes rank 0 hang at exit.
    DDP's reducer holds the group, and if the reducer's deallocation drops the last reference, gloo's
    destructor joins its worker threads while this thread holds the GIL; a worker still freeing a
    finished collective's tensors needs the GIL to do so, and both wait forever. The Python
    process-group object releases the GIL in its destructor, so it is kept until the model is gone and
    dropped last.
    """
    run.accelerator.wait_for_everyone()
    group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
    run.accelerator.end_training()
    run.accelerator.free_memory()
    run.objective = run.optimizer = run.lr_scheduler = run.discriminator = run.disc_optimizer = None
    gc.collect()
    del group


def setup_precision_and_memory(args, accelerator, unet, components) -> torch.dtype:
    """The dtype of frozen weights (fp16/bf16 under mixed precision, as diffusers' scripts do), with the VAE, the
    text encoder and a UNet that is not trained in full cast to it (its LoRA weights, added later, stay fp32).
    Mixed precision also allows TF32 matmuls (Ampere and newer GPUs): a run that accepts bf16 accepts TF32."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    frozen = [components.get("vae"), components.get("text_encoder"), unet if args.unet_mode != "full" else None]
    for module in frozen:
        if module is not None and module.dtype != weight_dtype:
            module.to(dtype=weight_dtype)  # frozen weights: the training dtype is enough, and halves their memory
    if weight_dtype != torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return weight_dtype


def step_loader(args, batches, accelerator, start_step):
    """An iterator over this process's micro-batches of file data from ``start_step`` on; None for procedural data.

    Not passed through accelerator.prepare: its sampler would re-shard and re-seed the batches, while
    StepShardSampler already gives each process its own items of the (seed, step)-determined global batch.
    """
    if batches.procedural:
        return None
    sampler = StepShardSampler(batches, start_step, args.max_train_steps, args.train_batch_size, args.gradient_accumulation_steps,
                               accelerator.process_index, accelerator.num_processes)
    return iter(torch.utils.data.DataLoader(StepItems(batches), batch_sampler=sampler, num_workers=args.dataloader_num_workers))


def next_items(loader, step, local, device):
    """Put the loader's next micro-batch into ``local`` (images) and return its captions (None without captions)."""
    items = next(loader)
    if int(items["step"][0]) != step or not torch.equal(items["index"], local["indices"].cpu()):
        raise RuntimeError(f"The data loader is out of step with training step {step}; this is a bug, please report it.")
    local["images"] = items["pixel_values"].to(device)
    return items.get("caption")


@torch.no_grad()
def unet_conditioning(unet_kwargs_one, components, captions, batch_size, device):
    """The UNet's extra inputs for one micro-batch: the captions' embeddings, or the empty prompt's (if any)."""
    if captions is not None:
        hidden = prompt_embeddings(components["text_encoder"], components["tokenizer"], list(captions))
        return {"encoder_hidden_states": hidden.to(device)}
    return {k: v.expand(batch_size, *v.shape[1:]).to(device) for k, v in unet_kwargs_one.items()}


def log_validation_image(accelerator, path, step):
    """Send the validation grid written to ``path`` to the trackers too (tensorboard, wandb)."""
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", image[None], step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=f"step {step}")]}, step=step)


def held_out_images(dataset, n, device):
    from sami_adapter.training import dataset_images

    return dataset_images(dataset, n).to(device)


def save_checkpoint(accelerator, args, step, run_config):
    """accelerate save_state into a temporary folder, renamed into place only once complete."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "sami_run.json"), "w") as f:
            json.dump({**run_config, "step": step}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        existing = checkpoint_dirs(args.output_dir)
        for old in existing[: max(0, len(existing) - args.checkpoints_total_limit)] if args.checkpoints_total_limit else []:
            shutil.rmtree(os.path.join(args.output_dir, old), ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path, run_config) -> int:
    """Restore a checkpoint, refusing (with a clear message, touching nothing) ones that do not fit this run."""
    meta_path = os.path.join(path, "sami_run.json")
    if not os.path.isdir(path) or not os.path.isfile(meta_path):
        raise SystemExit(f"{path} is not a complete SAMI checkpoint (no sami_run.json). Pass another one or --resume_from_checkpoint latest.")
    with open(meta_path) as f:
        meta = json.load(f)
    keys = set(run_config) | (set(meta) & {"guidance_bands", "tc_discriminator", "bias_free_encoder"})  # options recorded only when used
    mismatched = {k: (meta.get(k), run_config.get(k)) for k in sorted(keys) if meta.get(k) != run_config.get(k)}
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
        raise SystemExit(f"Checkpoint {path} was made for another setup ({detail}); resume with the same base model and flags.")
    try:
        accelerator.load_state(path)
    except Exception as e:  # truncated safetensors, wrong shapes, missing files
        raise SystemExit(f"Could not load checkpoint {path}: {type(e).__name__}: {e}. It is truncated or corrupt; "
                         "resume from an earlier checkpoint-<step> folder. Nothing in the output directory was changed.") from e
    return int(meta["step"])


def write_model_card(args) -> None:
    """README.md of the adapter from its config (metrics included once the report has run)."""
    card = adapter_model_card(adapter_lib.read_adapter_config(args.output_dir), args.output_dir, args.push_to_hub)
    adapter_lib.update_adapter_config(args.output_dir, {}, str(card))


if __name__ == "__main__":
    main()
