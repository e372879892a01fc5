"""``SAMIPipeline``: guided sampling, encoding, reconstruction, traversal and interpolation."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .adapter import resolve_adapter_dir
from .encoder import LatentPosterior, SAMIEncoder
from .guidance import alpha_sigma_from_alphas_cumprod, apply_guidance, check_scheduler, check_timesteps, posterior_score

ImageInput = Union[torch.Tensor, np.ndarray, PIL.Image.Image, Sequence[PIL.Image.Image]]


@dataclass
class SAMIPipelineOutput(ImagePipelineOutput):
    """Output of :class:`SAMIPipeline`.

    Args:
        images: PIL images, a numpy array (N, H, W, C) in [0, 1], or a tensor (N, C, H, W) in [-1, 1].
        z: (N, latent_dim) the SAMI codes that guided each image.
    """

    z: Optional[torch.Tensor] = None


class SAMIPipeline(DiffusionPipeline):
    r"""Sample from a diffusion model guided by a SAMI code ``z``.

    The UNet is the unconditional denoiser ``eps_theta(x_t, t)``; the encoder is the SAMI inference
    network ``q(z | x_t, t)``. Each denoising step replaces the model output by the guided one of
    :mod:`sami_adapter.guidance`, so any diffusers scheduler with ``alphas_cumprod`` or ``sigmas``
    works (swap with ``SomeScheduler.from_config(pipe.scheduler.config)``).

    Args:
        unet: a diffusers ``UNet2DModel`` (or any model with the same call signature and config keys
            ``in_channels`` and ``sample_size``).
        scheduler: a diffusers scheduler.
        encoder: the :class:`~sami_adapter.SAMIEncoder` trained for this UNet.
    """

    model_cpu_offload_seq = "encoder->unet"

    def __init__(self, unet: Any, scheduler: Any, encoder: SAMIEncoder):
        super().__init__()
        check_encoder_fits_unet(encoder, unet)
        self.register_modules(unet=unet, scheduler=scheduler, encoder=encoder)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "SAMIPipeline":
        """Load a saved pipeline, or an adapter directory/repo (see :mod:`sami_adapter.adapter`).

        An adapter holds only the trained parts and a reference to its base model; the base UNet and
        scheduler are loaded from that reference (``unet=`` / ``scheduler=`` override them), LoRA
        weights are applied and, with ``merge_lora=True`` (default), folded into the UNet. Any other
        directory or repo goes to ``DiffusionPipeline.from_pretrained``.
        """
        path = str(pretrained_model_name_or_path)
        adapter_dir = resolve_adapter_dir(path, revision=kwargs.get("revision"))
        if adapter_dir is None:
            return super().from_pretrained(path, **kwargs)
        return cls.from_adapter(adapter_dir, **kwargs)

    @classmethod
    def from_adapter(
        cls,
        adapter_dir: str,
        unet: Any = None,
        scheduler: Any = None,
        merge_lora: bool = True,
        torch_dtype: Optional[torch.dtype] = None,
        **kwargs,
    ) -> "SAMIPipeline":
        """Build the pipeline from a local adapter directory.

        Args:
            adapter_dir: directory with ``sami_adapter_config.json`` and ``encoder/``.
            unet: use this base UNet instead of loading the referenced one.
            scheduler: use this scheduler instead of DDIM built from the base model's scheduler config.
            merge_lora: fold LoRA weights into the UNet after loading them.
            torch_dtype: cast the loaded models to this dtype.
        """
        from diffusers import DDIMScheduler, UNet2DModel

        from . import adapter as adapter_lib

        config = adapter_lib.read_adapter_config(adapter_dir)
        encoder = SAMIEncoder.from_pretrained(os.path.join(adapter_dir, "encoder"))
        scheduler_config = None
        if unet is None:
            if config.get("unet_mode") == "full":
                unet = UNet2DModel.from_pretrained(os.path.join(adapter_dir, "unet"))
                base = adapter_lib.resolve_base_path(config, adapter_dir) if config.get("base_model_name_or_path") else None
                scheduler_config = adapter_lib.load_base_unet_and_scheduler(base, config.get("revision"))[1] if base else None
            else:
                base = adapter_lib.resolve_base_path(config, adapter_dir)
                unet, scheduler_config = adapter_lib.load_base_unet_and_scheduler(base, config.get("revision"))
            if config.get("unet_mode") == "lora":
                adapter_lib.load_lora(unet, os.path.join(adapter_dir, adapter_lib.LORA_DIR))
                if merge_lora:
                    adapter_lib.merge_lora(unet)
        if scheduler is None:
            from diffusers import DDPMScheduler

            scheduler = DDIMScheduler.from_config(scheduler_config or DDPMScheduler().config, clip_sample=False)
        pipe = cls(unet=unet, scheduler=scheduler, encoder=encoder)
        if torch_dtype is not None:
            pipe.to(torch_dtype=torch_dtype)
        return pipe

    # ------------------------------------------------------------------ input checks
    @property
    def latent_dim(self) -> int:
        return self.encoder.config.latent_dim

    def _sample_shape(self) -> tuple:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images as a (N, C, H, W) tensor in [-1, 1] on the pipeline's device, checked against the UNet.

        Accepts a tensor in [-1, 1], a uint8/float numpy array (N, H, W, C) in [0, 255]/[0, 1], or PIL images.
        """
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], PIL.Image.Image):
            images = np.stack([np.asarray(im) for im in images])
        if isinstance(images, np.ndarray):
            array = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
            if array.ndim == 3:
                array = array[..., None]
            images = torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, numpy array or PIL image(s), got {type(images).__name__}.")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        expected = self._sample_shape()
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images have shape {tuple(images.shape)} but the UNet takes (N, {expected[0]}, {expected[1]}, {expected[2]}); "
                f"resize to {expected[1]}x{expected[2]} and use {expected[0]} channel(s)."
            )
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or inf; pass finite pixel values in [-1, 1].")
        return images.to(device=self._execution_device, dtype=self.unet.dtype)

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

        Args:
            images: the clean images ``x_0``.
            timesteps: None or 0 for the clean posterior ``q(z | x_0)``; an int ``t`` to encode
                ``x_t = a_t x_0 + s_t eps``; a sequence of K timesteps to encode every image at every
                level in one batched call (multiscale inference).
            generator: generator of the noise ``eps``.

        Returns:
            :class:`LatentPosterior` with mean/logvar (N, D), or (K, N, D) for a sequence of timesteps.
        """
        x0 = self.preprocess(images)
        if timesteps is None:
            return self.encoder(x0, torch.zeros(x0.shape[0], device=x0.device, dtype=torch.long))
        multiscale = not (isinstance(timesteps, int) or (isinstance(timesteps, torch.Tensor) and timesteps.ndim == 0))
        levels = torch.as_tensor(timesteps if multiscale else [timesteps], device=x0.device).long()
        check_timesteps(levels, self.scheduler.config.num_train_timesteps)
        n, k = x0.shape[0], levels.shape[0]
        t = levels.repeat_interleave(n)
        clean = x0.repeat(k, 1, 1, 1)
        noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        alpha, sigma = alpha_sigma_from_alphas_cumprod(self.scheduler.alphas_cumprod, t)
        view = (-1, 1, 1, 1)
        # t = 0 means the clean image itself, as in training.
        alpha = torch.where(t == 0, torch.ones_like(alpha), alpha)
        sigma = torch.where(t == 0, torch.zeros_like(sigma), sigma)
        noisy = alpha.view(view).to(clean.dtype) * clean + sigma.view(view).to(clean.dtype) * noise
        posterior = self.encoder(noisy, t)
        if not multiscale:
            return posterior
        d = posterior.latent_dim
        return LatentPosterior(torch.cat([posterior.mean, posterior.logvar], dim=-1).view(k, n, 2 * d))

    # ------------------------------------------------------------------ sampling
    def _extra_step_kwargs(self, generator: Optional[torch.Generator], eta: float) -> dict:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in params:
            kwargs["generator"] = generator
        if "eta" in params:
            kwargs["eta"] = eta
        return kwargs

    def guided_model_output(self, sample: torch.Tensor, t: Any, z: Optional[torch.Tensor], guidance_scale: float) -> torch.Tensor:
        """One guided denoiser evaluation at the (scaled) model input ``sample`` and timestep ``t``."""
        with torch.no_grad():
            model_output = self.unet(sample, t).sample
        if z is None or guidance_scale == 0:
            return model_output
        score = posterior_score(self.encoder, z, sample.to(self.encoder.dtype), t)
        return apply_guidance(model_output, score.to(model_output.dtype), self.scheduler, t, sample, guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        z: Optional[torch.Tensor] = None,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[SAMIPipelineOutput, tuple]:
        """Guided sampling.

        Args:
            z: (N, latent_dim) SAMI codes. None draws ``z ~ N(0, I)`` (generation); a posterior mean
                reconstructs; an edited code traverses.
            batch_size: number of images when ``z`` is None.
            num_inference_steps: denoising steps.
            guidance_scale: multiplies the posterior score; 0 gives the unconditional model.
            generator: torch generator(s) for ``z``, the initial noise and stochastic schedulers.
            latents: (N, C, H, W) initial noise (diffusers' meaning); drawn when None.
            eta: DDIM's eta, passed to schedulers that accept it.
            output_type: ``"pil"``, ``"np"`` (N, H, W, C) in [0, 1], or ``"pt"`` (N, C, H, W) in [-1, 1].
            return_dict: return a :class:`SAMIPipelineOutput` instead of a tuple.

        Returns:
            :class:`SAMIPipelineOutput` with ``images`` and the ``z`` used, or ``(images, z)``.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        check_scheduler(self.scheduler)
        device = self._execution_device
        if z is None:
            z = randn_tensor((batch_size, self.latent_dim), generator=generator, device=device, dtype=self.encoder.dtype)
        z = self.check_z(z)
        shape = (z.shape[0], *self._sample_shape())
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (one noise image per code), got {tuple(latents.shape)}.")
        sample = latents.to(device=device, dtype=self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sample = sample * self.scheduler.init_noise_sigma
        extra = self._extra_step_kwargs(generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(sample, t)
            model_output = self.guided_model_output(model_input, t, z, guidance_scale)
            sample = self.scheduler.step(model_output, t, sample, **extra).prev_sample

        images = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, z
        return SAMIPipelineOutput(images=images, z=z)

    @staticmethod
    def postprocess(sample: torch.Tensor, output_type: str) -> Any:
        """(N, C, H, W) in [-1, 1] -> the requested output type."""
        sample = sample.clamp(-1, 1)
        if output_type == "pt":
            return sample
        array = ((sample + 1) / 2).float().cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        uint8 = (array * 255).round().astype(np.uint8)
        return [PIL.Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in uint8]

    # ------------------------------------------------------------------ uses of the code
    def _shared_noise(self, n: int, generator: Optional[torch.Generator], latents: Optional[torch.Tensor]) -> torch.Tensor:
        """One initial noise image repeated n times, so only the code differs between outputs."""
        if latents is None:
            latents = randn_tensor((1, *self._sample_shape()), generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        if latents.shape[0] == 1:
            latents = latents.expand(n, *latents.shape[1:]).clone()
        return latents

    def reconstruct(self, images: ImageInput, **kwargs) -> Union[SAMIPipelineOutput, tuple]:
        """Decode ``z = mean(q(z | x_0))`` of ``images``; ``kwargs`` go to :meth:`__call__`."""
        z = self.encode(images).mean
        return self(z=z, **kwargs)

    def traverse(
        self,
        z_or_image: Union[torch.Tensor, ImageInput],
        dim: int,
        values: Sequence[float],
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> Union[SAMIPipelineOutput, tuple]:
        """Move one code coordinate through ``values``, all else fixed (same code, same initial noise).

        Args:
            z_or_image: a code (latent_dim,) / (1, latent_dim), or one image to encode (posterior mean).
            dim: the coordinate to move.
            values: the values it takes, one output image each.
            generator: generator of the shared initial noise.
            latents: shared initial noise (1, C, H, W); drawn when None.
            kwargs: passed to :meth:`__call__`.
        """
        if isinstance(z_or_image, torch.Tensor) and z_or_image.ndim <= 2 and z_or_image.shape[-1] == self.latent_dim:
            z = self.check_z(z_or_image)[:1]
        else:
            z = self.encode(z_or_image).mean[:1]
        if not 0 <= dim < self.latent_dim:
            raise ValueError(f"dim must be in [0, {self.latent_dim}), got {dim}.")
        codes = z.repeat(len(values), 1)
        codes[:, dim] = torch.as_tensor(list(values), device=codes.device, dtype=codes.dtype)
        return self(z=codes, latents=self._shared_noise(len(values), generator, latents), generator=generator, **kwargs)

    def interpolate(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        steps: int = 8,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> Union[SAMIPipelineOutput, tuple]:
        """Decode ``(1 - w) z_a + w z_b`` for ``steps`` evenly spaced ``w`` in [0, 1], with shared initial noise."""
        z_a, z_b = self.check_z(z_a)[:1], self.check_z(z_b)[:1]
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}.")
        w = torch.linspace(0, 1, steps, device=z_a.device, dtype=z_a.dtype).view(-1, 1)
        codes = (1 - w) * z_a + w * z_b
        return self(z=codes, latents=self._shared_noise(steps, generator, latents), generator=generator, **kwargs)


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
