"""What a SAMI adapter is on disk, peft-style: the trained parts plus a reference to the base model.

    adapter_dir/
      sami_adapter_config.json      base model (repo id or path, revision), UNet mode, training summary
      encoder/                      SAMIEncoder (config.json + diffusion_pytorch_model.safetensors)
      unet_lora/                    only for --unet_mode lora, peft's format: adapter_config.json + adapter_model.safetensors
                                    (``PeftModel.from_pretrained(base_unet, "unet_lora")``); a text-conditioned UNet
                                    also gets diffusers' pytorch_lora_weights.safetensors (``pipe.load_lora_weights``)
      unet/                         only for --unet_mode full: the jointly trained UNet
      README.md                     model card

The base UNet is never copied for frozen or LoRA adapters: :func:`load_adapter_components` (what
``SAMIPipeline.from_pretrained(adapter_dir)`` calls) resolves it from the reference. Weights are
always read with safetensors (nothing is unpickled). Adapters written before the peft format
(``unet_lora/lora_config.json`` + raw peft keys in ``pytorch_lora_weights.safetensors``) still load; :mod:`sami_adapter.lora`
reads and writes that folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Union

import torch

from .base_model import (
    HUB_KWARGS,
    check_no_pickle,
    hub_id,
    hub_kwargs,
    is_text_conditioned,
    load_base_unet_and_scheduler,
    load_latent_components,
    load_saved_unet,
)
from .lora import load_lora, lora_state_dict, merge_lora as _merge_lora_layers, save_lora

ADAPTER_CONFIG_NAME = "sami_adapter_config.json"
LORA_DIR = "unet_lora"


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))


def resolve_adapter_dir(name_or_path: str, revision: Optional[str] = None, **hub_kwargs) -> Optional[str]:
    """A local directory holding an adapter, downloading a Hub repo if needed; None if it is no adapter.

    ``revision`` picks a version of a Hub repo; a local adapter directory has none, so a revision
    given with one raises a ValueError instead of being ignored.
    """
    if os.path.isdir(name_or_path):
        if not is_adapter_dir(name_or_path):
            return None
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} selects a version of a Hub repo, but {name_or_path!r} is a local adapter directory; "
                "check out that version there, or load the Hub repo id."
            )
        return name_or_path
    if os.path.exists(name_or_path):
        return None
    from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        hf_hub_download(name_or_path, ADAPTER_CONFIG_NAME, revision=revision, **hub_kwargs)
    except LocalEntryNotFoundError as e:  # first: it is a subclass of EntryNotFoundError
        # Offline (HF_HUB_OFFLINE, local_files_only) or no connection: a diffusers pipeline already in the cache may
        # still load; anything else fails here, with the Hub's own reason, not later as a puzzling pipeline error.
        cached = try_to_load_from_cache(name_or_path, "model_index.json", cache_dir=hub_kwargs.get("cache_dir"), revision=revision)
        if isinstance(cached, str):
            return None
        raise OSError(
            f"{name_or_path!r} is not a local folder and could not be fetched from the Hub ({e}). Check the connection "
            "(or unset HF_HUB_OFFLINE / local_files_only), or pass the path of a downloaded adapter."
        ) from e
    except (HFValidationError, EntryNotFoundError):  # not a repo id, or a repo without an adapter: a diffusers pipeline
        return None
    # Authentication (401), gated or missing repos and network errors propagate with huggingface_hub's own message.
    return snapshot_download(name_or_path, revision=revision, **hub_kwargs)


def read_adapter_config(adapter_dir: str) -> Dict[str, Any]:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the adapter directory is corrupt, re-save or re-download it.") from e


UNET_MODES = ("frozen", "lora", "full")


def resolve_base_path(config: Dict[str, Any], adapter_dir: str) -> str:
    """The base model as a local path when it is one, else the Hub repo id.

    A local base is looked for relative to the adapter (how ``finetune.py`` records it), then at the
    absolute path recorded when the adapter was saved (``base_model_abspath``: found again after the
    adapter folder was moved), then as given (relative to the working directory, as diffusers does).

    Raises:
        ValueError: the config names no base, or names a local base that is in none of those places.
    """
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{ADAPTER_CONFIG_NAME} in {adapter_dir} names no base_model_name_or_path.")
    recorded = config.get("base_model_abspath")
    candidates = [os.path.normpath(os.path.join(adapter_dir, base))] + ([recorded] if recorded else []) + [base]
    for candidate in candidates:
        if os.path.isdir(candidate):
            return candidate
    if recorded or os.path.isabs(base) or base.startswith((".", os.sep)):
        raise ValueError(
            f"The base model of the adapter in {adapter_dir} is a local folder that is not there any more "
            f"(looked in {', '.join(dict.fromkeys(candidates))}). Put it back, pass unet=... (and scheduler=...), "
            f"or set base_model_name_or_path in {ADAPTER_CONFIG_NAME}."
        )
    return base


# ---------------------------------------------------------------------------- saving
ADAPTER_PARTS = (ADAPTER_CONFIG_NAME, "encoder", LORA_DIR, "unet", "README.md")


def check_finite_weights(module: torch.nn.Module, what: str) -> None:
    """Raise a ValueError naming the first parameter or buffer of ``module`` that holds NaN or inf."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"The {what} has non-finite values in {name!r}: training diverged (lower the learning rate). "
                "Nothing was written."
            )


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def local_base_abspath(base: Optional[str], adapter_dir: str) -> Optional[str]:
    """The absolute path of a local base model (relative to the adapter, or to the working directory); None for a Hub id."""
    if base:
        for candidate in (os.path.normpath(os.path.join(adapter_dir, base)), base):
            if os.path.isdir(candidate):
                return os.path.abspath(candidate)
    return None


def save_adapter(
    output_dir: str,
    encoder: Any,
    base_model_name_or_path: str,
    revision: Optional[str] = None,
    unet: Optional[torch.nn.Module] = None,
    unet_mode: str = "frozen",
    lora_config: Any = None,
    extra: Optional[Dict[str, Any]] = None,
    model_card: Optional[str] = None,
    lora_weights: Optional[Dict[str, torch.Tensor]] = None,
) -> str:
    """Write an adapter into ``output_dir``; an older adapter there is replaced only by a complete new one.

    The new adapter is written in full to a temporary folder next to ``output_dir``; then whatever
    else lives in ``output_dir`` (checkpoints, logs, reports) is moved into that folder and the two
    folders trade places in one atomic rename. Until that rename the old adapter is untouched; an
    error or an interrupt before it leaves ``output_dir`` as it was.

    Args:
        output_dir: destination; other files there (checkpoints, logs) are kept, an older adapter is replaced.
        encoder: the trained :class:`SAMIEncoder`.
        base_model_name_or_path: repo id or local path of the base model (what ``from_pretrained`` loads).
            A relative local path is taken relative to ``output_dir`` when the adapter is loaded.
        revision: Hub revision of the base model.
        unet: the UNet, needed for ``unet_mode`` ``"lora"`` (its LoRA weights are saved) and ``"full"``.
        unet_mode: ``"frozen"``, ``"lora"`` or ``"full"``.
        lora_config: the peft ``LoraConfig`` used (for ``"lora"``).
        lora_weights: the LoRA weights (``get_peft_model_state_dict`` keys); default: those injected in ``unet``.
        extra: more JSON-serialisable facts for the config (training arguments, metrics).
        model_card: Markdown text for README.md.

    Raises:
        ValueError: unknown ``unet_mode``, a missing ``unet``/``lora_config``, or weights with NaN or inf.
    """
    if unet_mode not in UNET_MODES:
        raise ValueError(f"unet_mode must be one of {', '.join(UNET_MODES)}, got {unet_mode!r}.")
    if unet_mode == "lora" and (unet is None or lora_config is None):
        raise ValueError("unet_mode='lora' needs the unet and its lora_config.")
    if unet_mode == "full" and unet is None:
        raise ValueError("unet_mode='full' needs the trained unet.")
    check_finite_weights(encoder, "encoder")
    if unet_mode == "full":
        check_finite_weights(unet, "UNet")
    if unet_mode == "lora" and lora_weights is None:
        lora_weights = lora_state_dict(unet)
    if lora_weights is not None:
        bad = [k for k, v in lora_weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"The LoRA weights have non-finite values in {bad[0]!r}: training diverged. Nothing was written.")
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-adapter-", dir=parent)
    moved = []  # entries of output_dir moved into tmp, to put back if the swap does not happen
    swapped = False
    try:
        encoder.save_pretrained(os.path.join(tmp, "encoder"))
        base_abspath = local_base_abspath(base_model_name_or_path, output_dir)
        if unet_mode == "lora":
            save_lora(os.path.join(tmp, LORA_DIR), unet, lora_config, lora_weights, None if base_abspath else hub_id(base_model_name_or_path))
        elif unet_mode == "full":
            unet.save_pretrained(os.path.join(tmp, "unet"))
        config = {
            "base_model_name_or_path": base_model_name_or_path,
            "revision": revision,
            "unet_mode": unet_mode,
            "latent_dim": encoder.config.latent_dim,
            **(extra or {}),
        }
        if base_abspath:  # a local base is also recorded absolutely, to be found after the adapter moves
            config["base_model_abspath"] = base_abspath
        with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, default=str)
        if model_card:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(model_card)
        if not os.path.isdir(output_dir):
            os.replace(tmp, output_dir)  # nothing to keep: the finished folder is renamed into place
            swapped = True
            return output_dir
        # The rest of output_dir (checkpoints, logs, reports) joins the new adapter, then the folders trade places.
        for name in sorted(os.listdir(output_dir)):
            if name not in ADAPTER_PARTS:
                os.replace(os.path.join(output_dir, name), os.path.join(tmp, name))
                moved.append(name)
        if not _exchange(tmp, output_dir):
            # No atomic exchange on this system: two renames; if the second fails the first is undone.
            old = tmp + "-old"
            os.replace(output_dir, old)
            try:
                os.replace(tmp, output_dir)
            except BaseException:
                os.replace(old, output_dir)
                raise
            tmp = old
        swapped = True
    finally:
        if not swapped:
            for name in reversed(moved):  # put the other files back where they were
                os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def update_adapter_config(output_dir: str, extra: Dict[str, Any], model_card: Optional[str] = None) -> None:
    """Add ``extra`` to a saved adapter's config (and replace its model card), each file replaced atomically."""
    config = {**read_adapter_config(output_dir), **extra}
    for name, text in ((ADAPTER_CONFIG_NAME, json.dumps(config, indent=2, default=str)), ("README.md", model_card)):
        if text is None:
            continue
        target = os.path.join(output_dir, name)
        with open(target + ".tmp", "w") as f:
            f.write(text)
        os.replace(target + ".tmp", target)


# ---------------------------------------------------------------------------- loading
LOAD_KWARGS = HUB_KWARGS + ("revision", "torch_dtype", "unet", "scheduler", "merge_lora", "vae", "text_encoder", "tokenizer", "use_safetensors")


def check_load_kwargs(kwargs: Dict[str, Any]) -> None:
    """Raise a TypeError for a keyword that loading an adapter would otherwise silently drop."""
    unknown = sorted(set(kwargs) - set(LOAD_KWARGS))
    if unknown:
        raise TypeError(
            f"Loading a SAMI adapter got unexpected keyword argument(s) {unknown}; it accepts {', '.join(LOAD_KWARGS)}."
        )


def load_adapter_components(
    adapter_dir: str,
    unet: Any = None,
    scheduler: Any = None,
    merge_lora: bool = True,
    torch_dtype: Optional[torch.dtype] = None,
    vae: Any = None,
    text_encoder: Any = None,
    tokenizer: Any = None,
    cache_dir: Optional[str] = None,
    local_files_only: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    use_safetensors: Optional[bool] = None,
) -> Dict[str, Any]:
    """The components of a SAMI pipeline (``unet``, ``scheduler``, ``encoder``, ``vae``, ``text_encoder``,
    ``tokenizer``) for a local adapter directory.

    The adapter directory never holds the base weights: the UNet, scheduler config and, for a latent
    diffusion base (a full pipeline whose ``model_index.json`` lists them), the VAE, text encoder and
    tokenizer are loaded from the recorded ``base_model_name_or_path`` at the recorded ``revision``.

    Args:
        adapter_dir: directory with ``sami_adapter_config.json`` and ``encoder/``.
        unet: use this base UNet instead of loading the referenced one. A LoRA adapter's weights are
            applied to it (in place; merged with ``merge_lora``). A full-UNet adapter refuses it: its
            own trained UNet would be dropped.
        scheduler: use this scheduler instead of DDIM built from the base model's scheduler config.
        merge_lora: fold LoRA weights into the UNet after loading them.
        torch_dtype: load the encoder, UNet, VAE and text encoder in this dtype.
        vae, text_encoder, tokenizer: use these instead of the base model's.
        cache_dir, local_files_only, token: passed to every Hub download of the base model.
        use_safetensors: None or True (the default) loads safetensors weights only and refuses
            pickled ``.bin`` weights; False allows them (unpickling runs code from the file).

    Raises:
        ValueError: an unknown ``unet_mode`` in the config, ``unet=`` with a full-UNet adapter, a
            missing local base, or pickled weights without ``use_safetensors=False``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    from .encoder import SAMIEncoder

    hub = hub_kwargs({"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token})
    safe = {} if use_safetensors is False else {"use_safetensors": True}  # opted in: diffusers' default, safetensors first
    config = read_adapter_config(adapter_dir)
    mode = config.get("unet_mode", "frozen")
    if mode not in UNET_MODES:
        raise ValueError(
            f"{ADAPTER_CONFIG_NAME} in {adapter_dir} has unet_mode {mode!r}; expected one of {', '.join(UNET_MODES)}. "
            "The adapter was written by another tool or version, or the file was edited."
        )
    if mode == "full" and unet is not None:
        raise ValueError(
            f"The adapter in {adapter_dir} carries its own trained UNet (unet_mode 'full'); unet= would replace it and drop "
            "what was trained. Leave unet out."
        )
    check_no_pickle(os.path.join(adapter_dir, "encoder"), use_safetensors)
    encoder = SAMIEncoder.from_pretrained(os.path.join(adapter_dir, "encoder"), **safe)
    base = resolve_base_path(config, adapter_dir) if config.get("base_model_name_or_path") else None
    revision = config.get("revision")
    scheduler_config = None
    unet_from_base = unet is None
    if unet is None:
        if mode == "full":
            check_no_pickle(os.path.join(adapter_dir, "unet"), use_safetensors)
            unet = load_saved_unet(os.path.join(adapter_dir, "unet"), **safe)
            scheduler_config = load_base_unet_and_scheduler(base, revision, **hub, **safe)[1] if base else None
        else:
            if base is None:
                resolve_base_path(config, adapter_dir)  # raises the "names no base" error
            check_no_pickle(os.path.join(base, "unet"), use_safetensors)
            check_no_pickle(base, use_safetensors)
            unet, scheduler_config = load_base_unet_and_scheduler(base, revision, **hub, **safe)
    if mode == "lora":  # also onto a UNet passed in: it is the base the LoRA weights belong to
        load_lora(unet, os.path.join(adapter_dir, LORA_DIR))
        if merge_lora:
            _merge_lora_layers(unet)
    if scheduler is None:
        scheduler = DDIMScheduler.from_config(scheduler_config or DDPMScheduler().config, clip_sample=False)

    # Latent-diffusion components come from the base pipeline, never from the adapter directory.
    components = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    missing = [name for name, component in components.items() if component is None]
    # With an explicit UNet, only look the base up when it is local or the UNet needs text.
    look_up = unet_from_base or os.path.isdir(base or "") or is_text_conditioned(unet)
    if base is not None and missing and look_up:
        components.update(load_latent_components(base, revision, components=missing, **hub))
    if torch_dtype is not None:
        for module in (encoder, unet, components["vae"], components["text_encoder"]):
            if isinstance(module, torch.nn.Module):
                module.to(dtype=torch_dtype)
    return {"unet": unet, "scheduler": scheduler, "encoder": encoder, **components}
