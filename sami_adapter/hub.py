"""Loading and sharing an adapter: the pipeline's ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``
(:class:`AdapterPipelineMixin`), writing an adapter again from a loaded pipeline, and uploading a folder to the Hub.

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
    check_load_kwargs,
    load_adapter_components,
    read_adapter_config,
    resolve_adapter_dir,
    save_adapter,
    update_adapter_config,
)
from .base_model import hub_kwargs
from .card import adapter_model_card
from .lora import has_lora_layers, lora_state_dict, merge_lora, read_lora

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


class AdapterPipelineMixin:
    """``from_pretrained``, ``save_pretrained`` and ``push_to_hub`` of :class:`~sami_adapter.SAMIPipeline`, for a
    pipeline that is an adapter: loaded from its folder or repo, saved and shared as that adapter again.
    Anything else goes to ``DiffusionPipeline``'s own methods (the next class in the pipeline's bases)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> Any:
        """Load a saved pipeline, or an adapter directory/repo (see :mod:`sami_adapter.adapter`).

        An adapter holds only the trained parts and a reference to its base model; the base UNet and
        scheduler are loaded from that reference (``unet=`` / ``scheduler=`` override them), LoRA
        weights are applied and, with ``merge_lora=True`` (default), folded into the UNet. When the
        base is a full latent-diffusion pipeline, its ``vae``, ``text_encoder`` and ``tokenizer`` are
        loaded from it too (or passed explicitly). Any other directory or repo goes to
        ``DiffusionPipeline.from_pretrained``.

        For an adapter the keywords are those of :func:`~sami_adapter.adapter.load_adapter_components`
        plus ``revision`` (of the adapter repo; the base model is loaded at the revision the adapter
        records). ``cache_dir``, ``local_files_only`` and ``token`` apply to the adapter repo and to the
        base model; ``torch_dtype`` to every model. Any other keyword raises a TypeError.

        Weights are read from safetensors only; pickled ``.bin`` weights are refused unless
        ``use_safetensors=False`` is passed (unpickling can run code from the file).
        """
        path = str(pretrained_model_name_or_path)
        hub = hub_kwargs(kwargs)
        adapter_dir = resolve_adapter_dir(path, revision=kwargs.get("revision"), **hub)
        if adapter_dir is None:
            if kwargs.get("use_safetensors") is not False:
                kwargs["use_safetensors"] = True
            else:
                kwargs.pop("use_safetensors")  # opted in: diffusers' default, safetensors first, pickles allowed
            return super().from_pretrained(path, **kwargs)
        check_load_kwargs(kwargs)
        kwargs.pop("revision", None)
        pipe = cls(**load_adapter_components(adapter_dir, **kwargs))
        pipe._adapter_dir = adapter_dir  # save_pretrained / push_to_hub write the adapter again, not the base
        return pipe

    def save_pretrained(self, save_directory: Union[str, os.PathLike], save_base: bool = False, **kwargs) -> None:
        """Save the pipeline. Loaded from an adapter, it is saved as an adapter again (encoder, LoRA or
        trained UNet, config with the reference to the base model, model card; :func:`~sami_adapter.adapter.save_adapter`),
        without the base model's weights unless ``save_base=True``.

        Otherwise (or with ``save_base=True``) this is ``DiffusionPipeline.save_pretrained``; a UNet
        that still carries unmerged LoRA layers (``from_pretrained(adapter, merge_lora=False)``) is
        saved with the LoRA folded into a copy, so that the folder loads back as a plain UNet with
        the same outputs. ``push_to_hub=True`` (with ``repo_id``, ``private``, ``token``,
        ``commit_message``, ``create_pr``) then uploads the folder, as in diffusers.
        """
        if getattr(self, "_adapter_dir", None) is not None and not save_base:
            push = kwargs.pop("push_to_hub", False)
            hub = {k: kwargs.pop(k) for k in ("repo_id", "private", "token", "commit_message", "create_pr") if k in kwargs}
            if kwargs.get("safe_serialization", True):  # safetensors is what an adapter is written in anyway
                kwargs.pop("safe_serialization", None)
            if kwargs:
                raise TypeError(
                    f"save_pretrained of an adapter got {sorted(kwargs)}; an adapter is written as safetensors as it is. "
                    "Pass save_base=True to save the whole pipeline with diffusers' options."
                )
            repo_id = hub.get("repo_id") or os.path.basename(os.path.normpath(str(save_directory)))
            save_adapter_from_pipeline(self, str(save_directory), self._adapter_dir, repo_id if push else None)
            if push:
                upload_to_hub(str(save_directory), repo_id, **{k: v for k, v in hub.items() if k != "repo_id"})
            return None
        if not has_lora_layers(self.unet):
            return super().save_pretrained(save_directory, **kwargs)
        import copy

        unet = self.unet
        self.register_modules(unet=merge_lora(copy.deepcopy(unet)))
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self.register_modules(unet=unet)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[Union[str, bool]] = None,
        create_pr: bool = False,
        save_base: bool = False,
        **kwargs,
    ) -> Any:
        """Upload to the Hub repo ``repo_id`` (created if needed), as ``diffusers``' ``push_to_hub``.

        A pipeline loaded from an adapter uploads the adapter only (what :meth:`save_pretrained`
        writes: encoder, LoRA, config, model card), never the base model's weights unless
        ``save_base=True``. Authentication and network errors are raised with ``huggingface_hub``'s
        own message.
        """
        if getattr(self, "_adapter_dir", None) is None or save_base:
            source, self._adapter_dir = getattr(self, "_adapter_dir", None), None  # diffusers' save_pretrained writes everything
            try:
                return super().push_to_hub(repo_id, commit_message=commit_message, private=private, token=token, create_pr=create_pr,
                                           **kwargs)
            finally:
                self._adapter_dir = source
        import tempfile

        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "adapter")
            save_adapter_from_pipeline(self, folder, self._adapter_dir, repo_id)
            return upload_to_hub(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr, create=False)
