"""``SAMIPipeline``: guided sampling, encoding, reconstruction, traversal and interpolation,
in pixel space or in the latent space of a VAE (latent diffusion, composed with classifier-free guidance)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .hub import AdapterPipelineMixin
from .encoder import LatentPosterior, SAMIEncoder, check_encoder_fits_unet
from .guidance import add_noise, apply_guidance, check_first_step, check_scheduler, check_timesteps, encoder_noise_level, frozen_parameters, posterior_score
from .images import ImageInput
from .base_model import LATENT_COMPONENTS
from .decoding import CodeDecodingMixin
from .latent import LatentPipelineMixin, PromptInput, prompt_batch_size, repeat_per_image


@dataclass
class SAMIPipelineOutput(ImagePipelineOutput):
    """Output of :class:`SAMIPipeline`.

    Args:
        images: PIL images, a numpy array (N, H, W, C) in [0, 1], a tensor (N, C, H, W) in [0, 1] (as diffusers), or
            with ``output_type="latent"`` the undecoded UNet-space sample.
        z: (N, latent_dim) the SAMI codes that guided each image.
    """

    z: Optional[torch.Tensor] = None


class SAMIPipeline(AdapterPipelineMixin, CodeDecodingMixin, LatentPipelineMixin, DiffusionPipeline):
    r"""Sample from a diffusion model guided by a SAMI code ``z``.

    The UNet is the unconditional denoiser ``eps_theta(x_t, t)``; the encoder is the SAMI inference
    network ``q(z | x_t, t)``. Each denoising step replaces the model output by the guided one of
    :mod:`sami_adapter.guidance`, so any diffusers scheduler with ``alphas_cumprod`` or ``sigmas``
    works (swap with ``SomeScheduler.from_config(pipe.scheduler.config)``).

    **Latent diffusion** (Stable Diffusion 1.x/2.x style): pass a ``UNet2DConditionModel`` with its
    ``vae`` (``AutoencoderKL``) and, for prompts, its ``text_encoder`` and ``tokenizer``. The encoder
    and the guidance then work on the UNet's input, the VAE latents scaled by
    ``vae.config.scaling_factor``; images still go in and come out as pixels (``encode`` runs
    image -> VAE latent mean -> posterior, sampling ends with ``vae.decode``). A text-conditioned UNet
    is conditioned on ``prompt`` / ``prompt_embeds``, or on the empty-prompt embedding when no prompt
    is given (the unconditional model).

    **Two guidance knobs**, composed in :meth:`guided_model_output` (``w = guidance_scale``, ``s = sami_scale``):

        eps_hat = eps_uncond + w (eps_cond - eps_uncond) - s * s_t * grad_{x_t} log q(z | x_t, t)

    ``guidance_scale`` is classifier-free guidance, as in diffusers' text-to-image pipelines (1 = off,
    the plain conditional model; only a text-conditioned UNet takes it). ``sami_scale`` multiplies
    the SAMI posterior score (1 = the Bayes-exact SAMI decoder, 0 = off). For v- and x0-prediction
    models CFG is applied to the model output in its own parameterisation and the SAMI term is
    converted with :func:`~sami_adapter.guidance.apply_guidance` (``v - s (s_t / a_t) g``,
    ``x0 + s (s_t^2 / a_t) g``); since these conversions are affine in the output, this equals the
    epsilon form above.

    Args:
        unet: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (or any model with the same call
            signature and config keys ``in_channels`` and ``sample_size``).
        scheduler: a diffusers scheduler.
        encoder: the :class:`~sami_adapter.SAMIEncoder` trained for this UNet (on its input space).
        vae: optional ``AutoencoderKL``; when given, the UNet is a latent diffusion model.
        text_encoder: optional text encoder (e.g. ``CLIPTextModel``) for a text-conditioned UNet.
        tokenizer: optional tokenizer (e.g. ``CLIPTokenizer``) of the text encoder.
    """

    model_cpu_offload_seq = "text_encoder->encoder->unet->vae"
    _optional_components = list(LATENT_COMPONENTS)

    def __init__(self, unet: Any, scheduler: Any, encoder: SAMIEncoder, vae: Any = None, text_encoder: Any = None, tokenizer: Any = None):
        super().__init__()
        check_encoder_fits_unet(encoder, unet)
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("Pass text_encoder and tokenizer together (or neither and use prompt_embeds).")
        self.register_modules(unet=unet, scheduler=scheduler, encoder=encoder, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)

    # ------------------------------------------------------------------ input checks
    @property
    def latent_dim(self) -> int:
        return self.encoder.config.latent_dim

    def check_z(self, z: torch.Tensor) -> torch.Tensor:
        """Validate a code batch (N, latent_dim) or a single code (latent_dim,)."""
        z = torch.as_tensor(z)
        if z.ndim == 1:
            z = z.unsqueeze(0)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (N, {self.latent_dim}) for this encoder (latent_dim={self.latent_dim}), got {tuple(z.shape)}.")
        if not torch.isfinite(z).all():
            raise ValueError("z contains NaN or inf.")
        return z.to(device=self._execution_device, dtype=self.encoder.dtype)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode(
        self,
        images: ImageInput,
        timesteps: Optional[Union[int, Sequence[int], torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> LatentPosterior:
        """The posterior ``q(z | x_t, t)`` of images, at one or several noise levels.

        With a VAE the images are pixels and go image -> VAE latent mean (scaled) -> posterior:
        ``x_0`` and ``x_t`` below are latents.

        Args:
            images: the clean images as diffusers takes them (see :meth:`preprocess`): PIL images,
                numpy arrays (N, H, W, C) or tensors (N, C, H, W) in [0, 1]. Images of another size
                are resized to the model's (``unet.config.sample_size``, times the VAE scale factor
                for latent diffusion), as diffusers' ``VaeImageProcessor`` does.
            timesteps: None or 0 for the clean posterior ``q(z | x_0)``; an int ``t`` to encode
                ``x_t = a_t x_0 + s_t eps``; a sequence of K timesteps to encode every image at every
                level in one batched call (multiscale inference).
            generator: generator of the noise ``eps``.

        Returns:
            :class:`LatentPosterior` with mean/logvar (N, D), or (K, N, D) for a sequence of timesteps.
        """
        x0 = self.preprocess(images)
        if timesteps is None:
            return self.encoder(x0)  # t = 0: the clean posterior
        requested = torch.as_tensor(np.asarray(timesteps) if not isinstance(timesteps, torch.Tensor) else timesteps)
        multiscale = requested.ndim > 0  # a Python/numpy/tensor scalar encodes at one level, a sequence at several
        if requested.ndim > 1 or requested.dtype == torch.bool or requested.numel() == 0:
            raise ValueError(f"timesteps must be an integer or a 1-D sequence of integers, got {timesteps!r}.")
        check_timesteps(requested, self.scheduler.config.num_train_timesteps)
        if requested.is_floating_point() and not torch.equal(requested, requested.round()):
            raise ValueError(f"timesteps must be whole numbers (the encoder was trained on integer timesteps), got {requested.tolist()}.")
        levels = requested.reshape(-1).to(device=x0.device, dtype=torch.long)
        n, k = x0.shape[0], levels.shape[0]
        t = levels.repeat_interleave(n)
        clean = x0.repeat(k, 1, 1, 1)
        noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        alpha, sigma = encoder_noise_level(self.scheduler.alphas_cumprod, t)
        noisy = add_noise(clean, noise, alpha, sigma)
        posterior = self.encoder(noisy, t)
        if not multiscale:
            return posterior
        d = posterior.latent_dim
        return LatentPosterior(torch.cat([posterior.mean, posterior.logvar], dim=-1).view(k, n, 2 * d))

    # ------------------------------------------------------------------ sampling
    def guided_model_output(
        self,
        sample: torch.Tensor,
        t: Any,
        z: Optional[torch.Tensor],
        sami_scale: float = 1.0,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """One guided denoiser evaluation at the (scaled) model input ``sample`` and timestep ``t``.

        In the model's own parameterisation (``scheduler.config.prediction_type``), with
        ``w = guidance_scale`` and ``out(c)`` the UNet output under conditioning ``c``::

            out = out(negative) + w (out(prompt) - out(negative))     (classifier-free guidance)
            out = apply_guidance(out, grad_{x_t} log q(z | x_t, t), ..., sami_scale)

        which for epsilon prediction is ``eps_u + w (eps_c - eps_u) - sami_scale * s_t * g``.
        Classifier-free guidance runs only when ``guidance_scale != 1`` and ``negative_prompt_embeds`` is
        given (both halves in one batched UNet call); otherwise the UNet runs once on ``prompt_embeds``.

        Args:
            sample: the UNet input ``x_t`` (N, C, H, W), after ``scheduler.scale_model_input``.
            t: the current timestep.
            z: (N, latent_dim) SAMI codes; None (or ``sami_scale == 0``) skips the SAMI term.
            sami_scale: multiplies the posterior score (1 = exact SAMI).
            prompt_embeds: (N, L, D) ``encoder_hidden_states`` of a text-conditioned UNet; None for a
                UNet without text conditioning.
            negative_prompt_embeds: (N, L, D) the unconditional (empty or negative prompt) embeddings.
            guidance_scale: the classifier-free guidance weight ``w``.
        """
        do_cfg = guidance_scale != 1 and negative_prompt_embeds is not None
        if negative_prompt_embeds is not None and prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs prompt_embeds.")
        with torch.no_grad():
            if prompt_embeds is None:
                model_output = self.unet(sample, t).sample
            elif do_cfg:
                hidden = torch.cat([negative_prompt_embeds, prompt_embeds]).to(self.unet.dtype)
                uncond, cond = self.unet(torch.cat([sample, sample]), t, encoder_hidden_states=hidden).sample.chunk(2)
                model_output = uncond + guidance_scale * (cond - uncond)
            else:
                model_output = self.unet(sample, t, encoder_hidden_states=prompt_embeds.to(self.unet.dtype)).sample
        if z is None or sami_scale == 0:
            return model_output
        # The first parameter's dtype: ModelMixin.dtype walks every parameter, a cost paid each step.
        score = posterior_score(self.encoder, z, sample.to(next(self.encoder.parameters()).dtype), t)
        return apply_guidance(model_output, score.to(model_output.dtype), self.scheduler, t, sample, sami_scale)

    _callback_tensor_inputs = ["latents", "z", "prompt_embeds", "negative_prompt_embeds"]

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` from a ``callback_on_step_end`` to skip the remaining steps (diffusers' convention)."""
        return getattr(self, "_interrupt", False)

    @property
    def num_timesteps(self) -> int:
        return getattr(self, "_num_timesteps", 0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[PromptInput] = None,
        z: Optional[torch.Tensor] = None,
        batch_size: Optional[int] = None,
        num_inference_steps: int = 50,
        sami_scale: float = 1.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        negative_prompt: Optional[PromptInput] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Union[SAMIPipelineOutput, tuple]:
        """Guided sampling.

        Args:
            prompt: text prompt(s) of a text-conditioned UNet (the first positional argument, as in
                diffusers); None conditions on the empty prompt. A UNet without text takes none.
            z: (N, latent_dim) SAMI codes, by keyword. None draws ``z ~ N(0, I)`` (generation); a
                posterior mean reconstructs; an edited code traverses.
            batch_size: number of codes to draw when ``z`` is None; defaults to the number of prompts (or 1).
            num_inference_steps: denoising steps.
            sami_scale: multiplies the SAMI posterior score (1, the default, is the exact SAMI
                decoder; 0 gives the plain unconditional or prompt-conditioned model).
            generator: torch generator(s) for ``z``, the initial noise and stochastic schedulers.
            latents: (N, C, h, w) initial noise of the UNet input (diffusers' meaning); drawn when None.
            eta: DDIM's eta, passed to schedulers that accept it.
            output_type: ``"pil"``, ``"np"`` (N, H, W, C) in [0, 1], ``"pt"`` (N, C, H, W) in [0, 1] (diffusers' ranges), or
                ``"latent"``: the final UNet-space sample, not decoded (scaled VAE latents with a VAE).
            return_dict: return a :class:`SAMIPipelineOutput` instead of a tuple.
            negative_prompt: what classifier-free guidance pushes away from (default: the empty prompt).
            prompt_embeds: precomputed ``encoder_hidden_states`` (1 or N, L, D) instead of ``prompt``.
            negative_prompt_embeds: precomputed negative embeddings instead of ``negative_prompt``.
            guidance_scale: classifier-free guidance weight ``w`` (1 = off), diffusers' meaning; only a
                text-conditioned UNet takes a value other than 1.
            num_images_per_prompt: images per prompt, or per code when ``z`` is given (each from its own
                initial noise); without ``z`` every image gets its own drawn code.
            callback_on_step_end: ``callback(pipe, step_index, timestep, callback_kwargs) -> dict``
                after each step, as in diffusers (or a ``PipelineCallback``); the tensors it returns
                replace the pipeline's.
            callback_on_step_end_tensor_inputs: the tensors given to the callback, from
                ``pipe._callback_tensor_inputs`` (``latents``, ``z``, ``prompt_embeds``, ``negative_prompt_embeds``).

        Returns:
            :class:`SAMIPipelineOutput` with ``images`` and the ``z`` used, or ``(images, z)``.
        """
        if prompt is not None and not isinstance(prompt, (str, list, tuple)):
            raise TypeError(
                f"The first positional argument is prompt (text, as in diffusers), got a {type(prompt).__name__}; "
                "pass SAMI codes by keyword: pipe(z=codes)."
            )
        callback_on_step_end_tensor_inputs = self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        if guidance_scale != 1 and not self.is_text_conditioned:
            raise ValueError(
                f"guidance_scale={guidance_scale} is the classifier-free guidance weight, but this UNet is not text-conditioned. "
                "The SAMI knob (how strongly z steers sampling) is sami_scale."
            )
        self.check_inputs(z, batch_size, num_inference_steps, sami_scale, generator, latents, eta, guidance_scale, num_images_per_prompt)
        check_scheduler(self.scheduler)
        z, cond, uncond = self._prepare_codes(prompt, z, batch_size, generator, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                              guidance_scale, num_images_per_prompt)
        tensors = {"latents": self.prepare_latents(z.shape[0], generator, latents), "z": z,
                   "prompt_embeds": cond, "negative_prompt_embeds": uncond}
        with frozen_parameters(self.encoder):
            sample = self._denoise(tensors, num_inference_steps, float(sami_scale), guidance_scale, generator, eta,
                                   callback_on_step_end, callback_on_step_end_tensor_inputs)
        if output_type == "latent":
            images = sample
        else:
            images = self.postprocess(self.decode_sample(sample), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, tensors["z"]
        return SAMIPipelineOutput(images=images, z=tensors["z"])

    def _check_callback(self, callback: Optional[Callable], tensor_inputs: Sequence[str]) -> List[str]:
        """The tensor names the callback gets (a ``PipelineCallback`` names its own); unknown names raise, as in diffusers."""
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        if callback is not None and not callable(callback):
            raise TypeError(f"callback_on_step_end must be callable (pipe, step_index, timestep, callback_kwargs) -> dict, got {callback!r}.")
        unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs has {unknown}; this pipeline can pass {self._callback_tensor_inputs}.")
        return list(tensor_inputs)

    def _prepare_codes(self, prompt, z, batch_size, generator, negative_prompt, prompt_embeds, negative_prompt_embeds,
                       guidance_scale, num_images_per_prompt) -> tuple:
        """``(z, prompt_embeds, negative_prompt_embeds)`` for the whole batch: ``num_images_per_prompt`` per code or prompt."""
        k = int(num_images_per_prompt)
        if z is None:
            n = batch_size if batch_size is not None else prompt_batch_size(prompt, prompt_embeds)
            z = randn_tensor((n * k, self.latent_dim), generator=generator, device=self._execution_device, dtype=self.encoder.dtype)
        else:
            z = self.check_z(z).repeat_interleave(k, dim=0)

        texts = [repeat_per_image(v, k) for v in (prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)]  # one per image
        cond, uncond = self.encode_prompt(texts[0], z.shape[0], texts[1], texts[2], texts[3], guidance_scale != 1)
        return z, cond, uncond

    def _denoise(self, tensors: dict, num_inference_steps: int, sami_scale: float, guidance_scale: float, generator, eta: float,
                 callback: Optional[Callable], callback_inputs: Sequence[str]) -> torch.Tensor:
        """The sampling loop over ``tensors["latents"]``; the callback may replace any of ``tensors``."""
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        check_first_step(self.scheduler)
        self._num_timesteps, self._interrupt = len(self.scheduler.timesteps), False
        tensors["latents"] = tensors["latents"] * self.scheduler.init_noise_sigma
        extra = {k: v for k, v in (("generator", generator), ("eta", eta)) if k in inspect.signature(self.scheduler.step).parameters}
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            model_input = self.scheduler.scale_model_input(tensors["latents"], t)
            model_output = self.guided_model_output(model_input, t, tensors["z"], sami_scale, tensors["prompt_embeds"],
                                                    tensors["negative_prompt_embeds"], guidance_scale)
            tensors["latents"] = self.scheduler.step(model_output, t, tensors["latents"], **extra).prev_sample
            if callback is not None:
                returned = callback(self, i, t, {name: tensors[name] for name in callback_inputs}) or {}
                tensors.update({name: value for name, value in returned.items() if name in tensors})
        return tensors["latents"]

    def check_inputs(self, z, batch_size, num_inference_steps, sami_scale, generator, latents, eta, guidance_scale,
                     num_images_per_prompt=1) -> None:
        """Raise a ValueError for sampling arguments that would give NaN, noise or a silently different batch."""

        def is_int(value):
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        if not is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")
        if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}.")
        for name, value in (("sami_scale", sami_scale), ("guidance_scale", guidance_scale)):
            if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or not np.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if not isinstance(eta, (int, float, np.number)) or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}.")
        n = None  # the number of images
        if z is not None:
            n = self.check_z(z).shape[0]
            if batch_size is not None and batch_size != n:
                raise ValueError(f"batch_size={batch_size} but z holds {n} codes; leave batch_size out when passing z.")
            n *= num_images_per_prompt
        elif batch_size is not None:
            n = batch_size * num_images_per_prompt
        if latents is not None:
            if not torch.isfinite(torch.as_tensor(latents)).all():
                raise ValueError("latents contain NaN or inf; pass finite initial noise (or leave latents out).")
            if n is None:
                n = latents.shape[0]
        if isinstance(generator, (list, tuple)) and n is not None and len(generator) != n:
            raise ValueError(f"A list of generators needs one per sample: got {len(generator)} for a batch of {n}.")

    # ------------------------------------------------------------------ initial noise
    def prepare_latents(
        self,
        batch_size: int,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        shared: bool = False,
    ) -> torch.Tensor:
        """The initial noise of the UNet input, (batch_size, C, h, w) on the pipeline's device, as diffusers' pipelines
        prepare it (before ``scheduler.init_noise_sigma`` scales it).

        Args:
            batch_size: how many images.
            generator: generator(s) of the noise drawn when ``latents`` is None.
            latents: noise to use: (batch_size, C, h, w), or with ``shared`` one image (1, C, h, w).
            shared: one noise image for the whole batch, so only the code differs between the outputs
                (traversals, interpolations).
        """
        shape = (batch_size, *self.sample_shape())
        if shared:
            if latents is None:
                latents = randn_tensor((1, *shape[1:]), generator=generator, device=self._execution_device, dtype=self.unet.dtype)
            if latents.shape[0] == 1:
                latents = latents.expand(batch_size, *latents.shape[1:]).clone()
            return latents
        if latents is None:
            return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (one noise image per code), got {tuple(latents.shape)}.")
        return latents.to(device=self._execution_device, dtype=self.unet.dtype)
