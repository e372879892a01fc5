"""LoRA on the base UNet, through peft: injecting it, its weights in peft's and diffusers' formats, loading and merging.

A LoRA adapter's ``unet_lora/`` folder (:mod:`sami_adapter.adapter`) holds

    adapter_config.json + adapter_model.safetensors    peft's format: ``PeftModel.from_pretrained(base_unet, "unet_lora")``
    pytorch_lora_weights.safetensors                   diffusers' format, for a text-conditioned UNet: ``pipe.load_lora_weights``

and the layout written before the peft format (``lora_config.json`` + raw peft keys) still loads.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from .base_model import is_text_conditioned

PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"  # peft's save_pretrained names
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix: PeftModel.from_pretrained expects it in the file
DIFFUSERS_LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' load_lora_weights default
LEGACY_LORA_CONFIG_NAME = "lora_config.json"  # the layout before the peft format: raw peft keys + this config


def add_lora(unet: torch.nn.Module, rank: int = 4, alpha: Optional[float] = None, target_modules=None) -> Any:
    """Inject peft LoRA layers into ``unet`` (in place) and return the ``LoraConfig``.

    Default targets cover every conv/linear of a ``UNet2DModel`` ResNet block and, when present,
    the attention projections: ``conv1``, ``conv2``, ``time_emb_proj``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if target_modules is None:
        names = [n for n, _ in unet.named_modules()]
        wanted = ["conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0"]
        target_modules = [t for t in wanted if any(n == t or n.endswith("." + t) for n in names)]
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules), init_lora_weights=True)
    inject_adapter_in_model(config, unet)
    return config


def lora_state_dict(unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_lora(lora_dir: str, unet: torch.nn.Module, lora_config: Any, weights: Optional[Dict[str, torch.Tensor]] = None,
              base_model: Optional[str] = None) -> None:
    """Write LoRA weights in peft's format and, for a text-conditioned UNet, also in diffusers' format.

    ``adapter_config.json`` + ``adapter_model.safetensors`` (keys prefixed ``base_model.model.``, as
    ``PeftModel.save_pretrained`` writes them) load with ``PeftModel.from_pretrained(base_unet, lora_dir)``.
    ``pytorch_lora_weights.safetensors`` (keys prefixed ``unet.``, the LoRA config in its metadata) is
    written by diffusers' own ``StableDiffusionPipeline.save_lora_weights``, so ``load_lora_weights``
    reads it. ``weights`` defaults to the LoRA layers injected in ``unet``.
    """
    weights = lora_state_dict(unet) if weights is None else weights
    os.makedirs(lora_dir, exist_ok=True)
    save_file({PEFT_PREFIX + k: v for k, v in weights.items()}, os.path.join(lora_dir, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(lora_config)
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    config.save_pretrained(lora_dir)
    if is_text_conditioned(unet):
        from diffusers import StableDiffusionPipeline

        metadata = {k: v for k, v in config.to_dict().items() if k in ("r", "lora_alpha", "target_modules", "use_dora", "lora_bias")}
        StableDiffusionPipeline.save_lora_weights(lora_dir, unet_lora_layers=weights, unet_lora_adapter_metadata=metadata,
                                                  weight_name=DIFFUSERS_LORA_WEIGHTS_NAME, safe_serialization=True)


def read_lora(lora_dir: str) -> tuple:
    """``(LoraConfig, weights)`` of a saved LoRA, the weights keyed as ``get_peft_model_state_dict`` keys them.

    Reads peft's format, or the layout written before it (``lora_config.json`` + raw keys).
    """
    from peft import LoraConfig

    if os.path.isfile(os.path.join(lora_dir, PEFT_CONFIG_NAME)):
        config = LoraConfig.from_pretrained(lora_dir)
        state = load_file(os.path.join(lora_dir, PEFT_WEIGHTS_NAME))
        return config, {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in state.items()}
    legacy = os.path.join(lora_dir, LEGACY_LORA_CONFIG_NAME)
    if not os.path.isfile(legacy):
        raise ValueError(
            f"{lora_dir} holds no LoRA config ({PEFT_CONFIG_NAME}, or {LEGACY_LORA_CONFIG_NAME} of older adapters); "
            "the adapter is incomplete, re-save or re-download it."
        )
    with open(legacy) as f:
        cfg = json.load(f)
    config = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
    return config, load_file(os.path.join(lora_dir, DIFFUSERS_LORA_WEIGHTS_NAME))


def load_lora(unet: torch.nn.Module, lora_dir: str) -> None:
    """Inject LoRA layers described by ``lora_dir`` into ``unet`` and load their weights (either layout)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    config, state = read_lora(lora_dir)
    inject_adapter_in_model(config, unet)
    result = set_peft_model_state_dict(unet, state)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise ValueError(
            f"LoRA weights in {lora_dir} do not fit this UNet (unexpected keys, e.g. {unexpected[:3]}): "
            "the adapter was trained for another base model."
        )


def has_lora_layers(module: Any) -> bool:
    """Whether ``module`` holds injected (unmerged) peft LoRA layers."""
    if not isinstance(module, torch.nn.Module):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold every injected LoRA layer into its base weight and put the plain layer back.

    The result is an ordinary UNet: ``save_pretrained`` then writes plain keys (no ``base_layer``
    keys that a later plain load would silently re-initialise) and sampling pays no LoRA overhead.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, module.get_base_layer())
    return unet
