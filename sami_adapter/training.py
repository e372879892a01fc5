"""Training plumbing for examples/finetune.py: deterministic step batches, image folders, timestep
emphasis and the KL-weight schedule."""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .data.base import FactorDataset
from .images import SIXTEEN_BIT_MODES, pil_to_array

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
            raise ValueError("The training data is empty: no images found. Pass a folder with "
                             f"{'/'.join(IMAGE_EXTENSIONS)} files (subfolders are searched).")
        if channels not in (1, 3):
            raise ValueError(f"The UNet takes {channels} channels; image training supports 1 (grey) or 3 (RGB).")
        self.images, self.resolution, self.channels = images, resolution, channels
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed

    @classmethod
    def from_folder(cls, path: str, resolution: int, channels: int, **kwargs) -> "ImageFolderDataset":
        """Every image file under ``path`` (searched recursively), in sorted order; ``kwargs`` as in the class."""
        if not os.path.isdir(path):
            raise ValueError(f"{path!r} is not a directory; pass a folder of {'/'.join(IMAGE_EXTENSIONS)} images.")
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
        return cls(files, resolution, channels, **kwargs)

    @classmethod
    def from_saved_dataset(cls, path: str, image_column: str, resolution: int, channels: int, **kwargs) -> "ImageFolderDataset":
        """The ``image_column`` of a `datasets` dataset saved with ``save_to_disk`` (its ``train`` split when it has splits)."""
        try:
            import datasets
        except ImportError as e:
            raise ImportError("Reading a saved dataset needs the `datasets` package: pip install datasets") from e
        ds = datasets.load_from_disk(path)
        if hasattr(ds, "keys") and "train" in ds:
            ds = ds["train"]
        if image_column not in ds.column_names:
            raise ValueError(f"image column {image_column!r} is not in {path} (columns: {ds.column_names}).")
        return cls(ds[image_column], resolution, channels, **kwargs)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        item = self.images[index]
        try:
            image = Image.open(item) if isinstance(item, str) else item
            if image.mode in SIXTEEN_BIT_MODES:  # convert("L") would clip 16-bit values to white
                image = Image.fromarray(pil_to_array(image)[..., 0], mode="F")  # grey in [0, 1]
            else:
                image = image.convert("L" if self.channels == 1 else "RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"Cannot read image {item!r} ({e}); remove or fix it.") from e
        scale = self.resolution / min(image.size)
        image = image.resize((max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale))), Image.BICUBIC)
        if self.center_crop:
            left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
        else:
            left, top = int(rng.integers(0, image.width - self.resolution + 1)), int(rng.integers(0, image.height - self.resolution + 1))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = np.asarray(image, dtype=np.float32)
        array = array * 2.0 - 1.0 if image.mode == "F" else array / 127.5 - 1.0
        if array.ndim == 2:
            array = np.repeat(array[..., None], self.channels, axis=-1)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).view(self.resolution, self.resolution, self.channels).permute(2, 0, 1)
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
        """Images, indices, timesteps, noise (of ``sample_shape``, default the images'), reparameterisation noise and
        the dimension each sample's intervention loss moves."""
        images = self.images(k)
        g = torch.Generator().manual_seed(int(self._rng(k).integers(0, 2**62)))
        if timestep_probs is None:
            timesteps = torch.randint(0, num_train_timesteps, (self.batch_size,), generator=g)
        else:
            timesteps = torch.multinomial(timestep_probs.float(), self.batch_size, replacement=True, generator=g)
        noise_shape = (self.batch_size, *sample_shape) if sample_shape is not None else images.shape
        batch = {
            "images": images,
            "indices": self.indices(k),
            "timesteps": timesteps,
            "noise": torch.randn(noise_shape, generator=g),
            "latent_noise": torch.randn(self.batch_size, latent_dim, generator=g),
        }
        batch["intervention_dims"] = torch.randint(0, latent_dim, (self.batch_size,), generator=g)  # drawn last: earlier draws unchanged
        return batch


def dataset_images(dataset, n: int) -> torch.Tensor:
    """The first ``n`` images of a dataset as one tensor."""
    n = min(n, len(dataset))
    return torch.stack([dataset[i]["pixel_values"] for i in range(n)])


def beta_at(step: int, max_steps: int, beta: float, beta_final: Optional[float] = None, warmup_steps: int = 0) -> float:
    """KL weight at optimiser step ``step`` (0-based).

    * ``warmup_steps > 0``: a linear ramp from 0 to ``beta`` over the first ``warmup_steps`` steps
      (lets the code become informative before the KL prices it);
    * ``beta_final``: after the warm-up, beta moves geometrically from ``beta`` to ``beta_final`` by the
      last step (linearly when either end is 0). Raising the KL price only once the code is
      informative is meant to push the information into fewer dimensions.
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
