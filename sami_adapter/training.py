"""Training plumbing shared by the example scripts: deterministic batches, image folders, timestep
emphasis, collapse detection and the end-of-training report."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .data.base import FactorDataset
from .evaluation import active_dimensions, disk_reconstruction_r2, guidance_gain, informative_dimensions
from .utils import save_image_grid

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def timestep_distribution(kind: str, num_train_timesteps: int = 1000) -> Optional[torch.Tensor]:
    """Sampling probabilities over timesteps; None means uniform.

    * ``uniform``: every timestep alike.
    * ``mid``: 75% uniform on [0.1 T, 0.9 T) plus 25% uniform on [0, T). The guidance
      ``s_t * grad log q`` barely matters at small t (s_t < 0.17 for t < 50) and the image is
      almost pure noise near T, so the informative levels get the samples.
    * ``low``: 75% on [0, T/2) plus 25% uniform: emphasises fine detail (size, brightness).
    """
    t = torch.arange(num_train_timesteps)
    if kind == "uniform":
        return None
    if kind == "mid":
        band = (t >= 0.1 * num_train_timesteps) & (t < 0.9 * num_train_timesteps)
    elif kind == "low":
        band = t < 0.5 * num_train_timesteps
    else:
        raise ValueError(f"timestep_sampling must be 'uniform', 'mid' or 'low', got {kind!r}.")
    probs = 0.25 / num_train_timesteps + 0.75 * band.double() / band.sum()
    return probs / probs.sum()


class ImageFolderDataset(Dataset):
    """Images from a folder (recursively) or a saved `datasets` dataset, resized, cropped, in [-1, 1].

    Args:
        images: a list of file paths, or a sequence of PIL images (``datasets`` column).
        resolution: output side.
        channels: 1 (grey) or 3 (RGB).
        center_crop: center crop after resizing the short side (else a random crop).
        random_flip: random horizontal flip.
        seed: seed of crops and flips (deterministic per index and epoch).
    """

    def __init__(self, images, resolution: int, channels: int, center_crop: bool = True, random_flip: bool = False, seed: int = 0):
        if len(images) == 0:
            raise ValueError("The training data is empty: no images found. Point --train_data_dir at a folder with "
                             f"{'/'.join(IMAGE_EXTENSIONS)} files (subfolders are searched).")
        if channels not in (1, 3):
            raise ValueError(f"The UNet takes {channels} channels; image training supports 1 (grey) or 3 (RGB).")
        self.images, self.resolution, self.channels = images, resolution, channels
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed

    @classmethod
    def from_args(cls, args, resolution: int, channels: int) -> "ImageFolderDataset":
        if args.train_data_dir:
            if not os.path.isdir(args.train_data_dir):
                raise SystemExit(f"--train_data_dir {args.train_data_dir!r} is not a directory.")
            files = sorted(
                os.path.join(root, f) for root, _, fs in os.walk(args.train_data_dir) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            try:
                return cls(files, resolution, channels, args.center_crop, args.random_flip, args.seed)
            except ValueError as e:
                raise SystemExit(f"--train_data_dir {args.train_data_dir!r}: {e}") from e
        try:
            import datasets
        except ImportError as e:
            raise SystemExit("--dataset_name needs the `datasets` package: pip install datasets") from e
        ds = datasets.load_from_disk(args.dataset_name)
        if hasattr(ds, "keys") and "train" in ds:
            ds = ds["train"]
        if args.image_column not in ds.column_names:
            raise SystemExit(f"--image_column {args.image_column!r} is not in {args.dataset_name} (columns: {ds.column_names}).")
        return cls(ds[args.image_column], resolution, channels, args.center_crop, args.random_flip, args.seed)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        item = self.images[index]
        try:
            image = Image.open(item) if isinstance(item, str) else item
            image = image.convert("L" if self.channels == 1 else "RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"Cannot read image {item!r} ({e}); remove or fix it.") from e
        scale = self.resolution / min(image.size)
        image = image.resize((max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale))), Image.BICUBIC)
        if self.center_crop:
            left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
        else:
            left, top = int(rng.integers(0, image.width - self.resolution + 1)), int(rng.integers(0, image.height - self.resolution + 1))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        tensor = torch.from_numpy(array).view(self.resolution, self.resolution, self.channels).permute(2, 0, 1)
        if self.random_flip and rng.random() < 0.5:
            tensor = tensor.flip(-1)
        return tensor

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"pixel_values": self.load(index, np.random.default_rng([self.seed, index]))}


class StepBatches:
    """Every batch and every random draw of training step ``k`` is a function of ``(seed, k)``.

    This makes resuming bit-identical without saving sampler state, and lets N processes each take
    their slice of one global batch, so they see exactly what one process at N times the batch sees.
    """

    def __init__(self, dataset, global_batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, global_batch_size, seed

    def _rng(self, k: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, k])

    def images(self, k: int) -> torch.Tensor:
        rng = self._rng(k)
        if isinstance(self.dataset, FactorDataset):
            return self.dataset.sample(self.batch_size, rng)[0]
        return torch.stack([self.dataset.load(int(i), rng) for i in self.indices(k)])

    def indices(self, k: int) -> torch.Tensor:
        """Dataset indices of step ``k``'s items (-1 for procedural data, drawn fresh every step)."""
        if isinstance(self.dataset, FactorDataset):
            return torch.full((self.batch_size,), -1, dtype=torch.long)
        n = len(self.dataset)
        positions = np.arange(k * self.batch_size, (k + 1) * self.batch_size)
        return torch.tensor([int(np.random.default_rng([self.seed, int(p // n), 7]).permutation(n)[p % n]) for p in positions])

    def batch(
        self, k: int, timestep_probs: Optional[torch.Tensor], num_train_timesteps: int, latent_dim: int, sample_shape: Optional[tuple] = None
    ) -> Dict[str, torch.Tensor]:
        """Images, indices, timesteps, noise (of ``sample_shape``, default the images') and reparameterisation noise."""
        images = self.images(k)
        g = torch.Generator().manual_seed(int(self._rng(k).integers(0, 2**62)))
        if timestep_probs is None:
            timesteps = torch.randint(0, num_train_timesteps, (self.batch_size,), generator=g)
        else:
            timesteps = torch.multinomial(timestep_probs.float(), self.batch_size, replacement=True, generator=g)
        noise_shape = (self.batch_size, *sample_shape) if sample_shape is not None else images.shape
        return {
            "images": images,
            "indices": self.indices(k),
            "timesteps": timesteps,
            "noise": torch.randn(noise_shape, generator=g),
            "latent_noise": torch.randn(self.batch_size, latent_dim, generator=g),
        }


def dataset_images(dataset, n: int) -> torch.Tensor:
    """The first ``n`` images of a dataset as one tensor."""
    n = min(n, len(dataset))
    return torch.stack([dataset[i]["pixel_values"] for i in range(n)])


def beta_at(step: int, max_steps: int, beta: float, beta_final: Optional[float] = None, warmup_steps: int = 0) -> float:
    """KL weight at optimiser step ``step`` (0-based).

    * ``warmup_steps > 0``: a linear ramp from 0 to ``beta`` over the first ``warmup_steps`` steps
      (lets the code become informative before the KL prices it);
    * ``beta_final``: after the warm-up, beta moves geometrically from ``beta`` to ``beta_final`` by the
      last step. The idea: raise the KL price only once the code is informative, to push it into
      fewer, axis-aligned dimensions. On the frozen disks adapter, 0.003 -> 0.1 emptied the code
      instead (docs/recipe-study.md).
    """
    if beta < 0 or (beta_final is not None and beta_final < 0):
        raise ValueError(f"beta must be >= 0, got beta={beta}, beta_final={beta_final}")
    if warmup_steps and step + 1 < warmup_steps:
        return beta * (step + 1) / warmup_steps
    if beta_final is None or beta_final == beta:
        return beta
    span = max(1, max_steps - 1 - max(warmup_steps - 1, 0))
    frac = min(1.0, max(0.0, (step - max(warmup_steps - 1, 0)) / span))
    if beta > 0 and beta_final > 0:
        return float(beta * (beta_final / beta) ** frac)
    return float(beta + (beta_final - beta) * frac)


def collapse_warning(kl_per_dim: List[float], gain: float, step: int, max_steps: int, threshold: float = 0.1) -> Optional[str]:
    """A message when the code carries (almost) nothing: every dimension's KL below ``threshold``
    nats, or guidance that does not lower the denoising error. None when all is well."""
    if step < max(50, 0.05 * max_steps):
        return None
    if max(kl_per_dim) < threshold:
        return (f"Posterior collapse at step {step}: every latent dimension has KL < {threshold} nats, so z carries no "
                "information. Lower --beta, raise --free_bits, or emphasise mid noise levels (--timestep_sampling mid).")
    if gain <= 0:
        return (f"No guidance gain at step {step} (unguided - guided = {gain:.4g} <= 0): the encoder's guidance does not "
                "help the denoiser. Lower --learning_rate or --beta, or check the base model.")
    return None


def write_report(pipe, images: torch.Tensor, args, report_dir: str, noise_scheduler) -> Dict[str, object]:
    """Held-out measurements and pictures of a trained adapter: report.json, report.md and PNGs."""
    os.makedirs(report_dir, exist_ok=True)
    model_inputs = pipe.preprocess(images)  # VAE latents for latent diffusion, the images otherwise
    unet_kwargs = {}
    if pipe.is_text_conditioned:
        unet_kwargs = {"encoder_hidden_states": pipe.encode_prompt(batch_size=1)[0]}
    gains = guidance_gain(pipe.unet, pipe.encoder, noise_scheduler, model_inputs, seed=args.seed, unet_kwargs=unet_kwargs)
    kl = gains.pop("kl_per_dim")
    mean_variance = gains.pop("mean_variance_per_dim")
    order = sorted(range(len(kl)), key=lambda i: -kl[i])
    active = active_dimensions(kl)
    report: Dict[str, object] = {
        "guided_loss": round(gains["guided_loss"], 3),
        "unguided_loss": round(gains["unguided_loss"], 3),
        "relative_guidance_gain": round(gains["relative_gain"], 4),
        "band_gain": {k: round(v, 4) for k, v in gains["band_gain"].items()},
        "kl_per_dim": [round(v, 3) for v in kl],
        "active_dims": len(active),
        "informative_dims": len(informative_dimensions(mean_variance)),
        "mean_variance_per_dim": [round(v, 3) for v in mean_variance],
    }
    n_show = min(8, images.shape[0])
    if getattr(args, "dataset", None) == "disks" and not (args.train_data_dir or args.dataset_name):
        rec = disk_reconstruction_r2(pipe, images, num_inference_steps=args.num_inference_steps, seed=args.seed, eta=args.eval_eta)
        report["reconstruction_r2"] = {k: round(v, 3) for k, v in rec["r2"].items()}
        recon = rec["reconstructions"][:n_show]
        scale = getattr(args, "eval_sami_scale", 1.0)
        if scale != 1.0:  # also decode with sharpened guidance (same noise): the exact decoder's spread vs its modes
            rec = disk_reconstruction_r2(pipe, images, num_inference_steps=args.num_inference_steps, seed=args.seed, eta=args.eval_eta,
                                         sami_scale=scale)
            report["reconstruction_sami_scale"] = scale
            report["reconstruction_r2_scaled"] = {k: round(v, 3) for k, v in rec["r2"].items()}
            recon = torch.cat([recon, rec["reconstructions"][:n_show]])
    else:
        recon = pipe.reconstruct(images[:n_show], num_inference_steps=args.num_inference_steps, eta=args.eval_eta, generator=torch.Generator().manual_seed(args.seed), output_type="pt").images.cpu()
    save_image_grid(torch.cat([images[:n_show].cpu(), recon]), os.path.join(report_dir, "reconstructions.png"), nrow=n_show, scale=4)
    values = torch.linspace(-2.5, 2.5, 9).tolist()
    rows = []
    for d in (order[: max(len(active), 1)]):
        g = torch.Generator().manual_seed(args.seed)
        # eta = 0: a traversal must share all randomness across its row, so only the code changes
        rows.append(pipe.traverse(images[:1], d, values, num_inference_steps=args.num_inference_steps, eta=0.0, generator=g, output_type="pt").images.cpu())
    save_image_grid(torch.cat(rows), os.path.join(report_dir, "traversals.png"), nrow=len(values), scale=4)
    with open(os.path.join(report_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [
        "# SAMI adapter report", "",
        f"Held-out images: {images.shape[0]}. Guided vs unguided denoising error (same noise, stratified timesteps):",
        f"{report['guided_loss']} vs {report['unguided_loss']} (relative gain {report['relative_guidance_gain']:.1%}).", "",
        "| noise band (t) | " + " | ".join(report["band_gain"]) + " |", "|---" * (len(report["band_gain"]) + 1) + "|",
        "| guidance gain | " + " | ".join(f"{v:.1%}" for v in report["band_gain"].values()) + " |", "",
        f"Active dimensions (KL > 0.1 nats): {len(active)} of {len(kl)}. KL per dimension: {report['kl_per_dim']}", "",
        f"Informative dimensions (Var_x of the posterior mean > 0.01): {report['informative_dims']}. "
        f"Variance of the mean per dimension: {report['mean_variance_per_dim']}", "",
    ]
    if "reconstruction_r2" in report:
        names = list(report["reconstruction_r2"])
        lines += ["Reconstruction R² from z = posterior mean (image moments of input vs reconstruction):", "",
                  "| sami_scale | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  "| 1 (exact) | " + " | ".join(f"{v:.3f}" for v in report["reconstruction_r2"].values()) + " |"]
        if "reconstruction_r2_scaled" in report:
            lines += [f"| {report['reconstruction_sami_scale']:g} | " + " | ".join(f"{v:.3f}" for v in report["reconstruction_r2_scaled"].values()) + " |"]
        lines += [""]
    rows_text = "Top row inputs, then reconstructions" + (
        f" at sami_scale 1 and {report['reconstruction_sami_scale']:g}." if "reconstruction_r2_scaled" in report else ".")
    lines += ["![reconstructions](reconstructions.png)", "", rows_text, "",
              "![traversals](traversals.png)", "", f"One row per active dimension (by KL), values {values[0]} to {values[-1]}.", ""]
    with open(os.path.join(report_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return report
