"""β-VAE baseline (Higgins et al. 2017) with SAMI's encoder architecture.

Encoder: a :class:`~sami_adapter.SAMIEncoder` with ``time_conditioning=False``, always called at
``t = 0`` on clean images, so the inference network is the same architecture SAMI uses.
Decoder: :class:`ConvDecoder`, an MLP to a small feature map followed by transposed convolutions.

Likelihood (``likelihood``):

* ``"bernoulli"`` (default, as disentanglement_lib's β-VAE): pixels are mapped to intensities
  ``p = (x + 1) / 2`` in [0, 1] and ``-log p(x | z) = sum_pixels BCE(logits, p)``; the decoded image
  is ``2 sigmoid(logits) - 1``. With grey (non-binary) targets this is the usual continuous
  Bernoulli-cross-entropy surrogate, not a normalised density.
* ``"gaussian"``: ``-log N(x; mu(z), gaussian_std^2 I)`` on pixels in [-1, 1], in nats.

The loss per image is ``-log p(x | z) + beta * KL(q(z | x) || N(0, I))`` (one reparameterised sample of z),
plus the terms of a :class:`~sami_adapter.rate.RateControl` when one is given: with a capacity target on
the KL it is the capacity-controlled β-VAE (Burgess et al. 2018), with a TC weight the β-TCVAE
(Chen et al. 2018, minibatch estimator) or FactorVAE (Kim & Mnih 2018, discriminator). These are the
same terms SAMI's ``sami_loss`` takes, so every model can be trained at a matched rate.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..data.base import FactorDataset
from ..encoder import LatentPosterior, SAMIEncoder
from ..rate import RateControl, TCDiscriminator, discriminator_step, rate_terms
from .common import AutoencoderMixin, TrainingBudget, resolve_dataset, train_loop


class ConvDecoder(ModelMixin, ConfigMixin):
    """``z -> image``: Linear layers to a ``(C_0, s, s)`` map, then one stride-2 transposed convolution per
    further width in ``block_out_channels`` (each doubles the side), then a 3x3 convolution to ``out_channels``.

    Args:
        latent_dim: size of ``z``.
        out_channels: image channels.
        sample_size: image side; ``s = sample_size / 2^(len(block_out_channels) - 1)``.
        block_out_channels: widths from the smallest map to the largest.
        hidden_dim: width of the first Linear layer.
        norm_num_groups: GroupNorm groups.
    """

    @register_to_config
    def __init__(
        self,
        latent_dim: int = 8,
        out_channels: int = 1,
        sample_size: int = 16,
        block_out_channels: Tuple[int, ...] = (64, 64, 32),
        hidden_dim: int = 256,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        ups = len(block_out_channels) - 1
        self.side = max(sample_size // 2**ups, 1)
        c0 = block_out_channels[0]
        self.fc = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, c0 * self.side**2), nn.SiLU())
        layers = []
        channels = c0
        for width in block_out_channels[1:]:
            layers += [nn.ConvTranspose2d(channels, width, kernel_size=4, stride=2, padding=1), nn.GroupNorm(norm_num_groups, width), nn.SiLU()]
            channels = width
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(norm_num_groups, channels), nn.SiLU()]
        self.blocks = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, out_channels, sample_size, sample_size) decoder output (logits or means)."""
        h = self.fc(z).view(z.shape[0], self.config.block_out_channels[0], self.side, self.side)
        out = self.conv_out(self.blocks(h))
        size = self.config.sample_size
        if out.shape[-1] != size:
            out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
        return out


class BetaVAE(AutoencoderMixin, ModelMixin, ConfigMixin):
    """β-VAE with a noise-blind SAMI encoder and a :class:`ConvDecoder` (module docstring).

    ``save_pretrained`` / ``from_pretrained`` work as for any diffusers model.

    Args:
        in_channels: image channels.
        sample_size: image side.
        latent_dim: size of ``z``.
        encoder_channels: ``block_out_channels`` of the encoder (examples/compare.py passes the SAMI adapter's).
        encoder_stem_stride: ``stem_stride`` of the encoder (likewise).
        hidden_dim: MLP width of encoder head and decoder.
        layers_per_block: ResNet blocks per encoder down block.
        norm_num_groups: GroupNorm groups of both networks.
        decoder_channels: decoder widths, smallest map first (default: ``encoder_channels`` reversed).
        likelihood: ``"bernoulli"`` or ``"gaussian"``.
        gaussian_std: pixel standard deviation of the Gaussian likelihood (pixels in [-1, 1]).
        encoder_bias_free: the SAMI paper's bias-free encoder (:class:`~sami_adapter.SAMIEncoder`'s ``bias_free``),
            so a baseline can share the paper encoder's architecture.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        sample_size: int = 16,
        latent_dim: int = 8,
        encoder_channels: Tuple[int, ...] = (32, 64, 64),
        hidden_dim: int = 256,
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        decoder_channels: Optional[Tuple[int, ...]] = None,
        likelihood: str = "bernoulli",
        gaussian_std: float = 0.1,
        encoder_stem_stride: int = 2,
        encoder_bias_free: bool = False,
    ):
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}.")
        self.encoder = SAMIEncoder(
            in_channels=in_channels, sample_size=sample_size, latent_dim=latent_dim, block_out_channels=tuple(encoder_channels),
            layers_per_block=layers_per_block, hidden_dim=hidden_dim, time_conditioning=False, init_logvar=0.0,
            norm_num_groups=norm_num_groups, stem_stride=encoder_stem_stride, bias_free=encoder_bias_free,
        )
        self.decoder = ConvDecoder(
            latent_dim=latent_dim, out_channels=in_channels, sample_size=sample_size,
            block_out_channels=tuple(decoder_channels or tuple(reversed(tuple(encoder_channels)))), hidden_dim=hidden_dim,
            norm_num_groups=norm_num_groups,
        )

    @property
    def latent_dim(self) -> int:
        """Size of the code ``z``."""
        return self.config.latent_dim

    def posterior(self, images: torch.Tensor) -> LatentPosterior:
        """``q(z | x)`` with gradients (training)."""
        return self.encoder(images, 0)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        """Raw decoder output: logits (Bernoulli) or means (Gaussian)."""
        return self.decoder(z)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, generator: Optional[torch.Generator] = None, num_inference_steps: int = 50, eta: float = 0.0) -> torch.Tensor:
        """Images in [-1, 1] from codes (N, D): the mean of ``p(x | z)`` mapped to pixels (deterministic: the
        sampling arguments of :class:`~sami_adapter.baselines.common.AutoencoderMixin` change nothing)."""
        out = self.decoder(z.to(device=self.device, dtype=self.dtype))
        return (2 * torch.sigmoid(out) - 1) if self.config.likelihood == "bernoulli" else out.clamp(-1, 1)

    def negative_log_likelihood(self, images: torch.Tensor, decoder_output: torch.Tensor) -> torch.Tensor:
        """Per-image ``-log p(x | z)`` in nats (summed over pixels), for the configured likelihood."""
        if self.config.likelihood == "bernoulli":
            target = ((images + 1) / 2).clamp(0, 1)
            return F.binary_cross_entropy_with_logits(decoder_output, target, reduction="none").flatten(1).sum(1)
        std = self.config.gaussian_std
        sq = ((images - decoder_output) ** 2).flatten(1)
        return (sq / (2 * std**2) + 0.5 * math.log(2 * math.pi * std**2)).sum(1)

    def loss(self, images: torch.Tensor, beta: float = 1.0, generator: Optional[torch.Generator] = None,
             rate: Optional[RateControl] = None, step: int = 0,
             discriminator: Optional[TCDiscriminator] = None) -> Dict[str, torch.Tensor]:
        """Batch means of ``loss = -log p(x | z) + beta KL (+ rate terms)``, ``reconstruction``, ``kl`` (nats
        per image), ``z`` (the codes drawn, detached) and the rate measurements when ``rate`` is given;
        ``step`` is the optimiser step of ``rate``'s capacity schedule."""
        post = self.posterior(images)
        z = post.sample(generator=generator)
        nll = self.negative_log_likelihood(images, self.decoder_output(z)).mean()
        kl = post.kl().mean()
        out = {"loss": nll + beta * kl, "reconstruction": nll, "kl": kl}
        if rate is not None:
            terms = rate_terms(rate, post.mean, post.logvar, z, kl, step=step, discriminator=discriminator)
            out["loss"] = out["loss"] + terms.pop("loss")
            out.update({k: v for k, v in terms.items() if v.ndim == 0})
        out["z"], out["mean"] = z.detach(), post.mean.detach()
        return out


def train_beta_vae(
    dataset: Union[str, FactorDataset],
    beta: float = 1.0,
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
    likelihood: str = "bernoulli",
    encoder_stem_stride: int = 2,
    device: Optional[Union[str, torch.device]] = None,
    log_every: int = 50,
    rate: Optional[RateControl] = None,
    encoder_bias_free: bool = False,
) -> BetaVAE:
    """Train a :class:`BetaVAE` on fresh samples of ``dataset`` until the step or wall-clock budget is spent.

    Args:
        dataset: a :class:`~sami_adapter.data.FactorDataset` (its ``sample`` draws each batch) or a
            dataset name (built at ``resolution``).
        beta: KL weight (1 = the VAE bound).
        latent_dim: size of ``z``.
        resolution: image side (default: the dataset's).
        max_seconds: wall-clock budget in seconds.
        max_steps: step budget (whichever budget ends first stops training).
        batch_size: images per step.
        lr: Adam learning rate.
        seed: seed of initialisation, batches and noise.
        progress: show a tqdm bar.
        encoder_channels, hidden_dim, norm_num_groups, encoder_stem_stride: encoder (and decoder)
            architecture; match the SAMI encoder's config for a same-architecture comparison.
        likelihood: ``"bernoulli"`` or ``"gaussian"`` (module docstring).
        device: where to train (default: CPU).
        log_every: steps between entries of ``model.training_log["history"]``.
        rate: optional :class:`~sami_adapter.rate.RateControl` (capacity-controlled β-VAE, β-TCVAE,
            FactorVAE), its capacity schedule included; a discriminator, when it needs one, takes one
            :func:`~sami_adapter.rate.discriminator_step` after each model step, on that step's codes.
        encoder_bias_free: use the SAMI paper's bias-free encoder.

    Returns:
        The trained model in eval mode; ``model.training_log`` holds steps, seconds and loss history.
    """
    data = resolve_dataset(dataset, resolution, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BetaVAE(
            in_channels=data.num_channels, sample_size=data.resolution, latent_dim=latent_dim, encoder_channels=tuple(encoder_channels),
            hidden_dim=hidden_dim, norm_num_groups=norm_num_groups, likelihood=likelihood, encoder_stem_stride=encoder_stem_stride,
            encoder_bias_free=encoder_bias_free,
        )
    model.to(device or "cpu")
    discriminator = disc_optimizer = None
    if rate is not None and rate.needs_discriminator:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            discriminator = TCDiscriminator(latent_dim=latent_dim).to(device or "cpu")
        disc_optimizer = discriminator.make_optimizer()
    state = {"step": 0}

    def step_loss(images, g):
        terms = model.loss(images, beta=beta, generator=g, rate=rate, step=state["step"], discriminator=discriminator)
        state["step"] += 1
        state["codes"] = terms.pop("mean") if rate is not None and rate.tc_on == "mean" else terms["z"]
        terms.pop("z", None), terms.pop("mean", None)
        return terms

    def after_step(g):
        if discriminator is not None:
            discriminator_step(discriminator, disc_optimizer, state["codes"], g)

    log = train_loop(
        model, step_loss, data, TrainingBudget(max_steps, max_seconds),
        batch_size, lr, seed, progress=progress, desc=f"beta-VAE (beta={beta:g})", log_every=log_every, after_step=after_step,
    )
    model.training_log = {**log.as_dict(), "beta": beta, "likelihood": likelihood,
                          "rate": None if rate is None else dict(vars(rate))}
    return model
