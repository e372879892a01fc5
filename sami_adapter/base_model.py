"""The base model: loading the diffusion model an adapter is made for, and the Hub options every loader passes on.

* :data:`HUB_KWARGS` / :func:`hub_kwargs`: the Hub download options (``cache_dir``, ``local_files_only``,
  ``token``) that every load of a base model or an adapter forwards; :func:`hub_id`: whether a base
  reference reads as a Hub repo id.
* :func:`load_base_unet_and_scheduler` (a pipeline's ``unet/`` or a bare UNet, with its scheduler
  config), :func:`load_saved_unet` (a UNet written by ``save_pretrained``), :func:`is_text_conditioned`.
* :func:`load_latent_components`: the VAE, text encoder and tokenizer a latent-diffusion base lists in
  its ``model_index.json``.
* :func:`check_no_pickle`: the pickle rule (a folder whose weights exist only as ``.bin`` is refused
  unless ``use_safetensors=False``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from typing import Any, Dict, Iterable, Optional

import torch

LATENT_COMPONENTS = ("vae", "text_encoder", "tokenizer")
_ALLOWED_LIBRARIES = ("diffusers", "transformers")


# ---------------------------------------------------------------------------- Hub options
HUB_KWARGS = ("cache_dir", "local_files_only", "token")


def hub_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The Hub download options (:data:`HUB_KWARGS`) among ``kwargs`` that are set."""
    return {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}


def hub_id(base: Optional[str]) -> Optional[str]:
    """``base`` when it reads as a Hub repo id (``name`` or ``owner/name``), None for a local path."""
    if not base or os.path.isabs(base) or base.startswith((".", "~")) or os.path.isdir(base):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(base)
    except HFValidationError:
        return None
    return base


# ---------------------------------------------------------------------------- UNet and scheduler
def is_text_conditioned(unet: Any) -> bool:
    """Whether the UNet takes ``encoder_hidden_states`` (a ``UNet2DConditionModel``-like model)."""
    forward = getattr(unet, "forward", None)
    if forward is None:
        return False
    return "encoder_hidden_states" in inspect.signature(forward).parameters


def load_base_unet_and_scheduler(base: str, revision: Optional[str] = None, **kwargs):
    """Load the UNet (``unet/`` subfolder or a bare UNet directory/repo) and its scheduler config."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    def _load_unet(subfolder):
        errors = []
        for cls in (UNet2DModel, UNet2DConditionModel):
            try:
                return cls.from_pretrained(base, subfolder=subfolder, revision=revision, **kwargs)
            except (OSError, ValueError, EnvironmentError) as e:  # wrong class or no such folder
                errors.append(e)
        raise errors[-1]

    unet = None
    for subfolder in ("unet", None):
        try:
            unet = _load_unet(subfolder)
            break
        except (OSError, ValueError, EnvironmentError) as e:
            last = e
    if unet is None:
        raise ValueError(
            f"Could not load a diffusers UNet from {base!r} (tried the 'unet' subfolder and the root): {last}. "
            "Pass a diffusers pipeline directory/repo with a unet/ folder, or a bare UNet directory."
        ) from last
    try:
        scheduler_config = DDPMScheduler.load_config(base, subfolder="scheduler", revision=revision, **kwargs)
    except (OSError, ValueError, EnvironmentError):
        try:
            scheduler_config = DDPMScheduler.load_config(base, revision=revision, **kwargs)
            if "num_train_timesteps" not in scheduler_config:
                raise ValueError("no scheduler config")
        except (OSError, ValueError, EnvironmentError):
            scheduler_config = DDPMScheduler().config
    return unet, scheduler_config


def load_saved_unet(path: str, **kwargs) -> Any:
    """A UNet saved with ``save_pretrained``, as the diffusers class recorded in its ``config.json``."""
    import diffusers

    with open(os.path.join(path, "config.json")) as f:
        class_name = json.load(f).get("_class_name", "UNet2DModel")
    if class_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"{path} holds a {class_name}; SAMIPipeline supports UNet2DModel and UNet2DConditionModel.")
    return getattr(diffusers, class_name).from_pretrained(path, **kwargs)


# ---------------------------------------------------------------------------- the pickle rule
WEIGHTS_NAME, PICKLED_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"


def check_no_pickle(folder: str, use_safetensors: Optional[bool]) -> None:
    """Refuse a local model folder whose weights exist only as a pickle, unless ``use_safetensors=False``.

    Loading a ``.bin`` file unpickles it, which can run arbitrary code from the file.
    """
    if use_safetensors is False or not os.path.isdir(folder):
        return
    if not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) and os.path.isfile(os.path.join(folder, PICKLED_WEIGHTS_NAME)):
        raise ValueError(
            f"{folder} holds its weights only as a pickle ({PICKLED_WEIGHTS_NAME}); sami-adapter loads safetensors only, "
            "because unpickling can run code from the file. Convert it (load and save_pretrained), or pass "
            "use_safetensors=False if you trust the file."
        )


# ---------------------------------------------------------------------------- latent-diffusion components
def _read_model_index(base: str, revision: Optional[str], **kwargs) -> Dict[str, Any]:
    local = os.path.join(base, "model_index.json")
    if os.path.isdir(base):
        if not os.path.isfile(local):
            return {}
        with open(local) as f:
            return json.load(f)
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(base, revision=revision, **kwargs))
    except (OSError, ValueError, EnvironmentError):  # no pipeline index: a bare UNet repo
        return {}


def load_latent_components(
    base: str,
    revision: Optional[str] = None,
    components: Iterable[str] = LATENT_COMPONENTS,
    torch_dtype: Optional[torch.dtype] = None,
    **kwargs,
) -> Dict[str, Any]:
    """Load the VAE, text encoder and tokenizer of a full diffusers pipeline (repo id or local directory).

    The base's ``model_index.json`` says which components exist and their classes (e.g.
    ``"vae": ["diffusers", "AutoencoderKL"]``); each one listed in ``components`` is loaded from its
    subfolder. A base without ``model_index.json`` (a bare UNet), or whose index lists a component as
    ``null``, simply yields fewer entries, so a pixel-space base returns ``{}``.

    Args:
        base: repo id or local path of the base model.
        revision: Hub revision.
        components: which of ``"vae"``, ``"text_encoder"``, ``"tokenizer"`` to load.
        torch_dtype: dtype for the VAE and text encoder.
        kwargs: passed to every ``from_pretrained`` (e.g. ``cache_dir``, ``local_files_only``).

    Returns:
        ``{name: component}`` for the components that the base has.

    Raises:
        ValueError: a component's class comes from a library other than diffusers or transformers.
    """
    index = _read_model_index(base, revision, **hub_kwargs(kwargs))
    loaded: Dict[str, Any] = {}
    for name in components:
        entry = index.get(name)
        if not entry or entry[0] is None or entry[1] is None:
            continue
        library, class_name = entry
        if library not in _ALLOWED_LIBRARIES:
            raise ValueError(
                f"The base model's {name} is a {library}.{class_name}; only diffusers and transformers components are "
                f"loaded automatically. Load it yourself and pass `{name}=...`."
            )
        cls = getattr(importlib.import_module(library), class_name)
        extra = dict(kwargs)
        if torch_dtype is not None and name != "tokenizer":
            extra["torch_dtype"] = torch_dtype
        loaded[name] = cls.from_pretrained(base, subfolder=name, revision=revision, **extra)
    return loaded
