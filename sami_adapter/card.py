"""The model card (README.md) of an adapter, built with ``huggingface_hub.ModelCard``.

Its metadata says what the Hub needs to file the adapter: ``library_name`` this package, the base
model as a Hub id (left out when the base is a local folder: a path means nothing on the Hub),
tags. The text holds the training report's numbers and pictures (when the adapter folder has them)
and how to load it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from .base_model import hub_id
from .encoder import ACTIVE_KL_NATS, TRAVERSAL_RANGE

LIBRARY_NAME = "sami-adapter"
TAGS = ["sami-adapter", "diffusers", "representation-learning", "diffusion", "autoencoder"]
REPORT_PICTURES = (("reconstructions.png", "Held-out inputs (top) and reconstructions from the posterior mean"),
                   ("traversals.png", f"One row per active dimension: that coordinate moved from {-TRAVERSAL_RANGE:g} to {TRAVERSAL_RANGE:g}, all else fixed"))


def _number_lines(metrics: Dict[str, Any]) -> List[str]:
    """Markdown bullet lines for the numbers a reader compares adapters by, those that were measured."""
    lines = []
    if "relative_guidance_gain" in metrics:
        lines.append(f"- guidance gain (denoising error the code removes, held-out images): {metrics['relative_guidance_gain']:.1%}")
    if "kl_per_dim" in metrics:
        kl = ", ".join(f"{v:.2f}" for v in metrics["kl_per_dim"])
        lines.append(f"- KL per dimension (nats; information each code coordinate carries): {kl}")
    if "active_dims" in metrics:
        lines.append(f"- active dimensions (KL > {ACTIVE_KL_NATS:g} nats): {metrics['active_dims']}")
    for key, label in (("reconstruction_r2", "reconstruction R² (image moments, input vs decode)"),
                       ("reconstruction_r2_scaled", f"reconstruction R² at sami_scale {metrics.get('reconstruction_sami_scale')}")):
        if isinstance(metrics.get(key), dict):
            lines.append(f"- {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics[key].items()))
    if "mig" in metrics:
        lines.append(f"- MIG: {metrics['mig']:.3f}")
    if isinstance(metrics.get("dci"), dict) and "disentanglement" in metrics["dci"]:
        lines.append(f"- DCI disentanglement: {metrics['dci']['disentanglement']:.3f}")
    usefulness = metrics.get("usefulness")
    if isinstance(usefulness, dict) and "linear_probe" in usefulness:
        f, k = usefulness.get("num_folds", 5), usefulness.get("k", 5)
        lines.append(f"- usefulness for the label ({usefulness.get('label', 'class')}; {usefulness.get('num_classes')} classes, "
                     f"{usefulness.get('num_test')} held-out images): linear probe {usefulness['linear_probe']:.3f} "
                     f"({f}-fold CV {usefulness.get(f'linear_probe_cv{f}', float('nan')):.3f}), kNN (k={k}) {usefulness['knn']:.3f} "
                     f"({f}-fold CV {usefulness.get(f'knn_cv{f}', float('nan')):.3f}); the most common class alone "
                     f"{usefulness.get('majority_class', float('nan')):.3f}")
    if "train_seconds" in metrics:
        lines.append(f"- training time: {metrics['train_seconds']:.0f} s")
    return lines


def evaluation_metrics(adapter_dir: Optional[str]) -> Dict[str, Any]:
    """MIG and DCI (a dataset with ground-truth factors) and the usefulness for a label (labelled data) from
    ``evaluation/report.json``, what ``examples/evaluate.py --output_dir ADAPTER/evaluation`` writes; or {}."""
    import json

    path = os.path.join(adapter_dir or "", "evaluation", "report.json")
    if not adapter_dir or not os.path.isfile(path):
        return {}
    with open(path) as f:
        report = json.load(f)
    metrics = report.get("metrics") or {}
    out = {k: metrics[k] for k in ("mig", "dci") if k in metrics}
    if isinstance(report.get("usefulness"), dict):
        out["usefulness"] = report["usefulness"]
    return out


def adapter_model_card(config: Dict[str, Any], adapter_dir: Optional[str] = None, repo_id: Optional[str] = None) -> Any:
    """The ``huggingface_hub.ModelCard`` of an adapter described by its ``sami_adapter_config.json`` ``config``.

    Args:
        config: the adapter config (base model, UNet mode, ``training`` arguments, ``metrics``).
        adapter_dir: the folder the card goes into; report pictures found there (``report/*.png``) are shown.
        repo_id: the Hub repo the adapter is pushed to, for the usage snippet (default: the folder).
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = config.get("base_model_name_or_path")
    base_id = None if config.get("base_model_abspath") else hub_id(base)
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=base_id, tags=list(TAGS))
    base_line = (f"[`{base_id}`](https://huggingface.co/{base_id})" if base_id else
                 f"a local diffusion model (`{base}`), which is not on the Hub: pass it with `unet=...` when loading")
    dataset = training.get("train_data_dir") or training.get("dataset_name") or training.get("dataset")
    facts = [f"- base model: {base_line}", f"- UNet: {config.get('unet_mode', 'frozen')}", f"- code size: {config.get('latent_dim')}"]
    if dataset:
        facts.append(f"- data: {dataset}, {training.get('resolution') or 'native'} px; {training.get('max_train_steps')} steps, seed {training.get('seed')}")
    numbers = _number_lines({**(config.get("metrics") or {}), **evaluation_metrics(adapter_dir)})
    pictures = [f"![{alt}](report/{name})" for name, alt in REPORT_PICTURES
                if adapter_dir and os.path.isfile(os.path.join(adapter_dir, "report", name))]
    where = repo_id or (os.path.basename(os.path.normpath(adapter_dir)) if adapter_dir else "path/to/adapter")
    text = "\n".join([
        "---", data.to_yaml(), "---",
        "# SAMI adapter", "",
        "A SAMI encoder for a pretrained diffusion model, made with `sami-adapter`: the diffusion model is the decoder, "
        "and the code `z` "
        "steers it only through score guidance. The base model's weights are not in this repo; they are loaded from "
        "the base model.", "",
        *facts, "",
        "## Measured on held-out data", "",
        *(numbers or ["No report was written for this adapter."]), "",
        *[line for picture in pictures for line in (picture, "")],
        "## Use", "",
        "```python",
        "from sami_adapter import SAMIPipeline",
        "",
        f'pipe = SAMIPipeline.from_pretrained("{where}")',
        "z = pipe.encode(images).mean                 # codes of PIL images, or tensors in [0, 1]",
        "recon = pipe.reconstruct(images).images      # decodes of those codes",
        "samples = pipe(num_images_per_prompt=4).images",
        "```", "",
    ])
    return ModelCard(text)
