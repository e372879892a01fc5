"""Sharing an adapter: write it again from a loaded pipeline, and upload a folder to the Hub.

A pipeline loaded from an adapter is shared as that adapter (encoder, LoRA or trained UNet, config
with the reference to the base model, model card, report pictures), never with the base model's
weights: those stay where the base model is.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional, Sequence, Union

from .adapter import (
    ADAPTER_CONFIG_NAME,
    LORA_DIR,
    has_lora_layers,
    lora_state_dict,
    read_adapter_config,
    read_lora,
    save_adapter,
    update_adapter_config,
)
from .card import adapter_model_card

# What the adapter's own config holds; everything else in it (training arguments, metrics) is carried over as is.
_OWN_KEYS = ("base_model_name_or_path", "base_model_abspath", "revision", "unet_mode", "latent_dim")
_REPORT_SUFFIXES = (".png", ".json", ".md")  # the training report: small pictures and numbers


def _base_reference(config: dict, source_dir: str) -> str:
    """The base as the new adapter should name it: a Hub id unchanged, a local folder by its absolute path
    (a path relative to the old adapter folder would point elsewhere from the new one)."""
    from .adapter import local_base_abspath

    base = config.get("base_model_name_or_path")
    return local_base_abspath(base, source_dir) or config.get("base_model_abspath") or base


def _copy_report(source: str, target: str) -> None:
    """The pictures and numbers of a report folder (not its caches or anything large)."""
    if not os.path.isdir(source) or os.path.abspath(source) == os.path.abspath(target):
        return
    os.makedirs(target, exist_ok=True)
    for name in sorted(os.listdir(source)):
        if name.endswith(_REPORT_SUFFIXES) and os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(target, name))


def save_adapter_from_pipeline(pipe: Any, output_dir: str, source_dir: str, repo_id: Optional[str] = None) -> str:
    """Write the adapter that ``pipe`` was loaded from (``source_dir``) into ``output_dir``, with the pipeline's
    current encoder (and UNet, for a full-UNet adapter) and a model card; no base model weights.

    LoRA weights come from the pipeline's UNet when it still carries LoRA layers (``merge_lora=False``),
    else from the source adapter (a merged UNet no longer separates them from the base).
    """
    config = read_adapter_config(source_dir)
    mode = config.get("unet_mode", "frozen")
    lora_config = lora_weights = None
    if mode == "lora":
        lora_config, lora_weights = read_lora(os.path.join(source_dir, LORA_DIR))
        if has_lora_layers(pipe.unet):
            lora_weights = lora_state_dict(pipe.unet)
    extra = {k: v for k, v in config.items() if k not in _OWN_KEYS}
    save_adapter(output_dir, pipe.encoder, _base_reference(config, source_dir), revision=config.get("revision"), unet=pipe.unet,
                 unet_mode=mode, lora_config=lora_config, lora_weights=lora_weights, extra=extra)
    for folder in ("report", "evaluation"):  # the training and evaluation reports: the card shows them
        _copy_report(os.path.join(source_dir, folder), os.path.join(output_dir, folder))
    card = adapter_model_card(read_adapter_config(output_dir), output_dir, repo_id)
    update_adapter_config(output_dir, {}, str(card))
    return output_dir


def upload_to_hub(
    folder: str,
    repo_id: str,
    token: Optional[Union[str, bool]] = None,
    private: Optional[bool] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    create: bool = True,
    ignore: Sequence[str] = (),
) -> Any:
    """Upload ``folder`` to the Hub model repo ``repo_id`` (created first unless ``create=False``).

    Checkpoints, logs, temporary folders and latent caches that a training run leaves next to the
    adapter are not uploaded, nor what ``ignore`` adds (glob patterns, e.g. a logging folder elsewhere than logs/).
    Errors (no login, no rights, no connection) are huggingface_hub's own.
    """
    from huggingface_hub import create_repo, upload_folder

    if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME)):
        raise ValueError(f"{folder} holds no {ADAPTER_CONFIG_NAME}: it is not an adapter folder, so there is nothing to upload.")
    if create:
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return upload_folder(repo_id=repo_id, folder_path=folder, token=token, commit_message=commit_message or "SAMI adapter",
                         create_pr=create_pr, ignore_patterns=["checkpoint-*", "logs/*", ".tmp-*", "latent_cache/*", *ignore])
