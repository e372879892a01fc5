#!/usr/bin/env python
"""Train the small unconditional diffusers UNet that the embedded default adapter guides.

This is diffusers' own unconditional recipe (``UNet2DModel`` + ``DDPMScheduler``, epsilon
prediction, MSE, AdamW, cosine schedule, EMA) on the procedural ``disks`` data, drawn fresh every
step so the model never overfits. It writes a standard diffusers directory (``unet/``,
``scheduler/``) that ``examples/finetune.py --pretrained_model_name_or_path`` accepts, plus a PNG
grid of DDIM samples and the share of samples that hold one clean disk.

    python examples/pretrain_unet.py --output_dir models/ddpm-disks-16 --resolution 16
    python examples/pretrain_unet.py --dataset background_disks --output_dir models/ddpm-background-disks-16
    python examples/pretrain_unet.py --dataset digits --output_dir models/ddpm-digits-16 --max_train_steps 8000
    python examples/pretrain_unet.py --train_data_dir my-images --resolution 32 --random_flip --output_dir my-base

Your own images (no base model yet): ``--train_data_dir`` / ``--dataset_name`` and the other data flags of
finetune.py, read the same way (resized on the short side, cropped, optionally flipped; every batch a
function of ``--seed`` and the step); ``--num_channels`` says grey or colour (default: the first image's).

For ``digits`` (real scans: a finite set) the UNet trains on the fixed ``train`` split only, and the report
adds the share of samples that a classifier of real digits is sure of (``confident_digit_fraction``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from _args import add_image_source_arguments, add_image_training_arguments, image_data_problem, open_image_table  # noqa: E402
from sami_adapter.data import DATASETS, clean_background_disk_fraction, clean_disk_fraction, confident_digit_fraction  # noqa: E402
from sami_adapter.report import save_image_grid  # noqa: E402
from sami_adapter.training import ImageDataset, StepBatches, StepItems, StepShardSampler  # noqa: E402

GREY_MODES = ("1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="models/ddpm-disks-16", help="Where the diffusers UNet + scheduler go.")
    p.add_argument("--dataset", default="disks", choices=sorted(DATASETS),
                   help="Built-in training data (procedural sets drawn fresh every step; digits: its train split).")
    p.add_argument("--resolution", type=int, default=16, help="Image side in pixels.")
    p.add_argument("--block_out_channels", default="32,64,64", help="UNet2DModel block widths, comma separated.")
    p.add_argument("--train_batch_size", type=int, default=64, help="Batch size.")
    p.add_argument("--max_train_steps", type=int, default=4000, help="Optimisation steps.")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="Peak AdamW learning rate.")
    p.add_argument("--lr_scheduler", default="cosine", help="diffusers get_scheduler name.")
    p.add_argument("--lr_warmup_steps", type=int, default=200, help="Linear warm-up steps.")
    p.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the saved weights.")
    p.add_argument("--num_eval_samples", type=int, default=512, help="DDIM samples for the clean-disk check.")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps of the evaluation samples.")
    p.add_argument("--seed", type=int, default=0, help="Seed of data, init and sampling.")
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"], help="Accelerate precision.")
    g = p.add_argument_group("your own images (instead of --dataset)")
    add_image_source_arguments(g)
    add_image_training_arguments(g)
    g.add_argument("--num_channels", type=int, default=None, choices=[1, 3],
                   help="1 (grey) or 3 (RGB): the UNet's channels for your images (default: 1 when the first image is grey, else 3).")
    args = p.parse_args(argv)
    problem = image_data_problem(args)
    if problem:
        p.error(problem)
    return args


def image_channels(table, column: str) -> int:
    """1 when the first image of ``table`` is grey (or 16-bit grey), else 3."""
    from io import BytesIO

    from PIL import Image

    from sami_adapter.hf_data import Column

    item = Column(table, column)[0]
    with Image.open(BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
        return 1 if image.mode in GREY_MODES else 3


def training_batches(args, accelerator, table):
    """The dataset (for its channels) and a function ``step -> clean batch (B, C, H, W)`` on this process.

    A built-in set draws from one generator seeded once, as it always has; the user's images go through
    finetune.py's :class:`~sami_adapter.training.StepBatches`: every batch a function of ``(seed, step)``,
    each process decoding its own share in ``--dataloader_num_workers`` workers.
    """
    if table is None:
        dataset = DATASETS[args.dataset](num_samples=1, resolution=args.resolution, seed=args.seed)
        rng = np.random.default_rng(args.seed)
        return dataset.num_channels, lambda step: dataset.sample(args.train_batch_size, rng)[0]
    channels = args.num_channels or image_channels(table, args.image_column)
    dataset = ImageDataset.from_datasets(table, args.image_column, args.resolution, channels, center_crop=args.center_crop,
                                               random_flip=args.random_flip, seed=args.seed)
    batches = StepBatches(dataset, args.train_batch_size * accelerator.num_processes, args.seed)
    sampler = StepShardSampler(batches, 0, args.max_train_steps, args.train_batch_size, 1, accelerator.process_index, accelerator.num_processes)
    loader = iter(torch.utils.data.DataLoader(StepItems(batches), batch_sampler=sampler, num_workers=args.dataloader_num_workers))
    return channels, lambda step: next(loader)["pixel_values"]


def sample_images(unet: UNet2DModel, scheduler_config: dict, num: int, steps: int, seed: int) -> torch.Tensor:
    """Plain unconditional DDIM samples (eta = 0) from ``unet`` with diffusers' ``DDIMPipeline``, as (N, C, H, W) in [-1, 1]."""
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=num, generator=torch.Generator().manual_seed(seed), eta=0.0, num_inference_steps=steps, output_type="np").images
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2.0 - 1.0


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    table = open_image_table(args, accelerator)
    channels, clean_batch = training_batches(args, accelerator, table)
    widths = tuple(int(c) for c in args.block_out_channels.split(","))
    unet = UNet2DModel(
        sample_size=args.resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=widths,
        down_block_types=("DownBlock2D",) * len(widths),
        up_block_types=("UpBlock2D",) * len(widths),
        norm_num_groups=math.gcd(32, *widths),  # diffusers' 32 groups where the widths allow (the shipped bases), fewer for narrow test UNets
    )
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=1e-6)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=args.ema_decay)
    ema.to(accelerator.device)

    start = time.time()
    progress = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process, desc="pretrain")
    for step in progress:
        clean = clean_batch(step).to(accelerator.device)
        noise = torch.randn_like(clean)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
        noisy = noise_scheduler.add_noise(clean, noise, t)
        with accelerator.autocast():
            loss = F.mse_loss(unet(noisy, t).sample.float(), noise)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(accelerator.unwrap_model(unet).parameters())
        progress.set_postfix(loss=f"{loss.item():.4f}")
    minutes = (time.time() - start) / 60

    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        ema.copy_to(model.parameters())
        model.eval().save_pretrained(os.path.join(args.output_dir, "unet"))
        noise_scheduler.save_pretrained(os.path.join(args.output_dir, "scheduler"))
        samples = sample_images(model, noise_scheduler.config, args.num_eval_samples, args.num_inference_steps, args.seed)
        save_image_grid(samples[:64], os.path.join(args.output_dir, "samples.png"), nrow=8, scale=4)
        report = {"train_minutes": round(minutes, 2), "steps": args.max_train_steps, "batch": args.train_batch_size}
        builtin = args.dataset if table is None else None
        if table is not None:
            report["data"] = {"source": args.train_data_dir or args.dataset_name, "images": len(table), "channels": channels}
        clean_check = {"disks": clean_disk_fraction, "background_disks": clean_background_disk_fraction}.get(builtin)
        if clean_check is not None:  # the share of samples that are one clean image of the dataset
            report["clean_disk_fraction"] = clean_check(samples)[0]
        if builtin == "digits":  # real data: how often a classifier of real digits is sure of a sample, against real held-out scans
            report["confident_digit_fraction"] = confident_digit_fraction(samples)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        with open(os.path.join(args.output_dir, "pretrain_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report))


if __name__ == "__main__":
    main()
