#!/usr/bin/env python
"""What a SAMI adapter costs, measured side by side in one run, at two UNet sizes.

Sizes (each with a default ``SAMIEncoder``: latent_dim 8, sized to the UNet's input):

* ``demo``:  the 16 px, 1-channel disks UNet of ``models/ddpm-disks-16`` (shipped weights, or random
  with ``--demo_weights random``);
* ``cifar``: a ``UNet2DModel`` with the google/ddpm-cifar10-32 architecture (35.7 M parameters), random weights;
* ``tiny``:  an 8 px UNet with channels (8, 16), only for quick checks of the script itself.

**Part one, sampling.** DDIM sampling with ``SAMIPipeline`` and the same UNet, scheduler, batch, initial
noise and number of steps: guided (a code ``z``, ``sami_scale=1``) against unguided (the same
pipeline with ``sami_scale=0``, which skips the encoder). Also ``pipe.encode`` throughput at t = 0
(clean images) and the ratio "one 50-step unguided sample / encoding one image" (per-step time x 50
when ``--num_inference_steps`` is not 50; a DDIM step costs the same at every t).

**Part two, training step.** Time per optimisation step (zero_grad + forward + backward + AdamW step)
on the same fixed batch (images, noise, timesteps, code noise) for

* ``frozen``: the SAMI adapter, ``sami_loss(train_unet=False)``; the UNet has ``requires_grad=False``
  and runs without autograd, only the encoder trains (through the double backward of the score);
* ``lora``:   ``add_lora`` on the UNet (peft), ``sami_loss(train_unet=True)``, LoRA + encoder train;
* ``joint``:  UNet and encoder both trainable, ``sami_loss(train_unet=True)``;
* ``plain``:  ordinary DDPM fine-tuning of the same UNet: ``mse(unet(x_t, t), eps)``, UNet trainable.

Ratios are to ``plain``.

**Timing hygiene.** ``torch.set_num_threads(--threads)`` (default: every core this process may use);
``--warmup`` untimed calls of every variant first; then ``--repeats`` rounds in which every variant runs
once, in an order that rotates from round to round so background load hits all variants alike; the
median is reported. CUDA is synchronised around every timed call. The machine (processor, cores,
load average, torch/diffusers versions, device) is printed and saved with the results.

**Peak memory**, measured on a fresh build of each variant after the timing (``--no_memory`` skips it):

* CPU: each variant runs in its own fresh process (multiprocessing ``forkserver``, whose server has
  only imported the libraries; ``spawn`` where there is no forkserver), because ``ru_maxrss`` is a
  process-wide high-water mark. ``peak MB`` = ``ru_maxrss`` after two training steps minus the resident
  set before the variant's models were built, i.e. weights + gradients + optimizer state + activations
  of that variant, without the interpreter and libraries (the whole process's ``ru_maxrss`` is saved
  too, as ``process_peak_rss_mb``). Before that baseline the process runs the same variant once on a
  throwaway 8 px UNet, so what torch initialises lazily on a first step is not counted. ``step MB`` = the same peak minus the resident set with the models
  built: what the training step itself adds. RSS includes allocator slack, so read it to ~1 MB.
* CUDA: in the main process, ``torch.cuda.max_memory_allocated`` during two steps of the variant,
  minus what was allocated before it was built (``peak MB``) or after (``step MB``). Tensor memory only,
  without the CUDA context.

1 MB = 2^20 bytes. Results go to ``--output_dir`` as ``benchmark.json`` and ``benchmark.md`` (written
after each size, so a long run keeps what it has measured).

**Part three, the explorer** (``--explorer_adapter DIR``): the time of one traversal answer of
``examples/explore.py`` (``traverse_view``: one image decoded at the explorer's default steps), interleaved
with the same answer at 25 steps, the old default. Floor: 0.5 s median.

**Precision and compilation** (``--dtype``, ``--compile``): ``bf16`` / ``fp16`` run every timed call
under ``torch.autocast`` (fp32 weights, as Accelerate's mixed precision trains), on CPU and GPU alike;
``--compile`` wraps the UNet in ``torch.compile`` for every variant and the encoder for sampling (its
training needs a double backward, which compiled graphs do not support). Compilation happens in the
warm-up rounds, so use ``--warmup`` >= 1 with it.

    python examples/benchmark.py --device cuda --dtype bf16 --compile   # a GPU, one command
    python examples/benchmark.py --sizes demo --device cpu --dtype bf16

Floors: guided sampling <= 1.15x unguided (demo) and <= 1.03x (cifar); encoding one
image >= 50x faster than a 50-step sample; the frozen adapter's training step <= 0.8x plain fine-tuning
(demo) and <= 0.5x (cifar). ``--check`` makes the exit status 1 when one is missed.

    python examples/benchmark.py                              # demo and cifar, all cores
    python examples/benchmark.py --sizes demo --repeats 9     # just the demo size
    python examples/benchmark.py --sizes tiny --num_inference_steps 2 --repeats 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import multiprocessing
import os
import platform
import resource
import runpy
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from _args import parse_encoder_channels  # noqa: E402
from sami_adapter import SAMIEncoder, SAMIPipeline, sami_loss  # noqa: E402
from sami_adapter.lora import add_lora  # noqa: E402

DEMO_DIR = os.path.join(REPO_ROOT, "models", "ddpm-disks-16")
SIZES = ("demo", "cifar", "tiny")
VARIANTS = ("frozen", "lora", "joint", "plain")
DEFAULT_SAMPLE_BATCH = {"demo": 16, "cifar": 4, "tiny": 4}
DEFAULT_TRAIN_BATCH = {"demo": 64, "cifar": 16, "tiny": 8}
# guided/unguided sampling (at most), 50-step sample / one-image encode (at least), frozen adapter / plain step (at most).
FLOORS = {
    "demo": {"guided_over_unguided": 1.15, "sample50_over_encode": 50.0, "adapter_over_plain": 0.8},
    "cifar": {"guided_over_unguided": 1.03, "sample50_over_encode": 50.0, "adapter_over_plain": 0.5},
    "tiny": {},
}
# google/ddpm-cifar10-32's unet/config.json (random weights are used; only the architecture matters here).
CIFAR10_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    mid_block_scale_factor=1,
    time_embedding_type="positional",
)
TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
)
# The recipe examples/finetune.py trains with by default (it does not change the cost of a step).
LOSS_KWARGS = dict(beta=0.01, weighting="simple", free_bits=0.5)
LATENT_DIM = 8
MEMORY_STEPS = 2
_WORKER_NAME = "__sami_benchmark_memory_worker__"
MB = 2.0**20


# ----------------------------------------------------------------------------- arguments
def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="demo,cifar", help=f"Comma-separated UNet sizes out of {', '.join(SIZES)} (tiny: for smoke tests).")
    p.add_argument("--tiny", action="store_true", help="Shorthand for --sizes tiny (an 8 px UNet with channels (8, 16)): checks the script in seconds.")
    p.add_argument("--demo_weights", default="shipped", choices=["shipped", "random"],
                   help="Weights of the demo UNet: the ones in models/ddpm-disks-16 (random when missing), or random.")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps per sample (part one).")
    p.add_argument("--sample_batch_size", type=int, default=None,
                   help="Images per sampling/encode call, for every size (default: demo 16, cifar 4, tiny 4).")
    p.add_argument("--train_batch_size", type=int, default=None,
                   help="Images per training step, for every size (default: demo 64, cifar 16, tiny 8).")
    p.add_argument("--lora_rank", type=int, default=4, help="LoRA rank of the lora variant.")
    p.add_argument("--encoder_channels", default="32,64",
                   help="Encoder block widths at the demo and cifar sizes (finetune.py --encoder_channels; its default).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed calls of every variant before timing.")
    p.add_argument("--repeats", type=int, default=5, help="Timed rounds; every variant runs once per round; the median is reported.")
    p.add_argument("--skip_sampling", action="store_true", help="Skip part one.")
    p.add_argument("--skip_training", action="store_true", help="Skip part two.")
    p.add_argument("--no_memory", action="store_true", help="Skip the peak-memory measurement of part two.")
    p.add_argument("--device", default="auto", help="'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="Compute precision: fp32, or bf16 / fp16 autocast around every timed call (fp32 weights).")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (every variant) and the encoder (sampling; training needs a double backward through it).")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: every core available to this process).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the weights, batch, noise and codes.")
    p.add_argument("--output_dir", default="benchmark", help="Where benchmark.json and benchmark.md are written.")
    p.add_argument("--profile", action="store_true",
                   help="Also profile (torch.profiler) one guided sampling call and one frozen-adapter training step per size, "
                        "and put the top operators by self time into benchmark.md.")
    p.add_argument("--explorer_adapter", default=None,
                   help="An adapter directory: also time one traversal answer of examples/explore.py (part three).")
    p.add_argument("--check", action="store_true", help="Exit with status 1 when a floor is missed.")
    p.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")
    args = p.parse_args(argv)
    args.sizes = ["tiny"] if args.tiny else [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown or not args.sizes:
        p.error(f"--sizes takes a comma-separated list out of {', '.join(SIZES)}; got {unknown or 'nothing'}")
    if args.num_inference_steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--num_inference_steps and --repeats must be >= 1 and --warmup >= 0")
    for name in ("sample_batch_size", "train_batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    try:
        args.encoder_channels = parse_encoder_channels(args.encoder_channels)
    except ValueError as e:
        p.error(f"--encoder_channels takes {e}, e.g. 32,64; got {args.encoder_channels!r}")
    if args.skip_sampling and args.skip_training:
        p.error("--skip_sampling and --skip_training together leave nothing to measure")
    args.threads = args.threads or _available_cores()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.dtype == "fp16" and torch.device(args.device).type == "cpu":
        p.error("--dtype fp16 needs a GPU (CPU autocast is bf16); use --dtype bf16 on CPU")
    if args.compile and args.warmup < 1:
        p.error("--compile compiles during the warm-up: give --warmup >= 1")
    return args


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def with_precision(fn: Callable[[], Any], args, device: torch.device) -> Callable[[], Any]:
    """``fn`` run under ``torch.autocast`` at ``--dtype`` (unchanged for fp32)."""
    dtype = DTYPES[args.dtype]
    if dtype is None:
        return fn

    def call():
        with torch.autocast(device.type, dtype=dtype):
            return fn()

    return call


def maybe_compile(module: torch.nn.Module, args) -> torch.nn.Module:
    """``torch.compile(module)`` with ``--compile`` (attributes such as ``config`` stay reachable)."""
    return torch.compile(module) if args.compile else module


# ----------------------------------------------------------------------------- models
def build_unet(size: str, demo_weights: str = "shipped", seed: int = 0):
    """The UNet of ``size`` and its DDPM training scheduler."""
    torch.manual_seed(seed)
    if size == "demo":
        weights = os.path.join(DEMO_DIR, "unet", "diffusion_pytorch_model.safetensors")
        if demo_weights == "shipped" and os.path.isfile(weights):
            unet = UNet2DModel.from_pretrained(os.path.join(DEMO_DIR, "unet"))
        else:
            unet = UNet2DModel.from_config(UNet2DModel.load_config(os.path.join(DEMO_DIR, "unet")))
        scheduler_dir = os.path.join(DEMO_DIR, "scheduler")
        scheduler = DDPMScheduler.from_pretrained(scheduler_dir) if os.path.isdir(scheduler_dir) else DDPMScheduler()
        return unet, scheduler
    if size == "cifar":
        return UNet2DModel(**CIFAR10_UNET_CONFIG), DDPMScheduler(num_train_timesteps=1000)  # the repo's schedule: linear 1e-4..0.02
    if size == "tiny":
        return UNet2DModel(**TINY_UNET_CONFIG), DDPMScheduler(num_train_timesteps=1000)
    raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")


def build_encoder(unet: UNet2DModel, size: str, seed: int = 0, channels: Tuple[int, ...] = (32, 64)) -> SAMIEncoder:
    """A SAMIEncoder with block widths ``channels`` for the UNet's input (the tiny size gets a tiny encoder).

    The head is zero-initialised for training; it gets small random weights here so that the
    posterior really depends on the input, as a trained encoder's does (autograd does the same work
    either way, but the guidance term is then not identically zero).
    """
    torch.manual_seed(seed + 1)
    sample_size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    kwargs = dict(block_out_channels=(8, 16), hidden_dim=32, norm_num_groups=4) if size == "tiny" else dict(block_out_channels=channels)
    encoder = SAMIEncoder(in_channels=unet.config.in_channels, sample_size=sample_size, latent_dim=LATENT_DIM, **kwargs)
    with torch.no_grad():
        encoder.head.weight.normal_(0.0, 0.02)
    return encoder


def _num_params(modules, trainable_only: bool = False) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad or not trainable_only)


def _model_mb(modules) -> float:
    return sum(t.numel() * t.element_size() for m in modules for t in list(m.parameters()) + list(m.buffers())) / MB


# ----------------------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _rotated(names, round_index: int) -> List[str]:
    """Every variant once, starting one further each round (ABCD, BCDA, ...), so none always runs first."""
    names = list(names)
    k = round_index % len(names)
    return names[k:] + names[:k]


def _median(values: List[float]) -> float:
    return float(statistics.median(values))


def _progress(total: int, desc: str, disable: bool):
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


def _interleaved_times(calls: Dict[str, Callable[[], Any]], args, device: torch.device, desc: str) -> Dict[str, List[float]]:
    """Run every call once per round, in rotated order, for warm-up + repeats rounds; keep the timed rounds."""
    times: Dict[str, List[float]] = {name: [] for name in calls}
    bar = _progress((args.warmup + args.repeats) * len(calls), desc, args.no_progress)
    for r in range(args.warmup + args.repeats):
        for name in _rotated(calls, r):
            seconds = _timed(calls[name], device)
            if r >= args.warmup:
                times[name].append(seconds)
            bar.update(1)
    bar.close()
    return times


# ----------------------------------------------------------------------------- part one: sampling
def sampling_setup(unet, train_scheduler, encoder, batch: int, args, device: torch.device):
    """The DDIM SAMIPipeline of the timed calls and the profile, its codes ``z`` (batch, D) and their generator."""
    pipe = SAMIPipeline(unet=unet.to(device), scheduler=DDIMScheduler.from_config(train_scheduler.config, clip_sample=False),
                        encoder=encoder.to(device))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(args.seed + 2)
    return pipe, torch.randn(batch, LATENT_DIM, generator=g).to(device), g


def bench_sampling(size: str, unet, train_scheduler, encoder, args, device: torch.device) -> Dict[str, Any]:
    """Guided vs unguided DDIM sampling time per image, and encode throughput, with one SAMIPipeline."""
    batch = args.sample_batch_size or DEFAULT_SAMPLE_BATCH[size]
    steps = args.num_inference_steps
    pipe, z, g = sampling_setup(unet, train_scheduler, encoder, batch, args, device)
    scheduler = pipe.scheduler
    pipe.unet, pipe.encoder = maybe_compile(pipe.unet, args), maybe_compile(pipe.encoder, args)
    latents = torch.randn((batch, *pipe.sample_shape()), generator=g).to(device)
    images = torch.rand((batch, *pipe.sample_shape()), generator=g).to(device)  # [0, 1], diffusers' image range

    calls = {
        # Same z, initial noise, scheduler and steps; sami_scale=0 never calls the encoder.
        "guided": lambda: pipe(z=z, latents=latents, num_inference_steps=steps, sami_scale=1.0, output_type="pt"),
        "unguided": lambda: pipe(z=z, latents=latents, num_inference_steps=steps, sami_scale=0.0, output_type="pt"),
    }
    # One encode call takes milliseconds: time `inner` calls per round, enough for ~0.1 s.
    with_precision(lambda: pipe.encode(images), args, device)()
    one = _timed(with_precision(lambda: pipe.encode(images), args, device), device)
    inner = int(min(1000, max(1, math.ceil(0.1 / max(one, 1e-6)))))

    def encode_round():
        for _ in range(inner):
            pipe.encode(images)

    calls["encode"] = encode_round
    calls = {name: with_precision(fn, args, device) for name, fn in calls.items()}
    times = _interleaved_times(calls, args, device, f"{size}: sampling")

    guided = _median(times["guided"]) / batch
    unguided = _median(times["unguided"]) / batch
    encode = _median(times["encode"]) / (inner * batch)
    sample50 = unguided * 50 / steps
    result = {
        "batch_size": batch,
        "num_inference_steps": steps,
        "scheduler": type(scheduler).__name__,
        "guided_s_per_image": guided,
        "unguided_s_per_image": unguided,
        "guided_over_unguided": guided / unguided,
        "encode_s_per_image": encode,
        "encode_images_per_s": 1.0 / encode,
        "encode_calls_per_round": inner,
        "unguided_50_step_s_per_image": sample50,
        "sample50_over_encode": sample50 / encode,
        "raw_s_per_call": times,
    }
    floors = FLOORS[size]
    checks = {}
    if "guided_over_unguided" in floors:
        checks["guided_over_unguided"] = result["guided_over_unguided"] <= floors["guided_over_unguided"]
    if "sample50_over_encode" in floors:
        checks["sample50_over_encode"] = result["sample50_over_encode"] >= floors["sample50_over_encode"]
    result["floors"] = {k: v for k, v in floors.items() if k in checks}
    result["passed"] = checks
    return result


# ----------------------------------------------------------------------------- part two: training step
def training_batch(unet, scheduler, batch_size: int, seed: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """One fixed batch, reused by every variant and every step."""
    g = torch.Generator().manual_seed(seed + 3)
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    shape = (batch_size, unet.config.in_channels, size, size)
    return {
        "images": (torch.rand(shape, generator=g) * 2 - 1).to(device),
        "noise": torch.randn(shape, generator=g).to(device),
        "timesteps": torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g).to(device),
        "latent_noise": torch.randn(batch_size, LATENT_DIM, generator=g).to(device),
    }


def build_variant(name: str, unet, encoder, scheduler, batch: Dict[str, torch.Tensor], lora_rank: int = 4, lr: float = 1e-4,
                  compile_unet: bool = False):
    """``(step, modules)``: one optimisation step of the variant, and the models it holds.

    Takes ownership of ``unet`` and ``encoder`` (pass copies to keep the originals untouched).
    ``compile_unet``: the step calls ``torch.compile(unet)`` (after LoRA is added).
    """
    if name == "plain":
        unet.requires_grad_(True).train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
        net = torch.compile(unet) if compile_unet else unet

        def plain_step():
            optimizer.zero_grad(set_to_none=True)
            noisy = scheduler.add_noise(batch["images"], batch["noise"], batch["timesteps"])
            loss = F.mse_loss(net(noisy, batch["timesteps"]).sample.float(), batch["noise"].float())
            loss.backward()
            optimizer.step()
            return loss.detach()

        return plain_step, [unet]

    encoder.requires_grad_(True).train()
    if name == "frozen":
        unet.requires_grad_(False).eval()
    elif name == "lora":
        unet.requires_grad_(False).train()
        add_lora(unet, rank=lora_rank)
    elif name == "joint":
        unet.requires_grad_(True).train()
    else:
        raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")
    train_unet = name != "frozen"
    params = list(encoder.parameters()) + [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    net = torch.compile(unet) if compile_unet else unet

    def sami_step():
        optimizer.zero_grad(set_to_none=True)
        out = sami_loss(net, encoder, scheduler, batch["images"], train_unet=train_unet, timesteps=batch["timesteps"],
                        noise=batch["noise"], latent_noise=batch["latent_noise"], **LOSS_KWARGS)
        out.loss.backward()
        optimizer.step()
        return out.loss.detach()

    return sami_step, [unet, encoder]


def bench_training(size: str, unet, scheduler, encoder, args, device: torch.device) -> Dict[str, Any]:
    """Median time per optimisation step of every variant on the same batch, interleaved."""
    batch_size = args.train_batch_size or DEFAULT_TRAIN_BATCH[size]
    batch = training_batch(unet, scheduler, batch_size, args.seed, device)
    steps, info = {}, {}
    for name in VARIANTS:
        step, modules = build_variant(name, copy.deepcopy(unet).to(device), copy.deepcopy(encoder).to(device), scheduler, batch, args.lora_rank,
                                      compile_unet=args.compile)
        steps[name] = with_precision(step, args, device)
        info[name] = {"trainable_params": _num_params(modules, trainable_only=True), "model_mb": _model_mb(modules)}
    gc.collect()
    times = _interleaved_times({name: steps[name] for name in VARIANTS}, args, device, f"{size}: training")
    del steps
    gc.collect()

    plain = _median(times["plain"])
    variants = {}
    for name in VARIANTS:
        s = _median(times[name])
        variants[name] = {"s_per_step": s, "ratio_to_plain": s / plain, **info[name], "raw_s_per_step": times[name]}
    result = {"batch_size": batch_size, "loss_kwargs": dict(LOSS_KWARGS), "lora_rank": args.lora_rank, "variants": variants}
    floor = FLOORS[size].get("adapter_over_plain")
    if floor is not None:
        result["floors"] = {"adapter_over_plain": floor}
        result["passed"] = {"adapter_over_plain": variants["frozen"]["ratio_to_plain"] <= floor}
    else:
        result["floors"], result["passed"] = {}, {}
    return result


# ----------------------------------------------------------------------------- profiles
PROFILE_ROWS = 12


def profile_table(fn: Callable[[], Any], device: torch.device, rows: int = PROFILE_ROWS) -> Dict[str, Any]:
    """The operators of one call of ``fn`` by self time (torch.profiler, CPU and CUDA activities), top ``rows``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:rows]]
    return {"total_ms": total / 1e3, "top": top}


def bench_profiles(size: str, unet, scheduler, encoder, args, device: torch.device) -> Dict[str, Any]:
    """Profiles of one guided DDIM call (``--num_inference_steps`` steps) and one frozen-adapter training step."""
    batch = args.sample_batch_size or DEFAULT_SAMPLE_BATCH[size]
    pipe, z, _ = sampling_setup(copy.deepcopy(unet).eval(), scheduler, copy.deepcopy(encoder).eval(), batch, args, device)
    sample = with_precision(lambda: pipe(z=z, num_inference_steps=args.num_inference_steps, output_type="pt"), args, device)
    train_batch = training_batch(unet, scheduler, args.train_batch_size or DEFAULT_TRAIN_BATCH[size], args.seed, device)
    step, _ = build_variant("frozen", copy.deepcopy(unet).to(device), copy.deepcopy(encoder).to(device), scheduler, train_batch, args.lora_rank)
    return {"guided_sampling": profile_table(sample, device), "frozen_training_step": profile_table(with_precision(step, args, device), device)}


# ----------------------------------------------------------------------------- part three: the explorer
EXPLORER_FLOOR_S = 0.5


def bench_explorer(adapter: str, args, device: torch.device) -> Dict[str, Any]:
    """Median time of one traversal answer (the explorer's ``traverse_view``) at the explorer's default steps and at 25."""
    from sami_adapter.explorer import load_explorer, traverse_view

    explorer = load_explorer(adapter, num_examples=16, device=str(device))
    explorer.pipe.set_progress_bar_config(disable=True)
    default_steps = explorer.num_inference_steps
    z = [0.0] * explorer.latent_dim

    def answer(steps):
        def call():
            explorer.num_inference_steps = steps
            traverse_view(explorer, z, 0, 1.5, sami_scale=3.0, seed=0)
        return call

    times = _interleaved_times({f"{default_steps} steps": answer(default_steps), "25 steps": answer(25)}, args, device, "explorer")
    explorer.num_inference_steps = default_steps
    median = _median(times[f"{default_steps} steps"])
    return {"adapter": adapter, "default_steps": default_steps, "s_per_answer": median, "s_per_answer_25_steps": _median(times["25 steps"]),
            "floors": {"s_per_answer": EXPLORER_FLOOR_S}, "passed": {"s_per_answer": median <= EXPLORER_FLOOR_S}, "raw_s_per_call": times}


# ----------------------------------------------------------------------------- part two: peak memory
def _current_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _warm_up_libraries(variant: str, device: torch.device, lora_rank: int) -> None:
    """Run the variant once on a throwaway 8 px UNet with attention.

    The first step of a fresh process also pays for what torch and its kernels initialise lazily
    (autograd threads, oneDNN/cuBLAS workspaces, ...), tens of MB that are no part of any variant;
    this moves them in front of the baseline. Its own tensors are a few KB.
    """
    config = dict(TINY_UNET_CONFIG, down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=8)
    unet = UNet2DModel(**config).to(device)
    encoder = build_encoder(unet, "tiny").to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    step, _ = build_variant(variant, unet, encoder, scheduler, training_batch(unet, scheduler, 2, 0, device), lora_rank)
    step()
    del step, unet, encoder
    gc.collect()


def _memory_run(job: Dict[str, Any]) -> Dict[str, float]:
    """Build one variant from scratch, run MEMORY_STEPS steps and measure its peak memory (see module docstring)."""
    device = torch.device(job["device"])
    cuda = device.type == "cuda"
    _warm_up_libraries(job["variant"], device, job["lora_rank"])
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        _sync(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _current_rss_bytes() or _max_rss_bytes()
    unet, scheduler = build_unet(job["size"], job["demo_weights"], job["seed"])
    encoder = build_encoder(unet, job["size"], job["seed"], job["encoder_channels"]) if job["variant"] != "plain" else None
    unet.to(device)
    if encoder is not None:
        encoder.to(device)
    batch = training_batch(unet, scheduler, job["batch_size"], job["seed"], device)
    step, modules = build_variant(job["variant"], unet, encoder, scheduler, batch, job["lora_rank"])
    if cuda:
        _sync(device)
        loaded = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        loaded = _current_rss_bytes() or _max_rss_bytes()
    for _ in range(MEMORY_STEPS):
        step()
    if cuda:
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        result = {"peak_mb": (peak - before) / MB, "step_mb": (peak - loaded) / MB, "method": "torch.cuda.max_memory_allocated"}
        del step, modules, batch, unet, encoder
        gc.collect()
        torch.cuda.empty_cache()
        return result
    peak = _max_rss_bytes()
    return {"peak_mb": (peak - before) / MB, "step_mb": (peak - loaded) / MB, "process_peak_rss_mb": peak / MB,
            "method": "ru_maxrss of a fresh process"}


def _memory_worker(job: Dict[str, Any]) -> None:
    """Entry point of the fresh process (run through runpy, so it works however this file was imported)."""
    torch.set_num_threads(job["threads"])
    result = _memory_run(job)
    with open(job["result_path"], "w") as f:
        json.dump(result, f)


def _fresh_process_context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # The server imports these once; every variant's process is then forked from it, cheaply and
        # without inheriting any torch thread pool or allocation of this process.
        ctx.set_forkserver_preload(["torch", "diffusers", "peft", "sami_adapter"])
        return ctx
    return multiprocessing.get_context("spawn")


def measure_memory(size: str, args, device: torch.device, bar=None) -> Dict[str, Dict[str, float]]:
    """Peak memory of every variant, each from a fresh build (a fresh process on CPU)."""
    batch_size = args.train_batch_size or DEFAULT_TRAIN_BATCH[size]
    results = {}
    ctx = None if device.type == "cuda" else _fresh_process_context()
    for name in VARIANTS:
        job = {"size": size, "variant": name, "demo_weights": args.demo_weights, "seed": args.seed, "batch_size": batch_size,
               "lora_rank": args.lora_rank, "device": str(device), "threads": args.threads, "encoder_channels": args.encoder_channels}
        if ctx is None:
            results[name] = _memory_run(job)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                job["result_path"] = os.path.join(tmp, "memory.json")
                process = ctx.Process(target=runpy.run_path, args=(os.path.abspath(__file__),),
                                      kwargs={"init_globals": {"_MEMORY_JOB": job}, "run_name": _WORKER_NAME})
                process.start()
                process.join()
                if process.exitcode != 0 or not os.path.isfile(job["result_path"]):
                    raise RuntimeError(f"the memory measurement of {size}/{name} failed (exit code {process.exitcode}); "
                                       "rerun with --no_memory to skip it")
                with open(job["result_path"]) as f:
                    results[name] = json.load(f)
        if bar is not None:
            bar.update(1)
    return results


# ----------------------------------------------------------------------------- reporting
def machine_info(device: torch.device, threads: int) -> Dict[str, Any]:
    import diffusers
    import peft

    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        processor = names[0] if names else processor
    except OSError:
        pass
    info = {
        "processor": processor or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cores_available": _available_cores(),
        "torch_threads": threads,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
    }
    return info


def _fmt(value: Optional[float], spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _verdict(passed: Dict[str, bool], key: str, floor: Optional[float], op: str) -> str:
    if key not in passed:
        return "-"
    return f"{op}{floor:g}: {'PASS' if passed[key] else 'FAIL'}"


def tables(results: Dict[str, Any]) -> str:
    """Both parts as Markdown tables."""
    lines = []
    sampling = [(size, r["sampling"]) for size, r in results["sizes"].items() if "sampling" in r]
    if sampling:
        lines += ["### Part one: sampling (DDIM, SAMIPipeline)", "",
                  "| size | batch | steps | guided s/img | unguided s/img | guided / unguided | floor | encode img/s | 50-step sample / encode | floor |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for size, s in sampling:
            fl = s["floors"]
            lines.append(
                f"| {size} | {s['batch_size']} | {s['num_inference_steps']} | {s['guided_s_per_image']:.4g} | {s['unguided_s_per_image']:.4g} "
                f"| {s['guided_over_unguided']:.3f} | {_verdict(s['passed'], 'guided_over_unguided', fl.get('guided_over_unguided'), '<=')} "
                f"| {s['encode_images_per_s']:.4g} | {s['sample50_over_encode']:.4g} "
                f"| {_verdict(s['passed'], 'sample50_over_encode', fl.get('sample50_over_encode'), '>=')} |"
            )
        lines.append("")
    training = [(size, r["training"]) for size, r in results["sizes"].items() if "training" in r]
    if training:
        lines += ["### Part two: training step (same batch; ratio to plain diffusion fine-tuning)", "",
                  "| size | variant | batch | s/step | ratio to plain | floor | trainable params | peak MB | step MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for size, t in training:
            for name in VARIANTS:
                v = t["variants"][name]
                verdict = _verdict(t["passed"], "adapter_over_plain", t["floors"].get("adapter_over_plain"), "<=") if name == "frozen" else "-"
                lines.append(
                    f"| {size} | {name} | {t['batch_size']} | {v['s_per_step']:.4g} | {v['ratio_to_plain']:.3f} | {verdict} "
                    f"| {v['trainable_params']:,} | {_fmt(v.get('peak_mb'), '.1f')} | {_fmt(v.get('step_mb'), '.1f')} |"
                )
        lines.append("")
    for size, r in results["sizes"].items():
        for what, prof in r.get("profiles", {}).items():
            lines += [f"### Profile: {size}, {what.replace('_', ' ')} (torch.profiler, self time, total {prof['total_ms']:.0f} ms)", "",
                      "| operator | self ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{row['op']}` | {row['self_ms']:.1f} | {row['share']:.1%} | {row['calls']} |" for row in prof["top"]]
            lines.append("")
    if "explorer" in results:
        e = results["explorer"]
        lines += ["### Part three: the explorer (one traversal answer, 16 px)", "",
                  "| adapter | default steps | s per answer | floor | s per answer at 25 steps |", "|---|---|---|---|---|",
                  f"| `{os.path.basename(os.path.normpath(e['adapter']))}` | {e['default_steps']} | {e['s_per_answer']:.3f} "
                  f"| {_verdict(e['passed'], 's_per_answer', EXPLORER_FLOOR_S, '<=')} | {e['s_per_answer_25_steps']:.3f} |", ""]
    return "\n".join(lines)


def write_outputs(results: Dict[str, Any], output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    m = results["machine"]
    md = [
        "# sami-adapter benchmark", "",
        f"Machine: {m['device_name']}; {m['processor']}; {m['cores_available']} of {m['cpu_count']} cores available, "
        f"torch threads: {m['torch_threads']}; load average at start {m['load_average_at_start']}; "
        f"torch {m['torch']}, diffusers {m['diffusers']}, peft {m['peft']}, Python {m['python']}, {m['platform']}.", "",
        f"Command: `python examples/benchmark.py {' '.join(results['argv'])}`", "",
        f"Precision: {results['dtype']}{' (autocast)' if results['dtype'] != 'fp32' else ''}; torch.compile: {'yes' if results['compile'] else 'no'}.", "",
        f"Times are medians of {results['args']['repeats']} interleaved rounds after {results['args']['warmup']} warm-up round(s). "
        "Peak MB: memory of the variant (weights + gradients + optimizer state + activations) at its peak over two steps, "
        "without interpreter and libraries; step MB: what the step adds to the loaded weights "
        + ("(torch.cuda.max_memory_allocated)." if m["device"].startswith("cuda") else "(ru_maxrss of a fresh process per variant)."),
        "",
        tables(results),
    ]
    with open(os.path.join(output_dir, "benchmark.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(output_dir, "benchmark.json"), "w") as f:
        json.dump(results, f, indent=2)


def all_passed(results: Dict[str, Any]) -> bool:
    parts = [r[part] for r in results["sizes"].values() for part in ("sampling", "training") if part in r]
    parts += [results["explorer"]] if "explorer" in results else []
    return all(ok for part in parts for ok in part["passed"].values())


# ----------------------------------------------------------------------------- main
def main(argv=None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info(device, args.threads)
    print(f"machine: {machine['device_name']} | {machine['processor']} | {machine['cores_available']}/{machine['cpu_count']} cores, "
          f"torch threads: {args.threads} | load {machine['load_average_at_start']} | torch {machine['torch']}, diffusers {machine['diffusers']}")
    results: Dict[str, Any] = {"machine": machine, "argv": argv, "args": vars(args), "dtype": args.dtype, "compile": args.compile, "sizes": {}}
    for size in args.sizes:
        unet, scheduler = build_unet(size, args.demo_weights, args.seed)
        encoder = build_encoder(unet, size, args.seed, args.encoder_channels)
        entry = {"unet_params": _num_params([unet]), "encoder_params": _num_params([encoder]),
                 "encoder_channels": list(encoder.config.block_out_channels),
                 "unet_weights": "shipped" if size == "demo" and args.demo_weights == "shipped" and os.path.isfile(
                     os.path.join(DEMO_DIR, "unet", "diffusion_pytorch_model.safetensors")) else "random"}
        results["sizes"][size] = entry
        print(f"[{size}] UNet {entry['unet_params']:,} parameters ({entry['unet_weights']} weights), encoder {entry['encoder_params']:,}")
        if not args.skip_sampling:
            entry["sampling"] = bench_sampling(size, copy.deepcopy(unet).eval(), scheduler, copy.deepcopy(encoder).eval(), args, device)
        if args.profile:
            entry["profiles"] = bench_profiles(size, unet, scheduler, encoder, args, device)
        if not args.skip_training:
            entry["training"] = bench_training(size, unet, scheduler, encoder, args, device)
            if not args.no_memory:
                bar = _progress(len(VARIANTS), f"{size}: memory", args.no_progress)
                memory = measure_memory(size, args, device, bar)
                bar.close()
                for name, values in memory.items():
                    entry["training"]["variants"][name].update(values)
        del unet, encoder
        gc.collect()
        results["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        write_outputs(results, args.output_dir)
    if args.explorer_adapter:
        results["explorer"] = bench_explorer(args.explorer_adapter, args, device)
    print()
    print(tables(results))
    results["all_passed"] = all_passed(results)
    write_outputs(results, args.output_dir)
    print(f"written: {os.path.join(args.output_dir, 'benchmark.json')} and benchmark.md; floors {'all met' if results['all_passed'] else 'NOT all met'}")
    return results


if __name__ == "__main__":
    _results = main()
    sys.exit(1 if "--check" in sys.argv[1:] and not _results["all_passed"] else 0)
elif __name__ == _WORKER_NAME:
    _memory_worker(globals()["_MEMORY_JOB"])
