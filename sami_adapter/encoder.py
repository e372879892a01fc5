"""The SAMI inference network ``q_phi(z | x_t, t)``: a small "half UNet" with a diagonal-Gaussian head."""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from torch import nn


# nats: a code dimension whose data-mean KL to the prior (:meth:`LatentPosterior.kl_per_dim`) is below this
# carries (almost) nothing. The one "active" rule of every report, table, warning and explorer page.
ACTIVE_KL_NATS = 0.1


# Traversal pictures move a coordinate over [-2.5, 2.5] prior standard deviations: where N(0, 1) has almost all its mass.
TRAVERSAL_RANGE = 2.5


class LatentPosterior(DiagonalGaussianDistribution):
    """Diagonal Gaussian over a flat code: ``parameters[..., :D]`` is the mean, ``[..., D:]`` the log-variance.

    Reuses diffusers' ``DiagonalGaussianDistribution`` (sampling with a generator, log-variance
    clamping) for codes of shape ``(..., D)`` instead of feature maps.
    """

    def __init__(self, parameters: torch.Tensor):
        # Not the parent's __init__: it chunks along dim 1 (feature maps), which breaks for a stack of
        # codes with one image (K, 1, 2D). A code is chunked along its last dim.
        if parameters.shape[-1] % 2:
            raise ValueError(f"parameters must hold mean and log-variance along the last dim (even size), got {tuple(parameters.shape)}.")
        self.parameters = parameters
        self.deterministic = False
        self.mean, logvar = torch.chunk(parameters, 2, dim=-1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @property
    def latent_dim(self) -> int:
        return self.mean.shape[-1]

    def kl_per_dim(self) -> torch.Tensor:
        """``KL(q(z_i | x) || N(0, 1))`` per sample and dimension, in nats: ``(mu^2 + var - 1 - logvar) / 2``."""
        return 0.5 * (self.mean**2 + self.var - 1.0 - self.logvar)

    def kl(self, other: Optional["LatentPosterior"] = None) -> torch.Tensor:
        """``KL(q(z | x) || N(0, I))`` per sample (summed over dimensions), in nats."""
        if other is not None:
            raise NotImplementedError("LatentPosterior.kl only supports the standard normal prior.")
        return self.kl_per_dim().sum(dim=-1)


class BiasFreeGroupNorm(nn.Module):
    """GroupNorm without mean subtraction or offset: ``gamma * x / rms_group(x)``.

    Mohan et al. (2020)'s bias-free normalisation: subtracting a mean or adding ``beta`` is an
    additive constant, and a bias-free network must map a zero input to zero.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        grouped = x.reshape(b, self.num_groups, -1)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return grouped.reshape(x.shape) * self.weight.view(1, c, *([1] * (x.ndim - 2)))


class BiasFreeResnetBlock(nn.Module):
    """``x + conv(act(norm(conv(act(norm(x))))))`` with no bias anywhere (a 1x1 projection when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = BiasFreeGroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = BiasFreeGroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        # SiLU keeps act(0) = 0 (no offset) and, unlike ReLU, a smooth input gradient: the guidance is one.
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        h = self.conv2(torch.nn.functional.silu(self.norm2(h)))
        return self.shortcut(x) + h


class SAMIEncoder(ModelMixin, ConfigMixin):
    r"""The inference network ``q_phi(z | x_t, t) = N(mu_phi(x_t, t), diag sigma_phi^2(x_t, t))``.

    Down blocks of diffusers ``ResnetBlock2D`` (conditioned on diffusers' sinusoidal timestep
    embedding), then a small MLP head that outputs mean and log-variance. The same network encodes
    clean images (``t = 0``) and noisy ones: SAMI's multiscale inference.

    The last layer is zero-initialised, so at the start every posterior is ``N(0, e^{init_logvar})``
    whatever the input: the guidance ``grad_x log q`` is exactly 0 and training starts from the
    unconditional model's loss instead of from random guidance (the known collapse path).

    Args:
        in_channels: channels of the UNet's input (pixels, or VAE latents for latent diffusion).
        sample_size: side of the UNet's input.
        latent_dim: size of the code ``z``.
        block_out_channels: widths of the down blocks; each block after the first halves the resolution.
        layers_per_block: ResNet blocks per down block.
        hidden_dim: width of the MLP head.
        time_conditioning: if False the encoder is blind to the noise level (ablation).
        init_logvar: initial log-variance of every posterior.
        min_logvar: optional soft floor on the log-variance (``min + softplus(raw - min)``). Bounds how
            sharp q can get, and with it the size of the guidance ``grad log q`` near the data, which
            otherwise makes the guided sampling ODE stiff (artifacts at few sampling steps).
        norm_num_groups: GroupNorm groups (GroupNorm keeps samples independent, which the score needs).
        stem_stride: stride of the input convolution. 2 (the default) runs no ResNet block at full
            resolution: guided sampling pays the encoder's forward and backward at every step, and at
            small UNets the full-resolution block was most of that cost. A 3x3 stride-2 stem still sees
            every pixel, so no input information is lost.
        guidance_bands: optional noise bands, one upper timestep per dimension: dimension ``i`` guides
            (enters ``grad_x log q``) only where ``t < guidance_bands[i]``, in training and sampling
            alike. Nested bands (:func:`nested_guidance_bands`) give each dimension its own range of
            noise levels, so it can only carry what the image still holds there.
        bias_free: the SAMI paper's encoder: no additive constant before the head (convolutions and
            linear layers without bias, :class:`BiasFreeGroupNorm` without mean or offset, Mohan et
            al. 2020) and a middle block after the down blocks. A zero image then has exactly zero
            features, so the encoder has no offset to lean on: its confidence can only come from a
            feature it still sees, and falls where that feature drowns in noise. Needs
            ``time_conditioning=False`` (a timestep embedding is an additive constant). The head keeps
            its bias: it sets the initial log-variance.
    """

    # enable_gradient_checkpointing() recomputes each down block's activations in the backward pass
    # (diffusers' default, non-reentrant torch checkpointing, which also supports SAMI's double backward).
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        sample_size: int = 16,
        latent_dim: int = 8,
        block_out_channels: Tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        hidden_dim: int = 256,
        time_conditioning: bool = True,
        init_logvar: float = -1.0,
        norm_num_groups: int = 8,
        min_logvar: Optional[float] = None,
        stem_stride: int = 2,
        guidance_bands: Optional[Tuple[float, ...]] = None,
        bias_free: bool = False,
    ):
        super().__init__()
        if bias_free and time_conditioning:
            raise ValueError("bias_free=True needs time_conditioning=False: a timestep embedding adds a constant to the features. "
                             "Use the noise-blind encoder (time_conditioning=False; finetune.py --encoder_type paper) with bias_free.")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}.")
        if guidance_bands is not None:
            if len(guidance_bands) != latent_dim or any(not (float(b) > 0) for b in guidance_bands):
                raise ValueError(f"guidance_bands needs one positive upper timestep per latent dimension ({latent_dim}), "
                                 f"got {list(guidance_bands)}.")
            self.register_buffer("_bands", torch.tensor([float(b) for b in guidance_bands]), persistent=False)
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}.")
        temb_dim = block_out_channels[0] * 4 if time_conditioning else None
        if time_conditioning:
            self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embedding = TimestepEmbedding(block_out_channels[0], temb_dim)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=stem_stride, padding=1, bias=not bias_free)
        blocks = []
        channels = block_out_channels[0]
        for i, width in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                if bias_free:
                    blocks.append(BiasFreeResnetBlock(channels, width, norm_num_groups))
                else:
                    blocks.append(ResnetBlock2D(in_channels=channels, out_channels=width, temb_channels=temb_dim, groups=norm_num_groups))
                channels = width
            if i < len(block_out_channels) - 1:
                if bias_free:
                    blocks.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False))
                else:
                    blocks.append(Downsample2D(channels, use_conv=True, out_channels=channels, padding=1, name="op"))
        if bias_free:  # the paper's "half UNet" ends in the UNet's middle block
            blocks.append(BiasFreeResnetBlock(channels, channels, norm_num_groups))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = BiasFreeGroupNorm(norm_num_groups, channels) if bias_free else nn.GroupNorm(norm_num_groups, channels)
        side = max(sample_size // stem_stride // 2 ** (len(block_out_channels) - 1), 1)
        self.pool = nn.AdaptiveAvgPool2d(min(side, 4))
        self.proj = nn.Linear(channels * min(side, 4) ** 2, hidden_dim, bias=not bias_free)
        self.time_to_hidden = nn.Linear(temb_dim, hidden_dim) if time_conditioning else None
        self.head = nn.Linear(hidden_dim, 2 * latent_dim)
        self.gradient_checkpointing = False
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.zero_()
            raw = init_logvar
            if min_logvar is not None:
                if init_logvar <= min_logvar:
                    raise ValueError(f"init_logvar ({init_logvar}) must be above min_logvar ({min_logvar}).")
                raw = min_logvar + math.log(math.expm1(init_logvar - min_logvar))  # inverse of the soft floor
            self.head.bias[latent_dim:] = raw

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def guidance_weights(self, timestep: Union[torch.Tensor, float, int], batch_size: int) -> Optional[torch.Tensor]:
        """(B, D) 0/1 weights of each dimension in the guidance at ``timestep`` (``guidance_bands``), or
        None when every dimension guides at every noise level."""
        if self.config.guidance_bands is None:
            return None
        t = torch.as_tensor(timestep, device=self._bands.device, dtype=torch.float32).reshape(-1, 1)
        return (t < self._bands).float().expand(batch_size, -1)

    def features(self, sample: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The (B, hidden_dim) features the head reads (before its activation). With ``bias_free`` a
        zero image gives exactly zero features."""
        h = self.conv_in(sample)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            inputs = (h, temb) if isinstance(block, (ResnetBlock2D, BiasFreeResnetBlock)) else (h,)
            h = self._gradient_checkpointing_func(block, *inputs) if checkpointed else block(*inputs)
        h = torch.nn.functional.silu(self.norm_out(h))
        h = self.proj(self._pool(h).flatten(1))
        if temb is not None:
            h = h + self.time_to_hidden(temb)
        return h

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        # The same average as self.pool: AdaptiveAvgPool2d's CPU backward is slow, and the guidance
        # differentiates through this every sampling step. Identity when the map already has the
        # output size; a plain average pool when the sizes divide.
        out = self.pool.output_size
        height, width = h.shape[-2:]
        if (height, width) == (out, out):
            return h
        if height % out == 0 and width % out == 0:
            return torch.nn.functional.avg_pool2d(h, (height // out, width // out))
        return self.pool(h)

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int] = 0) -> LatentPosterior:
        """Posterior ``q(z | sample, timestep)``.

        Args:
            sample: (B, in_channels, sample_size, sample_size) UNet input ``x_t`` (``x_0`` at ``t = 0``).
            timestep: scalar or (B,) diffusion timesteps in the UNet's units (0 = clean).

        Returns:
            :class:`LatentPosterior` with ``.mean``/``.logvar`` of shape (B, latent_dim).
        """
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"SAMIEncoder expects input of shape (B, {self.config.in_channels}, H, W), got {tuple(sample.shape)}."
            )
        temb = None
        if self.config.time_conditioning:
            t = torch.as_tensor(timestep, device=sample.device)
            if t.ndim == 0:
                t = t.expand(sample.shape[0])
            temb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        params = self.head(torch.nn.functional.silu(self.features(sample, temb)))
        if self.config.min_logvar is not None:
            mean, logvar = params.chunk(2, dim=-1)
            floor = self.config.min_logvar
            params = torch.cat([mean, floor + torch.nn.functional.softplus(logvar - floor)], dim=-1)
        return LatentPosterior(params)


def check_encoder_fits_unet(encoder: Any, unet: Any) -> None:
    """Raise a ValueError when the encoder was built for a UNet of another input shape."""
    if encoder is None or unet is None:
        return
    enc, net = encoder.config, unet.config
    unet_size = net.sample_size if isinstance(net.sample_size, int) else tuple(net.sample_size)[0]
    if enc.in_channels != net.in_channels or enc.sample_size != unet_size:
        raise ValueError(
            f"This encoder was built for inputs with {enc.in_channels} channel(s) at {enc.sample_size}px, but the UNet takes "
            f"{net.in_channels} channel(s) at {unet_size}px: the encoder was saved for another UNet. Load the adapter "
            "that was trained for this base model, or train one with examples/finetune.py."
        )


def nested_guidance_bands(latent_dim: int, num_train_timesteps: int = 1000):
    """Nested noise bands for :class:`SAMIEncoder`'s ``guidance_bands``: dimension ``i`` guides below
    ``T (D - i) / D``, so dimension 0 acts at every noise level and the last one only in the lowest
    ``T / D`` timesteps."""
    return tuple(float(num_train_timesteps * (latent_dim - i) / latent_dim) for i in range(latent_dim))
