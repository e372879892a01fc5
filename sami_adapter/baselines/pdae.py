"""PDAE baseline (Zhang, Zhao & Lin, "Unsupervised Representation Learning from Pre-trained Diffusion
Probabilistic Models", NeurIPS 2022): a frozen pretrained diffusion model, an encoder ``E(x_0) -> z`` and
a gradient estimator ``G(x_t, t, z)`` that fills the gap between the model's posterior mean and the true one.

Notation as in :mod:`sami_adapter.guidance`: ``x_t = a_t x_0 + s_t eps`` with ``a_t = sqrt(abar_t)``,
``s_t = sqrt(1 - abar_t)``; the one-step ``alpha_t = 1 - beta_t = abar_t / abar_{t-1}``, with
``abar_{-1} = 1`` (so ``s_{-1} = 0``); ``SNR_t = a_t^2 / s_t^2``; ``T`` training timesteps.

**The shifted mean.** PDAE starts from classifier guidance (Dhariwal & Nichol 2021): the reverse step
conditioned on ``z`` is ``N(mu_theta(x_t, t) + Sigma_t grad_{x_t} log p(z | x_t), Sigma_t)`` with DDPM's
posterior variance ``Sigma_t = beta_t s_{t-1}^2 / s_t^2``. The gradient is unknown, so PDAE learns it:
``G(x_t, t, E(x_0))`` replaces ``grad log p(z | x_t)`` (the paper's method section, the "posterior mean
gap"). With ``mu_theta = (x_t - (beta_t / s_t) eps_theta) / sqrt(alpha_t)``, adding ``Sigma_t G`` to the
mean is the same as shifting the noise prediction::

    eps_hat = eps_theta(x_t, t) + c_t G(x_t, t, z),                                        (P1)
    c_t = -sqrt(alpha_t) s_t Sigma_t / beta_t = -sqrt(alpha_t) s_{t-1}^2 / s_t,   c_0 = 0   (P2)

(the paper's ``-sqrt(alpha_t) sqrt(1 - abar_t) / beta_t * Sigma_t``; ``shift_coef`` in its code).

**The loss** trains E and G only (the base is frozen), ``t`` uniform on ``{0, ..., T-1}``::

    L = E_{x_0, t, eps} [ w_t * mean_pixels (eps - eps_hat)^2 ],                            (P3)
    w_t = SNR_t^gamma / (1 + SNR_t) = s_t^2 SNR_t^gamma,   gamma = 0.1                      (P4)

(the paper's weighting scheme ``lambda_t = (1 / (1 + SNR_t))^(1 - gamma) (SNR_t / (1 + SNR_t))^gamma``,
which down-weights the low-noise steps where ``x_t`` already shows ``x_0``; ``weight`` in its code). A
base that predicts ``v`` or ``x_0`` has its output converted to ``eps_theta`` first
(:func:`~sami_adapter.guidance.to_epsilon`).

**Decoding.** PDAE's DDIM sampler shifts the noise by ``-s_t G`` (classifier guidance in DDIM form),
which is equation (3) of :mod:`sami_adapter.guidance` with ``G`` in place of the posterior score ``g``;
so each step here is :func:`~sami_adapter.guidance.apply_guidance` ``(base output, G, scheduler, t, x_t)``,
which also converts the shift for ``v``/``x_0``-prediction bases and for sigma-parameterised schedulers.
The trained correction is ``c_t G`` and the DDIM shift ``-s_t G = r_t c_t G`` with
``r_t = s_t^2 / (sqrt(alpha_t) s_{t-1}^2) = 1 + O(beta_t / s_{t-1}^2)``; on the linear schedule
(1e-4 to 0.02, T = 1000) it is 1.04 at ``t = 50``, 1.02 at ``t = 100``, at most 1.01 from ``t = 200`` on,
and 2.2 at ``t = 1``: PDAE's own choice, kept. PDAE's DDPM sampler (the
``Sigma_t`` mean of (P1) at all ``T`` steps) is not used: ``decode`` runs DDIM at any ``eta`` (1 is DDIM's
stochastic variant), by default on the base's schedule with ``clip_sample=False``, as SAMI's pipeline
samples the same base. Per step it costs one base forward and one forward of G's decoder half, both
without autograd.

**The gradient estimator.** PDAE's G shares the frozen UNet's timestep embedding and encoder half and
adds a trainable copy of the middle and decoder half, whose residual blocks are modulated by ``z``, with
a zero-initialised output layer. Here, for any diffusers ``UNet2DModel`` base: G is the mid block, the up
blocks and the output head that ``UNet2DModel`` builds from the base's own config, with
``resnet_time_scale_shift="scale_shift"`` (adaptive GroupNorm ``GN(h)(1 + scale) + shift``), fed the base's
skip features and the embedding ``emb_t + W z`` (the base's time embedding shifted by a learned
projection of ``z``, so ``z`` modulates every block's normalisation, PDAE's separate ``z`` affine folded
into one), freshly initialised (PDAE's shifted blocks are not in the pretrained checkpoint either) and
with ``conv_out`` zero-initialised: at the start ``G = 0`` and the loss is the base's own. The base's
features are read with forward hooks during its ordinary forward, so nothing of the base runs twice.
On the 16 px disks/digits base (1,062,497 parameters) G has 883,105 parameters (0.83 of the base;
the noise-blind encoder has 266,992 at widths 32, 64, 64 and 352,560 at SAMI's default 32, 64).

**The encoder** is SAMI's architecture (:class:`~sami_adapter.SAMIEncoder`, noise-blind, called on clean
images at ``t = 0``), its posterior mean the deterministic code ``z`` (as PDAE's ``E``; no KL term).

**Generation** draws ``z ~ N(0, I)``, as every baseline here does. PDAE itself samples ``z`` from a
latent diffusion model trained on the encoder's codes (not built here), so prior samples of this
baseline are not PDAE's unconditional samples. ``reconstruct`` decodes the code from fresh noise, as
for the other baselines (PDAE's autoencoding figures first invert ``x_0`` to ``x_T`` by the shifted DDIM).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..data.base import FactorDataset
from ..encoder import SAMIEncoder
from ..guidance import add_noise, alpha_sigma_from_alphas_cumprod, apply_guidance, check_scheduler, to_epsilon
from .common import AutoencoderMixin, TrainingBudget, resolve_dataset, sample_loop, train_loop

SNR_GAMMA = 0.1  # PDAE's weighting exponent gamma of (P4)


def shift_and_weight(betas: torch.Tensor, snr_gamma: float = SNR_GAMMA) -> Tuple[torch.Tensor, torch.Tensor]:
    """PDAE's per-timestep shift coefficient ``c_t`` (P2) and loss weight ``w_t`` (P4), each (T,) float64.

    Computed from the betas in float64, as PDAE does: ``1 - abar_t`` of a float32 ``alphas_cumprod``
    loses about three digits at the smallest ``t``.

    Args:
        betas: the DDPM schedule's ``beta_t`` (T,).
        snr_gamma: the exponent ``gamma`` of ``w_t = SNR_t^gamma / (1 + SNR_t)``.
    """
    alpha = 1 - betas.double()
    abar = torch.cumprod(alpha, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    shift = -alpha.sqrt() * (1 - abar_prev) / (1 - abar).sqrt()  # (P2)
    snr = abar / (1 - abar)
    return shift, snr**snr_gamma / (1 + snr)  # (P4)


class BaseFeatures(NamedTuple):
    """What a ``UNet2DModel`` forward leaves for the decoder half: the time embedding, the hidden state after
    the down path and the skip features (``conv_in``'s output, then each down block's)."""

    emb: torch.Tensor
    hidden: torch.Tensor
    skips: Tuple[torch.Tensor, ...]


@contextmanager
def captured_features(unet: UNet2DModel) -> Iterator[Dict[str, Any]]:
    """Forward hooks on ``unet`` for the duration of the block: after a forward, the dict holds its
    :class:`BaseFeatures` parts (``emb``, ``hidden``, ``skips``) of that call."""
    store: Dict[str, Any] = {"skips": []}

    def down_hook(module, inputs, output):
        store["hidden"] = output[0]
        store["skips"].extend(output[1])

    hooks = [
        unet.time_embedding.register_forward_hook(lambda m, i, out: store.update(emb=out, skips=[])),
        unet.conv_in.register_forward_hook(lambda m, i, out: store["skips"].append(out)),
    ] + [block.register_forward_hook(down_hook) for block in unet.down_blocks]
    try:
        yield store
    finally:
        for hook in hooks:
            hook.remove()


def base_forward(unet: UNet2DModel, sample: torch.Tensor, timestep: Any) -> Tuple[torch.Tensor, BaseFeatures]:
    """The base's own output at ``(sample, timestep)`` and the features its down path computed on the way."""
    with captured_features(unet) as store:
        out = unet(sample, timestep).sample
    return out, BaseFeatures(store["emb"], store["hidden"], tuple(store["skips"]))


def check_base_config(config: Mapping[str, Any]) -> None:
    """Raise a ValueError for a base that G cannot sit on: G is built from a plain ``UNet2DModel``'s decoder half."""
    if "cross_attention_dim" in config or config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError("The PDAE baseline takes a pixel-space diffusers UNet2DModel as its base; got a "
                         f"{config.get('_class_name', 'UNet2DConditionModel')}.")
    skip = [b for b in list(config.get("down_block_types", ())) + list(config.get("up_block_types", ())) if b.startswith("Skip")]
    if skip:
        raise ValueError(f"The PDAE baseline cannot share the skip-path blocks {skip} of this base; use a base with Down/Up blocks "
                         "(DownBlock2D, AttnDownBlock2D, ...).")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise ValueError("The PDAE baseline takes an unconditional base; this UNet2DModel has a class embedding.")


class GradientEstimator(nn.Module):
    """``G(x_t, t, z)`` from the base's features: a z-modulated decoder half of the base's architecture
    (module docstring).

    Args:
        base_config: the base ``UNet2DModel``'s config.
        latent_dim: size of ``z``.
    """

    def __init__(self, base_config: Mapping[str, Any], latent_dim: int):
        super().__init__()
        check_base_config(base_config)
        config = {k: v for k, v in base_config.items() if not k.startswith("_")}
        groups = config.get("attn_norm_num_groups") or config.get("norm_num_groups", 32)  # keep the attention's GroupNorm under scale_shift
        config.update(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=groups)
        unet = UNet2DModel.from_config(config)
        self.mid_block, self.up_blocks = unet.mid_block, unet.up_blocks
        self.conv_norm_out, self.conv_act, self.conv_out = unet.conv_norm_out, unet.conv_act, unet.conv_out
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.z_proj = nn.Linear(latent_dim, unet.time_embedding.linear_2.out_features)

    def forward(self, features: BaseFeatures, z: torch.Tensor) -> torch.Tensor:
        """G at the base's features of ``x_t`` and the codes ``z`` (N, D): a tensor shaped like ``x_t``."""
        emb = features.emb + self.z_proj(z.to(features.emb.dtype))
        h, skips = features.hidden, features.skips
        if self.mid_block is not None:
            h = self.mid_block(h, emb)
        for block in self.up_blocks:  # each up block takes as many skips as it has resnets, deepest first
            n = len(block.resnets)
            h, skips = block(h, skips[-n:], emb), skips[:-n]
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class PDAE(AutoencoderMixin, ModelMixin, ConfigMixin):
    """Frozen base ``UNet2DModel`` + SAMI's encoder + :class:`GradientEstimator` (module docstring).

    ``save_pretrained`` writes every weight, the base's included (one safetensors file), so a saved model
    loads with ``PDAE.from_pretrained`` alone; ``base_model`` records where the base came from.

    Args:
        base_unet_config: the base ``UNet2DModel``'s config (its architecture; the weights are in the state dict).
        scheduler_config: the base's scheduler config (its noise schedule and ``prediction_type``).
        in_channels: image channels (the base's).
        sample_size: image side (the base's).
        latent_dim: size of ``z``.
        encoder_channels: encoder ``block_out_channels`` (examples/compare.py passes the SAMI adapter's).
        hidden_dim: encoder MLP width.
        norm_num_groups: encoder GroupNorm groups.
        encoder_stem_stride: encoder ``stem_stride``.
        snr_gamma: the exponent ``gamma`` of the loss weight (P4).
        base_model: where the base came from (a path or Hub id), for the record.
    """

    @register_to_config
    def __init__(
        self,
        base_unet_config: Dict[str, Any],
        scheduler_config: Dict[str, Any],
        in_channels: int = 1,
        sample_size: int = 16,
        latent_dim: int = 8,
        encoder_channels: Tuple[int, ...] = (32, 64, 64),
        hidden_dim: int = 256,
        norm_num_groups: int = 8,
        encoder_stem_stride: int = 2,
        snr_gamma: float = SNR_GAMMA,
        base_model: Optional[str] = None,
    ):
        super().__init__()
        check_base_config(base_unet_config)
        base = {k: v for k, v in base_unet_config.items() if not k.startswith("_")}
        got = (base.get("in_channels", 3), base.get("sample_size"))
        if got != (in_channels, sample_size):
            raise ValueError(f"in_channels {in_channels} and sample_size {sample_size} must be the base UNet's ({got[0]}, {got[1]}).")
        self.unet = UNet2DModel.from_config(base)
        self.unet.requires_grad_(False)
        self.encoder = SAMIEncoder(
            in_channels=in_channels, sample_size=sample_size, latent_dim=latent_dim, block_out_channels=tuple(encoder_channels),
            hidden_dim=hidden_dim, time_conditioning=False, norm_num_groups=norm_num_groups, stem_stride=encoder_stem_stride,
        )
        self.estimator = GradientEstimator(base, latent_dim)
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        shift, weight = shift_and_weight(self.noise_scheduler.betas, snr_gamma)
        self.register_buffer("shift", shift.float(), persistent=False)
        self.register_buffer("weight", weight.float(), persistent=False)

    @classmethod
    def from_base(cls, unet: UNet2DModel, scheduler: Any, base_model: Optional[str] = None, **kwargs) -> "PDAE":
        """A PDAE on a copy of ``unet``'s weights (the caller's UNet is not changed) and the schedule of
        ``scheduler`` (a scheduler or its config); ``kwargs`` are the encoder's and ``snr_gamma``."""
        if not isinstance(unet, UNet2DModel):
            raise TypeError(f"The PDAE baseline takes a pixel-space diffusers UNet2DModel as its base; got a {type(unet).__name__}.")
        scheduler_config = dict(getattr(scheduler, "config", scheduler))
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        model = cls(config, scheduler_config, in_channels=unet.config.in_channels, sample_size=unet.config.sample_size,
                    base_model=base_model, **kwargs)
        model.unet.load_state_dict(unet.state_dict())
        return model.to(device=unet.device)

    @property
    def latent_dim(self) -> int:
        """Size of the code ``z``."""
        return self.config.latent_dim

    def train(self, mode: bool = True) -> "PDAE":
        """As ``nn.Module.train``, except that the frozen base stays in eval mode (no dropout in ``eps_theta``)."""
        super().train(mode)
        self.unet.eval()
        return self

    def code(self, images: torch.Tensor) -> torch.Tensor:
        """The deterministic code ``z = E(x_0)`` (posterior mean of the encoder at ``t = 0``), with gradients."""
        return self.encoder(images, 0).mean

    def estimate(self, sample: torch.Tensor, timesteps: Any, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(base output, G(x_t, t, z))`` at ``sample = x_t``: the frozen base without autograd, G with it."""
        with torch.no_grad():
            out, features = base_forward(self.unet, sample, timesteps)
        return out, self.estimator(features, z)

    def guided_noise(self, sample: torch.Tensor, timesteps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(P1): ``eps_hat = eps_theta(x_t, t) + c_t G(x_t, t, z)`` at integer timesteps (N,), with gradients for E and G."""
        out, g = self.estimate(sample, timesteps, z)
        alpha, sigma = alpha_sigma_from_alphas_cumprod(self.noise_scheduler.alphas_cumprod, timesteps)
        eps = to_epsilon(out, sample, alpha, sigma, self.noise_scheduler.config.prediction_type)
        return eps + self.shift[timesteps].view(-1, *([1] * (sample.ndim - 1))).to(g.dtype) * g

    def loss(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"loss": (P3), "mse": mean (eps - eps_hat)^2}`` for one draw of ``t`` and ``eps`` per image (pixels in [-1, 1])."""
        z = self.code(images)
        n = images.shape[0]
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator).to(images.device)
        noise = randn_tensor(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        alpha, sigma = alpha_sigma_from_alphas_cumprod(self.noise_scheduler.alphas_cumprod, t)
        err = (noise - self.guided_noise(add_noise(images, noise, alpha, sigma), t, z)) ** 2
        weighted = self.weight[t].view(-1, *([1] * (images.ndim - 1))).to(err.dtype) * err
        return {"loss": weighted.mean(), "mse": err.detach().mean()}

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        num_inference_steps: int = 50,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        scheduler: Any = None,
    ) -> torch.Tensor:
        """Sampling conditioned on codes (N, D) with PDAE's DDIM shift ``-s_t G`` (module docstring); images (N, C, H, W) in [-1, 1].

        Args:
            z: the codes.
            num_inference_steps: sampling steps.
            generator: draws the initial noise (and the noise of stochastic steps).
            latents: the initial noise (N, C, H, W) instead (diffusers' meaning).
            eta: DDIM's eta (0 deterministic, 1 stochastic), for schedulers that take it.
            scheduler: any variance-preserving diffusers scheduler (default: DDIM on the base's schedule,
                ``clip_sample=False``); its state is reset by ``set_timesteps``.
        """
        z = z.to(device=self.device, dtype=self.dtype)
        if scheduler is None:
            scheduler = DDIMScheduler.from_config(self.noise_scheduler.config, clip_sample=False)
        check_scheduler(scheduler)
        shape = (z.shape[0], self.config.in_channels, self.config.sample_size, self.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        sample = latents.to(self.device, self.dtype)

        def model_output(x, t):
            out, g = self.estimate(x, t, z)
            return apply_guidance(out, g, scheduler, t, x)  # eps - s_t G (guidance.py's (3)-(5))

        return sample_loop(model_output, scheduler, sample, num_inference_steps, generator, eta).clamp(-1, 1)

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters of the frozen base, the encoder and the gradient estimator."""
        return {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in ("unet", "encoder", "estimator")}


def train_pdae(
    dataset: Union[str, FactorDataset],
    base_unet: UNet2DModel,
    scheduler: Any,
    latent_dim: int = 8,
    resolution: Optional[int] = None,
    max_seconds: Optional[float] = None,
    max_steps: Optional[int] = None,
    batch_size: int = 64,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    encoder_channels: Sequence[int] = (32, 64, 64),
    hidden_dim: int = 256,
    norm_num_groups: int = 8,
    encoder_stem_stride: int = 2,
    snr_gamma: float = SNR_GAMMA,
    base_model: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    log_every: int = 50,
) -> PDAE:
    """Train a :class:`PDAE`'s encoder and gradient estimator on the frozen ``base_unet`` until the step or
    wall-clock budget is spent.

    Args:
        dataset: a :class:`~sami_adapter.data.FactorDataset` or a dataset name (built at ``resolution``).
        base_unet: the pretrained ``UNet2DModel`` (copied; it is not changed).
        scheduler: its scheduler or scheduler config (the noise schedule it was trained with).
        latent_dim: size of ``z``.
        resolution: image side (default: the dataset's); must be the base's.
        max_seconds: wall-clock budget in seconds.
        max_steps: step budget (whichever ends first stops training).
        batch_size: images per step.
        lr: Adam learning rate of encoder and estimator (PDAE's own is 1e-4).
        seed: seed of initialisation, batches, timesteps and noise.
        progress: show a tqdm bar.
        encoder_channels, hidden_dim, norm_num_groups, encoder_stem_stride: encoder architecture (match the SAMI encoder's).
        snr_gamma: the exponent ``gamma`` of the loss weight (P4).
        base_model: where the base came from, recorded in the config.
        device: where to train (default: CPU).
        log_every: steps between entries of ``model.training_log["history"]``.

    Returns:
        The trained model in eval mode; ``model.training_log`` holds steps, seconds and the loss history.
    """
    data = resolve_dataset(dataset, resolution, seed)
    if (base_unet.config.sample_size, base_unet.config.in_channels) != (data.resolution, data.num_channels):
        raise ValueError(f"The base UNet takes {base_unet.config.in_channels}-channel {base_unet.config.sample_size} px images; the data are "
                         f"{data.num_channels}-channel {data.resolution} px. Use a base trained at the data's resolution.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PDAE.from_base(base_unet, scheduler, base_model=base_model, latent_dim=latent_dim, encoder_channels=tuple(encoder_channels),
                               hidden_dim=hidden_dim, norm_num_groups=norm_num_groups, encoder_stem_stride=encoder_stem_stride,
                               snr_gamma=snr_gamma)
    model.to(device or "cpu")
    log = train_loop(model, lambda x, g: model.loss(x, generator=g), data, TrainingBudget(max_steps, max_seconds), batch_size, lr, seed,
                     progress=progress, desc="PDAE", log_every=log_every)
    model.training_log = {**log.as_dict(), "parameters": model.parameter_counts(), "lr": lr}
    return model

