"""What the baselines share: the face they show a caller (:class:`AutoencoderMixin`), the training loop
(seeded fresh batches, a step and/or wall-clock budget, a log) and the sampling loop of the diffusion
decoders (:func:`sample_loop`)."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
from diffusers import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..data import DATASETS
from ..data.base import FactorDataset
from ..encoder import LatentPosterior
from ..guidance import check_first_step
from ..images import ImageInput, postprocess, to_model_range
from ..training import StepBatches


class AutoencoderMixin:
    """:class:`~sami_adapter.SAMIPipeline`'s calls for a baseline: ``encode(images)``,
    ``reconstruct(images, generator=..., num_inference_steps=..., eta=..., output_type=...)`` and generation by
    ``model(batch_size=..., generator=..., ...)``, with images in and out as diffusers takes and returns them
    ([0, 1]), so that no caller branches on which model it holds.

    The model provides ``encoder`` (a :class:`~sami_adapter.SAMIEncoder`, called on clean pixels in [-1, 1]),
    ``latent_dim`` and ``decode(z, generator=, num_inference_steps=, eta=)`` -> pixels in [-1, 1]; a deterministic
    decoder ignores the sampling arguments.
    """

    def _pixels(self, images: ImageInput) -> torch.Tensor:
        size = self.config.sample_size
        return to_model_range(images, channels=self.config.in_channels, size=(size, size)).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, images: ImageInput) -> LatentPosterior:
        """``q(z | x)`` of images (tensors (N, C, H, W) in [0, 1], arrays, PIL images); ``.mean`` is the representation (N, D)."""
        return self.encoder(self._pixels(images), 0)

    @torch.no_grad()
    def reconstruct(self, images: ImageInput, generator: Optional[torch.Generator] = None, num_inference_steps: int = 50,
                    eta: float = 0.0, output_type: str = "pil", return_dict: bool = True):
        """Decode ``z = mean q(z | x)`` of ``images``; ``.images`` as ``output_type`` (``"pt"``: (N, C, H, W) in [0, 1])."""
        sample = self.decode(self.encode(images).mean, generator=generator, num_inference_steps=num_inference_steps, eta=eta)
        images = postprocess(sample, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @torch.no_grad()
    def forward(self, batch_size: int = 1, generator: Optional[torch.Generator] = None, num_inference_steps: int = 50,
                eta: float = 0.0, output_type: str = "pil", return_dict: bool = True):
        """Generate as a diffusers pipeline does: decode ``batch_size`` codes drawn from the prior ``N(0, I)``."""
        z = randn_tensor((batch_size, self.latent_dim), generator=generator, device=self.device, dtype=self.dtype)
        images = postprocess(self.decode(z, generator=generator, num_inference_steps=num_inference_steps, eta=eta), output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def sample_loop(
    model_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: Any,
    sample: torch.Tensor,
    num_inference_steps: int,
    generator: Optional[torch.Generator] = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """The diffusers sampling loop of a baseline's diffusion decoder, from the initial noise ``sample``.

    ``model_output(model_input, t)`` is the denoiser's output in the scheduler's ``prediction_type`` at
    the scaled input (``scheduler.scale_model_input``); ``generator`` and ``eta`` go to ``scheduler.step``
    when it takes them (DDIM's ``eta``: 0 deterministic, 1 stochastic). Returns the final sample.
    """
    scheduler.set_timesteps(num_inference_steps, device=sample.device)
    check_first_step(scheduler)
    sample = sample * scheduler.init_noise_sigma
    extra = {k: v for k, v in (("generator", generator), ("eta", eta)) if k in inspect.signature(scheduler.step).parameters}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(model_output(model_input, t), t, sample, **extra).prev_sample
    return sample


@dataclass
class TrainingBudget:
    """When training stops: after ``max_steps`` optimiser steps or ``max_seconds`` of wall clock, whichever first.

    At least one must be given. The clock covers the whole loop (data rendering included), the same
    way a SAMI adapter's ``train_seconds`` does.
    """

    max_steps: Optional[int] = None
    max_seconds: Optional[float] = None

    def __post_init__(self):
        if self.max_steps is None and self.max_seconds is None:
            raise ValueError("give max_steps, max_seconds or both.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}.")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}.")

    def done(self, step: int, elapsed: float) -> bool:
        """True once ``step`` steps are taken or ``elapsed`` seconds have passed (at least one step is always taken)."""
        if step == 0:
            return False
        return (self.max_steps is not None and step >= self.max_steps) or (self.max_seconds is not None and elapsed >= self.max_seconds)


@dataclass
class TrainingLog:
    """What a baseline's training did: steps, seconds and the loss every ``log_every`` steps."""

    steps: int = 0
    seconds: float = 0.0
    history: List[Dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, object]:
        """Plain-dict form (JSON-ready)."""
        return {"steps": self.steps, "seconds": round(self.seconds, 2), "history": self.history}


def resolve_dataset(dataset: Union[str, FactorDataset], resolution: Optional[int], seed: int) -> FactorDataset:
    """A dataset instance: a name from :data:`sami_adapter.data.DATASETS` is built at ``resolution``
    (default 32); an instance is checked against ``resolution``."""
    if isinstance(dataset, str):
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}.")
        return DATASETS[dataset](num_samples=1, resolution=resolution or 32, seed=seed)
    if not isinstance(dataset, FactorDataset):
        raise TypeError(f"dataset must be a FactorDataset or a name, got {type(dataset).__name__}.")
    if resolution is not None and resolution != dataset.resolution:
        raise ValueError(f"resolution {resolution} does not match the dataset's {dataset.resolution}.")
    return dataset


def train_loop(
    model: torch.nn.Module,
    step_loss: Callable[[torch.Tensor, torch.Generator], Dict[str, torch.Tensor]],
    dataset: FactorDataset,
    budget: TrainingBudget,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    desc: str = "train",
    log_every: int = 50,
    max_grad_norm: float = 10.0,
    after_step: Optional[Callable[[torch.Generator], None]] = None,
) -> TrainingLog:
    """Adam on ``step_loss(images, generator)["loss"]`` over fresh seeded batches until the budget is spent.

    Batch ``k`` is ``StepBatches(dataset, batch_size, seed).images(k)`` (a function of ``(seed, k)``)
    and the loss's random draws use a generator seeded by ``(seed, k)``: a run is reproducible up to
    where the wall clock stops it. ``after_step(generator)`` runs after each optimiser step (an
    adversary's own step), with the step's generator.
    """
    from tqdm.auto import tqdm

    batches = StepBatches(dataset, batch_size, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    device = next(model.parameters()).device
    log = TrainingLog()
    bar = tqdm(total=budget.max_steps, desc=desc, disable=not progress)
    window: Dict[str, List[float]] = {}
    model.train()
    start = time.perf_counter()
    step = 0
    while not budget.done(step, time.perf_counter() - start):
        images = batches.images(step).to(device)
        g = torch.Generator(device="cpu").manual_seed(int(np.random.default_rng([seed, step, 1]).integers(0, 2**62)))
        terms = step_loss(images, g)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if after_step is not None:
            after_step(g)
        step += 1
        for key, value in terms.items():
            window.setdefault(key, []).append(float(value.detach()))
        if step % log_every == 0:
            entry = {"step": step, "seconds": round(time.perf_counter() - start, 2)}
            entry.update({k: float(np.mean(v)) for k, v in window.items()})
            log.history.append(entry)
            window = {}
            bar.set_postfix(loss=f"{entry['loss']:.4g}")
        bar.update(1)
    bar.close()
    log.steps, log.seconds = step, time.perf_counter() - start
    if window:
        entry = {"step": step, "seconds": round(log.seconds, 2)}
        entry.update({k: float(np.mean(v)) for k, v in window.items()})
        log.history.append(entry)
    model.eval()
    return log
