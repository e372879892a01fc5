"""Latent diffusion helpers: VAE latents, prompt embeddings, base-model components and a latent cache.

A latent diffusion model (Stable Diffusion 1.x/2.x and their fine-tunes) denoises VAE latents,
not pixels. SAMI then lives entirely in that latent space: the encoder ``q(z | x_t, t)`` reads the
UNet's input ``x_t`` (a noisy *scaled* latent) and the guidance ``grad_{x_t} log q`` is a latent-space
vector. Pixels appear only at the two ends:

    pixels in [-1, 1] --vae.encode--> latent-distribution mean --(- shift) * scaling_factor--> x_0
    x_0 --/ scaling_factor (+ shift)--> vae.decode --> pixels in [-1, 1]

The latent mean is used (not a sample), so encoding is deterministic; both directions run under
``no_grad`` because the VAE is never trained here.

The training script and :class:`~sami_adapter.SAMIPipeline` share these helpers, so the two
always agree on scaling, tokenisation and the empty-prompt ("unconditional") embedding.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Dict, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from .base_model import is_text_conditioned
from .images import ImageInput, postprocess, to_model_range

# A prompt: one text, or one per image.
PromptInput = Union[str, Sequence[str]]


# ---------------------------------------------------------------------------- VAE
def vae_scale_factor(vae: Any) -> int:
    """How many pixels one latent cell covers per side: ``2 ** (len(block_out_channels) - 1)`` (8 for Stable Diffusion)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _scaling(vae: Any) -> tuple:
    scale = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    return (1.0 if scale is None else float(scale)), (0.0 if shift is None else float(shift))


@torch.no_grad()
def images_to_latents(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Pixels (N, C, H, W) in [-1, 1] -> the diffusion model's ``x_0``: ``(mean - shift_factor) * scaling_factor``.

    Args:
        vae: a diffusers ``AutoencoderKL`` (anything whose ``encode(x).latent_dist`` has ``.mean``).
        images: pixels in [-1, 1]; moved to the VAE's device and dtype.

    Returns:
        Scaled latents (N, latent_channels, H / f, W / f) in the VAE's dtype, where ``f`` is :func:`vae_scale_factor`.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}.")
    scale, shift = _scaling(vae)
    # The mean, not a sample: encoding is deterministic, as the pipeline and a latent cache need.
    latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    return (latents - shift) * scale


@torch.no_grad()
def latents_to_images(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (the diffusion model's ``x_0``) -> pixels (N, C, H, W), nominally in [-1, 1] (not clamped)."""
    scale, shift = _scaling(vae)
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    return vae.decode(latents / scale + shift).sample


# ---------------------------------------------------------------------------- prompts
@torch.no_grad()
def prompt_embeddings(
    text_encoder: Any,
    tokenizer: Any,
    prompts: Union[str, Sequence[str]],
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """The UNet's ``encoder_hidden_states`` for ``prompts``, the way Stable Diffusion computes them.

    Prompts are padded/truncated to ``tokenizer.model_max_length`` tokens and the text encoder's
    last hidden state is returned (an attention mask is passed only when the text encoder's config
    asks for one, ``use_attention_mask``, as in diffusers' Stable Diffusion pipelines).

    Args:
        text_encoder: e.g. ``transformers.CLIPTextModel``.
        tokenizer: e.g. ``transformers.CLIPTokenizer``.
        prompts: one prompt or a list of N prompts.
        device: where to run the text encoder's input; defaults to the text encoder's device.

    Returns:
        (N, model_max_length, hidden_size) embeddings in the text encoder's dtype.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a non-empty list of strings.")
    device = torch.device(device) if device is not None else text_encoder.device
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(device)
    return text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0]


def empty_prompt_embeddings(
    text_encoder: Any, tokenizer: Any, batch_size: int = 1, device: Optional[Union[str, torch.device]] = None
) -> torch.Tensor:
    """The embedding of the empty prompt ``""``, repeated ``batch_size`` times: conditioning on it gives the
    unconditional model (what SAMI trains against and what classifier-free guidance subtracts)."""
    embedding = prompt_embeddings(text_encoder, tokenizer, [""], device=device)
    return embedding.expand(batch_size, *embedding.shape[1:])


def prompt_conditioning(
    unet: Any,
    text_encoder: Any,
    tokenizer: Any,
    prompt: Optional[Union[str, Sequence[str]]] = None,
    batch_size: int = 1,
    prompt_embeds: Optional[torch.Tensor] = None,
    negative_prompt: Optional[Union[str, Sequence[str]]] = None,
    negative_prompt_embeds: Optional[torch.Tensor] = None,
    do_cfg: bool = False,
    device: Optional[Union[str, torch.device]] = None,
) -> tuple:
    """The UNet's ``(prompt_embeds, negative_prompt_embeds)`` for ``batch_size`` samples, each (N, L, D) or None.

    * A UNet without text conditioning takes no prompt: ``(None, None)`` (a prompt raises).
    * No ``prompt``/``prompt_embeds``: the empty-prompt embedding, i.e. the unconditional model.
    * ``do_cfg``: the negative embeddings are ``negative_prompt_embeds``, else the embedding of
      ``negative_prompt``, else of the empty prompt; without ``do_cfg`` they are None.

    A single prompt or embedding (batch 1) is repeated for every sample. Embeddings are checked
    against the UNet's ``cross_attention_dim`` and returned on ``device`` in the UNet's dtype.
    ``text_encoder``/``tokenizer`` may be None when every embedding is given precomputed.
    """
    given = prompt is not None or prompt_embeds is not None or negative_prompt is not None or negative_prompt_embeds is not None
    if not is_text_conditioned(unet):
        if given:
            raise ValueError("This UNet is not text-conditioned (it takes no encoder_hidden_states); do not pass a prompt.")
        return None, None
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("Pass either prompt or prompt_embeds, not both.")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Pass either negative_prompt or negative_prompt_embeds, not both.")
    has_text = text_encoder is not None and tokenizer is not None

    def embed(text: Optional[PromptInput], embeds: Optional[torch.Tensor], what: str) -> torch.Tensor:
        if embeds is None:
            if not has_text:
                raise ValueError(
                    f"This pipeline has no text_encoder/tokenizer, so it cannot embed the {what}: pass "
                    f"{'negative_' if what.startswith('negative') else ''}prompt_embeds (for no prompt, the empty-prompt embedding)."
                )
            embeds = (
                empty_prompt_embeddings(text_encoder, tokenizer, 1, device)
                if text is None
                else prompt_embeddings(text_encoder, tokenizer, text, device)
            )
        embeds = torch.as_tensor(embeds)
        if embeds.ndim == 2:
            embeds = embeds.unsqueeze(0)
        if embeds.ndim != 3 or embeds.shape[0] not in (1, batch_size):
            raise ValueError(f"{what} embeddings must have shape (1 or {batch_size}, L, D), got {tuple(embeds.shape)}.")
        cross = getattr(unet.config, "cross_attention_dim", None)
        if isinstance(cross, int) and embeds.shape[-1] != cross:
            raise ValueError(f"{what} embeddings have width {embeds.shape[-1]} but the UNet's cross_attention_dim is {cross}.")
        if not torch.isfinite(embeds).all():
            raise ValueError(f"{what} embeddings contain NaN or inf.")
        return embeds.expand(batch_size, *embeds.shape[1:]).to(device=device, dtype=unet.dtype)

    cond = embed(prompt, prompt_embeds, "prompt")
    uncond = embed(negative_prompt, negative_prompt_embeds, "negative prompt") if do_cfg else None
    return cond, uncond


def prompt_batch_size(prompt: Optional[Union[str, Sequence[str]]], prompt_embeds: Optional[torch.Tensor]) -> int:
    """How many samples a prompt list or an (N, L, D) embedding asks for (1 otherwise)."""
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    if prompt_embeds is not None and torch.as_tensor(prompt_embeds).ndim == 3:
        return int(prompt_embeds.shape[0])
    return 1


# ---------------------------------------------------------------------------- latent cache
class LatentCache:
    """Scaled VAE latents of a dataset stored on disk, one safetensors file per dataset index.

    Encoding images with the VAE is the expensive, parameter-free part of a latent-diffusion training
    step; with a cache each image is encoded once (the first epoch) and read back afterwards.
    Latents are the deterministic latent-distribution mean (:func:`images_to_latents`), so a cached
    latent equals a fresh one. Random augmentations applied to the pixels are frozen by caching:
    cache only deterministic transforms.

    ``fingerprint`` describes what the latents depend on (base model, revision, resolution,
    transforms...). It is written to ``cache_info.json`` the first time; reopening the directory with
    a different fingerprint raises instead of silently mixing latents of different settings.
    Files are written atomically (temporary file + rename), so several processes may share a cache.

    Example::

        cache = LatentCache("./latents", {"model": "stable-diffusion-v1-5", "resolution": 512})
        latents = cache.get_or_compute(vae, batch["index"], batch["pixel_values"])

    Args:
        cache_dir: directory of the cache (created).
        fingerprint: JSON-serialisable description of the latents' settings.
        dtype: dtype the latents are stored in (float32 keeps them exact; float16 halves the disk use).
    """

    INFO_NAME = "cache_info.json"

    def __init__(self, cache_dir: Union[str, os.PathLike], fingerprint: Optional[Dict[str, Any]] = None, dtype: torch.dtype = torch.float32):
        self.cache_dir = str(cache_dir)
        self.dtype = dtype
        self.fingerprint = json.loads(json.dumps(fingerprint or {}, sort_keys=True, default=str))
        os.makedirs(self.cache_dir, exist_ok=True)
        info_path = os.path.join(self.cache_dir, self.INFO_NAME)
        info = {"fingerprint": self.fingerprint, "dtype": str(dtype).replace("torch.", "")}
        if os.path.isfile(info_path):
            with open(info_path) as f:
                existing = json.load(f)
            if existing != info:
                raise ValueError(
                    f"The latent cache in {self.cache_dir} was built with different settings ({existing}) than now ({info}). "
                    "Use another cache directory or delete this one."
                )
        else:
            self._atomic_write(info_path, lambda p: _write_json(p, info))

    def _path(self, index: int) -> str:
        return os.path.join(self.cache_dir, f"{int(index):09d}.safetensors")

    def _atomic_write(self, path: str, write) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.cache_dir)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def __len__(self) -> int:
        return sum(1 for name in os.listdir(self.cache_dir) if name.endswith(".safetensors") and not name.startswith("."))

    def get(self, index: int) -> Optional[torch.Tensor]:
        """The cached latent of dataset item ``index`` (C, h, w), or None if it is not cached yet."""
        path = self._path(index)
        if not os.path.isfile(path):
            return None
        return load_file(path)["latent"]

    def put(self, index: int, latent: torch.Tensor) -> None:
        """Store the latent (C, h, w) of dataset item ``index``."""
        tensor = latent.detach().to(device="cpu", dtype=self.dtype).contiguous()
        self._atomic_write(self._path(index), lambda p: save_file({"latent": tensor}, p))

    def get_or_compute(self, vae: Any, indices: Union[torch.Tensor, Sequence[int]], images: torch.Tensor) -> torch.Tensor:
        """Latents of a batch: read the cached ones, encode (and store) only the missing ones.

        Args:
            vae: the VAE, used for uncached items only (under ``no_grad``).
            indices: (N,) dataset indices of the batch's items.
            images: (N, C, H, W) their pixels in [-1, 1] (deterministically preprocessed).

        Returns:
            (N, C, h, w) scaled latents on ``images``' device, in the VAE's dtype.
        """
        indices = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if len(indices) != images.shape[0]:
            raise ValueError(f"got {len(indices)} indices for {images.shape[0]} images.")
        cached = [self.get(i) for i in indices]
        missing = [k for k, latent in enumerate(cached) if latent is None]
        if missing:
            fresh = images_to_latents(vae, images[missing])
            for k, latent in zip(missing, fresh):
                self.put(indices[k], latent)
                cached[k] = latent.detach().to(device="cpu", dtype=self.dtype)
        return torch.stack(cached).to(device=images.device, dtype=vae.dtype)

    @staticmethod
    def fingerprint_of(**settings: Any) -> Dict[str, Any]:
        """A fingerprint dict from keyword settings, plus a short hash of them (handy as a subdirectory name)."""
        canonical = json.dumps(settings, sort_keys=True, default=str)
        return {**settings, "hash": hashlib.sha256(canonical.encode()).hexdigest()[:16]}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def repeat_per_image(value: Any, k: int) -> Any:
    """A prompt list or a batch of embeddings with each entry repeated ``k`` times (once per image it makes);
    a single prompt, a single embedding or None as it is."""
    if isinstance(value, (list, tuple)):
        return [item for item in value for _ in range(k)]
    if isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[0] > 1:
        return value.repeat_interleave(k, dim=0)
    return value


class LatentPipelineMixin:
    """What :class:`~sami_adapter.SAMIPipeline` needs to work in a VAE's latent space and on prompts: the shapes
    of its input and of the UNet's, images to the UNet's clean input, prompts to embeddings, samples back to pixels.
    Without a ``vae`` (pixel space) every one of these is the identity on pixels."""

    @property
    def is_latent(self) -> bool:
        """True when the UNet denoises VAE latents (a ``vae`` is attached)."""
        return getattr(self, "vae", None) is not None

    @property
    def is_text_conditioned(self) -> bool:
        """True when the UNet takes ``encoder_hidden_states`` (prompt embeddings)."""
        return is_text_conditioned(self.unet)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell and side (8 for Stable Diffusion); 1 without a VAE."""
        return vae_scale_factor(self.vae) if self.is_latent else 1

    def sample_shape(self) -> tuple:
        """(C, H, W) of the UNet's input: pixels, or scaled VAE latents for latent diffusion."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    def image_shape(self) -> tuple:
        """(C, H, W) of the images the pipeline takes and returns."""
        channels, height, width = self.sample_shape()
        if not self.is_latent:
            return channels, height, width
        f = self.vae_scale_factor
        return self.vae.config.in_channels, height * f, width * f

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images -> the UNet's clean input ``x_0`` (N, C, H, W) on the pipeline's device.

        Reads images as diffusers' ``VaeImageProcessor`` does (:mod:`sami_adapter.images`): PIL
        images, numpy arrays (N, H, W, C) and tensors (N, C, H, W) in [0, 1] (uint8/uint16 scaled by
        their maximum; a float batch with values below 0 is read as [-1, 1], deprecated as in
        diffusers). Images of another size are resized to the model's (PIL with Lanczos, arrays and
        tensors with nearest interpolation). Without a VAE ``x_0`` is the pixels in [-1, 1]; with
        one, the VAE latent mean scaled by ``vae.config.scaling_factor`` (deterministic, no gradient).
        """
        channels, height, width = self.image_shape()
        images = to_model_range(images, channels=channels, size=(height, width))
        device = self._execution_device
        if self.is_latent:
            return images_to_latents(self.vae, images.to(device)).to(device=device, dtype=self.unet.dtype)
        return images.to(device=device, dtype=self.unet.dtype)

    def encode_prompt(
        self,
        prompt: Optional[PromptInput] = None,
        batch_size: int = 1,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt: Optional[PromptInput] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        do_cfg: bool = False,
    ) -> tuple:
        """The ``(prompt_embeds, negative_prompt_embeds)`` for ``batch_size`` samples, each (N, L, D) or None:
        :func:`~sami_adapter.latent.prompt_conditioning` with this pipeline's UNet, text encoder and tokenizer."""
        return prompt_conditioning(
            self.unet, getattr(self, "text_encoder", None), getattr(self, "tokenizer", None), prompt, batch_size, prompt_embeds,
            negative_prompt, negative_prompt_embeds, do_cfg, self._execution_device,
        )

    postprocess = staticmethod(postprocess)

    def decode_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """A final UNet-space sample as pixels in [-1, 1] (the VAE decodes latents)."""
        return latents_to_images(self.vae, sample) if self.is_latent else sample
