"""DiffAE-style baseline (Preechakul et al. 2022): a diffusion autoencoder trained jointly from scratch.

The semantic encoder is a noise-blind :class:`~sami_adapter.SAMIEncoder` called at ``t = 0``; its
posterior *mean* is the code ``z`` (deterministic, as DiffAE's; no KL term, the log-variance head
is unused). ``z`` enters a diffusers ``UNet2DModel`` through its class embedding:
``class_embed_type="identity"`` adds a vector of the time-embedding width to the timestep
embedding of every ResNet block, and a Linear layer ``z_proj`` maps ``z`` to that width. Encoder,
projection and UNet are trained together on the standard noise-prediction loss
``E_{t, eps} || eps - eps_theta(x_t, t, z) ||^2`` (mean over pixels), ``t`` uniform on the DDPM schedule.

Decoding runs DDIM from Gaussian noise conditioned on ``z``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..data.base import FactorDataset
from ..encoder import SAMIEncoder
from .common import AutoencoderMixin, TrainingBudget, resolve_dataset, sample_loop, train_loop


class DiffAE(AutoencoderMixin, ModelMixin, ConfigMixin):
    """Encoder + ``z``-conditioned ``UNet2DModel`` (module docstring).

    Args:
        in_channels: image channels.
        sample_size: image side.
        latent_dim: size of ``z``.
        encoder_channels: encoder ``block_out_channels`` (examples/compare.py passes the SAMI adapter's).
        encoder_stem_stride: encoder ``stem_stride`` (likewise).
        hidden_dim: encoder MLP width.
        norm_num_groups: encoder GroupNorm groups.
        unet_channels: UNet ``block_out_channels`` (one ``DownBlock2D``/``UpBlock2D`` each, no attention).
        layers_per_block: UNet ResNet blocks per level.
        unet_norm_num_groups: UNet GroupNorm groups.
        num_train_timesteps: diffusion steps of the DDPM schedule.
        beta_schedule: diffusers ``beta_schedule`` (``"linear"``: 1e-4 to 0.02, as the disks base model).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        sample_size: int = 16,
        latent_dim: int = 8,
        encoder_channels: Tuple[int, ...] = (32, 64, 64),
        hidden_dim: int = 256,
        norm_num_groups: int = 8,
        unet_channels: Tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        unet_norm_num_groups: int = 8,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        encoder_stem_stride: int = 2,
    ):
        super().__init__()
        self.encoder = SAMIEncoder(
            in_channels=in_channels, sample_size=sample_size, latent_dim=latent_dim, block_out_channels=tuple(encoder_channels),
            hidden_dim=hidden_dim, time_conditioning=False, norm_num_groups=norm_num_groups, stem_stride=encoder_stem_stride,
        )
        levels = len(unet_channels)
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=layers_per_block,
            block_out_channels=tuple(unet_channels), down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
            norm_num_groups=unet_norm_num_groups, class_embed_type="identity",
        )
        self.z_proj = nn.Linear(latent_dim, unet_channels[0] * 4)  # UNet2DModel's time-embedding width
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)

    @property
    def latent_dim(self) -> int:
        """Size of the code ``z``."""
        return self.config.latent_dim

    def code(self, images: torch.Tensor) -> torch.Tensor:
        """The deterministic code ``z`` (posterior mean of the encoder), with gradients."""
        return self.encoder(images, 0).mean

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``eps_theta(x_t, t, z)``."""
        return self.unet(noisy, timesteps, class_labels=self.z_proj(z)).sample

    def loss(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"loss": mean-over-pixels eps-MSE}`` for one draw of ``t`` and ``eps`` per image."""
        z = self.code(images)
        n = images.shape[0]
        t = torch.randint(0, self.config.num_train_timesteps, (n,), generator=generator).to(images.device)
        noise = randn_tensor(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        noisy = self.noise_scheduler.add_noise(images, noise, t)
        mse = F.mse_loss(self.denoise(noisy, t, z), noise)
        return {"loss": mse}

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        num_inference_steps: int = 50,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """DDIM sampling (``eta``: 0 deterministic, 1 stochastic) conditioned on codes (N, D); returns images (N, C, H, W) in [-1, 1]."""
        z = z.to(device=self.device, dtype=self.dtype)
        shape = (z.shape[0], self.config.in_channels, self.config.sample_size, self.config.sample_size)
        sample = latents.to(self.device, self.dtype) if latents is not None else randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config, clip_sample=False)
        sample = sample_loop(lambda x, t: self.denoise(x, t.expand(z.shape[0]), z), scheduler, sample, num_inference_steps, generator, eta)
        return sample.clamp(-1, 1)


def train_diffae(
    dataset: Union[str, FactorDataset],
    latent_dim: int = 8,
    resolution: Optional[int] = None,
    max_seconds: Optional[float] = None,
    max_steps: Optional[int] = None,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
    encoder_channels: Sequence[int] = (32, 64, 64),
    hidden_dim: int = 256,
    norm_num_groups: int = 8,
    unet_channels: Sequence[int] = (32, 64, 64),
    unet_norm_num_groups: int = 8,
    encoder_stem_stride: int = 2,
    device: Optional[Union[str, torch.device]] = None,
    log_every: int = 50,
) -> DiffAE:
    """Train a :class:`DiffAE` jointly (encoder, projection, UNet) until the step or wall-clock budget is spent.

    Args:
        dataset: a :class:`~sami_adapter.data.FactorDataset` or a dataset name (built at ``resolution``).
        latent_dim: size of ``z``.
        resolution: image side (default: the dataset's).
        max_seconds: wall-clock budget in seconds.
        max_steps: step budget (whichever ends first stops training).
        batch_size: images per step.
        lr: Adam learning rate (all parameters).
        seed: seed of initialisation, batches, timesteps and noise.
        progress: show a tqdm bar.
        encoder_channels, hidden_dim, norm_num_groups, encoder_stem_stride: encoder architecture (match the SAMI encoder's).
        unet_channels, unet_norm_num_groups: UNet architecture (default: the disks base model's widths).
        device: where to train (default: CPU).
        log_every: steps between entries of ``model.training_log["history"]``.

    Returns:
        The trained model in eval mode; ``model.training_log`` holds steps, seconds and loss history.
    """
    data = resolve_dataset(dataset, resolution, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffAE(
            in_channels=data.num_channels, sample_size=data.resolution, latent_dim=latent_dim, encoder_channels=tuple(encoder_channels),
            hidden_dim=hidden_dim, norm_num_groups=norm_num_groups, unet_channels=tuple(unet_channels),
            unet_norm_num_groups=unet_norm_num_groups, encoder_stem_stride=encoder_stem_stride,
        )
    model.to(device or "cpu")
    log = train_loop(
        model, lambda x, g: model.loss(x, generator=g), data, TrainingBudget(max_steps, max_seconds), batch_size, lr, seed,
        progress=progress, desc="DiffAE", log_every=log_every,
    )
    model.training_log = log.as_dict()
    return model
