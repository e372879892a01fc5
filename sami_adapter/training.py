"""Training plumbing for examples/finetune.py: deterministic step batches, image folders, timestep
emphasis, the KL-weight schedule and :class:`SAMIObjective` (the loss as a module, for DDP)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .data.base import FactorDataset
from .images import SIXTEEN_BIT_MODES, pil_to_array
from .objective import sami_loss, sample_timesteps

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


class ImageDataset(Dataset):
    """Images from a folder (recursively) or a saved `datasets` dataset, resized, cropped, in [-1, 1].

    Args:
        images: a sequence of file paths, PIL images or undecoded ``datasets`` images (``{"path", "bytes"}``,
            e.g. a :class:`sami_adapter.hf_data.Column`).
        resolution: output side.
        channels: 1 (grey) or 3 (RGB).
        center_crop: center crop after resizing the short side (else a random crop).
        random_flip: random horizontal flip.
        seed: seed of crops and flips (deterministic per index and epoch).
        captions: optional sequence of captions, one per image (a string, or a list of strings to pick from).
    """

    def __init__(self, images, resolution: int, channels: int, center_crop: bool = True, random_flip: bool = False, seed: int = 0,
                 captions=None):
        if len(images) == 0:
            raise ValueError("The training data is empty: no images found. Pass a folder with "
                             f"{'/'.join(IMAGE_EXTENSIONS)} files (subfolders are searched).")
        if channels not in (1, 3):
            raise ValueError(f"The UNet takes {channels} channels; image training supports 1 (grey) or 3 (RGB).")
        self.images, self.resolution, self.channels = images, resolution, channels
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.captions = captions

    @classmethod
    def from_saved_dataset(cls, path: str, image_column: str, resolution: int, channels: int, **kwargs) -> "ImageDataset":
        """The ``image_column`` of a `datasets` dataset saved with ``save_to_disk`` (its ``train`` split when it has splits)."""
        from .hf_data import load_split

        return cls.from_datasets(load_split(path), image_column, resolution, channels, **kwargs)

    @classmethod
    def from_datasets(cls, dataset, image_column: str, resolution: int, channels: int, caption_column: Optional[str] = None,
                      **kwargs) -> "ImageDataset":
        """Images (and captions) of a ``datasets.Dataset``, decoded one at a time when used."""
        from .hf_data import Column

        for column in (image_column, caption_column):
            if column is not None and column not in dataset.column_names:
                raise ValueError(f"{column!r} is not a column of the dataset (columns: {', '.join(dataset.column_names)})")
        captions = Column(dataset, caption_column) if caption_column else None
        return cls(Column(dataset, image_column), resolution, channels, captions=captions, **kwargs)

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, index: int, rng: np.random.Generator) -> str:
        """The caption of image ``index`` (one of its captions, drawn with ``rng``, when it has several)."""
        caption = self.captions[index]
        if isinstance(caption, (list, tuple, np.ndarray)):
            caption = caption[int(rng.integers(0, len(caption)))] if len(caption) else ""
        if caption is None:
            return ""
        if not isinstance(caption, str):
            raise ValueError(f"The caption of item {index} is {type(caption).__name__} {caption!r}, not text; pick a text column.")
        return caption

    @staticmethod
    def _open(item):
        from io import BytesIO

        from PIL import Image

        if isinstance(item, dict):  # an undecoded `datasets` image
            return Image.open(BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
        return Image.open(item) if isinstance(item, str) else item

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        item = self.images[index]
        if isinstance(item, dict):  # name the file, not the dict of its bytes, in the error
            item_name = item.get("path") or f"item {index}"
        else:
            item_name = item if isinstance(item, str) else f"item {index}"
        try:
            image = self._open(item)
            if image.mode in SIXTEEN_BIT_MODES:  # convert("L") would clip 16-bit values to white
                image = Image.fromarray(pil_to_array(image)[..., 0], mode="F")  # grey in [0, 1]
            else:
                image = image.convert("L" if self.channels == 1 else "RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"Cannot read image {item_name!r} ({e}); remove or fix it.") from e
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
    Item ``p`` of a file dataset's step ``k`` (its image, crop, flip and caption) depends on
    ``(seed, k, p)`` only, so each process can decode just its own items (:class:`StepShardSampler`).

    Args:
        dataset: a :class:`FactorDataset` (fresh procedural samples every step) or an indexable dataset
            with ``load(index, rng)`` (and ``caption(index, rng)`` when ``captions`` is set).
        global_batch_size: items per optimiser step, over all processes and accumulation steps.
        seed: the run's seed.
        empty_prompt_share: the share of captions replaced by the empty prompt (classifier-free guidance).
    """

    def __init__(self, dataset, global_batch_size: int, seed: int, empty_prompt_share: float = 0.0):
        self.dataset, self.batch_size, self.seed = dataset, global_batch_size, seed
        self.empty_prompt_share = empty_prompt_share
        self._permutations: Dict[int, np.ndarray] = {}

    @property
    def procedural(self) -> bool:
        return isinstance(self.dataset, FactorDataset)

    def _rng(self, k: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, k])

    def images(self, k: int) -> torch.Tensor:
        if self.procedural:
            return self.dataset.sample(self.batch_size, self._rng(k))[0]
        return torch.stack([self.item(k, p, int(i))["pixel_values"] for p, i in enumerate(self.indices(k))])

    def item(self, k: int, position: int, index: int) -> Dict[str, object]:
        """Item ``position`` of step ``k``'s global batch: image ``index`` decoded, cropped and flipped (and its
        caption, or the empty prompt for a share ``empty_prompt_share`` of them), all drawn from ``(seed, k, position)``."""
        rng = np.random.default_rng([self.seed, k, position, 5])
        item: Dict[str, object] = {"pixel_values": self.dataset.load(index, rng)}
        if getattr(self.dataset, "captions", None) is not None:
            empty = rng.random() < self.empty_prompt_share  # drawn for every item, so the share does not shift other draws
            item["caption"] = "" if empty else self.dataset.caption(index, rng)
        return item

    def _permutation(self, epoch: int) -> np.ndarray:
        # One permutation per epoch, kept for the last few epochs: a step spans at most two of them.
        if epoch not in self._permutations:
            if len(self._permutations) >= 4:
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.dataset))
        return self._permutations[epoch]

    def indices(self, k: int) -> torch.Tensor:
        """Dataset indices of step ``k``'s items (-1 for procedural data, drawn fresh every step)."""
        if self.procedural:
            return torch.full((self.batch_size,), -1, dtype=torch.long)
        n = len(self.dataset)
        positions = np.arange(k * self.batch_size, (k + 1) * self.batch_size)
        return torch.tensor([int(self._permutation(int(p // n))[p % n]) for p in positions])

    def batch(
        self, k: int, timestep_probs: Optional[torch.Tensor], num_train_timesteps: int, latent_dim: int, sample_shape: Optional[tuple] = None,
        with_images: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """Images, indices, timesteps, noise (of ``sample_shape``, default the images'), reparameterisation noise and
        the dimension each sample's intervention loss moves. ``with_images=False`` leaves the images out (a
        :class:`StepShardSampler` loads them); ``sample_shape`` is then required."""
        if not with_images and sample_shape is None:
            raise ValueError("batch(with_images=False) needs sample_shape: the noise takes its shape from it.")
        images = self.images(k) if with_images else None
        g = torch.Generator().manual_seed(int(self._rng(k).integers(0, 2**62)))
        timesteps = sample_timesteps(self.batch_size, num_train_timesteps, timestep_probs, g)
        noise_shape = (self.batch_size, *sample_shape) if sample_shape is not None else images.shape
        batch = {
            "indices": self.indices(k),
            "timesteps": timesteps,
            "noise": torch.randn(noise_shape, generator=g),
            "latent_noise": torch.randn(self.batch_size, latent_dim, generator=g),
        }
        if images is not None:
            batch["images"] = images
        batch["intervention_dims"] = torch.randint(0, latent_dim, (self.batch_size,), generator=g)  # drawn last: earlier draws unchanged
        return batch


class StepItems(Dataset):
    """The items of :class:`StepBatches` as a map-style dataset keyed by ``(step, position, index)``, for a DataLoader."""

    def __init__(self, batches: StepBatches):
        self.batches = batches

    def __len__(self) -> int:  # keys come from StepShardSampler, not from range(len)
        return len(self.batches.dataset)

    def __getitem__(self, key) -> Dict[str, object]:
        step, position, index = key
        return {**self.batches.item(step, position, index), "step": step, "index": index}


class StepShardSampler(Sampler):
    """The micro-batches one process loads, steps ``start_step`` to ``end_step - 1``, as lists of StepItems keys.

    Step ``k``'s global batch is split into ``accumulation`` micro-batches of ``world * batch_size``
    items and each micro-batch into ``world`` equal shards, in order; this process takes shard ``rank``.
    That is the slicing the training loop applies to the step's noise and timesteps, so every process
    decodes only its own images and N processes still see what one process sees at N times the batch.
    Nothing depends on the sampler's state: resuming at step ``k`` starts a new sampler there.
    """

    def __init__(self, batches: StepBatches, start_step: int, end_step: int, batch_size: int, accumulation: int = 1,
                 rank: int = 0, world: int = 1):
        if batches.batch_size != batch_size * accumulation * world:
            raise ValueError(f"StepBatches draws {batches.batch_size} items per step, not batch_size x accumulation x world = "
                             f"{batch_size} x {accumulation} x {world}.")
        self.batches, self.start, self.end = batches, start_step, end_step
        self.batch_size, self.accumulation, self.rank, self.world = batch_size, accumulation, rank, world

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.accumulation

    def __iter__(self):
        for step in range(self.start, self.end):
            indices = self.batches.indices(step).tolist()
            for micro in range(self.accumulation):
                first = (micro * self.world + self.rank) * self.batch_size
                yield [(step, p, indices[p]) for p in range(first, first + self.batch_size)]


# ---------------------------------------------------------------------------- the objective as a module
def _is_frozen_unet_key(key: str) -> bool:
    return "trainable_unet." in key and "lora_" not in key


def _drop_frozen_unet_weights(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix) and _is_frozen_unet_key(k[len(prefix):])]:
        del state_dict[key]


def _allow_missing_frozen_unet_weights(module, incompatible_keys):
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not _is_frozen_unet_key(k)]


class SAMIObjective(torch.nn.Module):
    """Encoder (+ UNet) whose forward is :func:`~sami_adapter.objective.sami_loss`: one forward per backward, as DDP wants.

    Args:
        encoder: the :class:`~sami_adapter.SAMIEncoder` being trained.
        unet: the base UNet.
        train_unet: whether the UNet (or its LoRA layers) is trained; a frozen UNet is kept out of the
            module tree, so DDP does not wrap it and checkpoints do not copy its weights.
        lora_only: the UNet trains LoRA layers only: checkpoints leave its frozen base weights out
            (they come from the base model).
    """

    def __init__(self, encoder: torch.nn.Module, unet: torch.nn.Module, train_unet: bool, lora_only: bool = False):
        super().__init__()
        self.encoder = encoder
        self.train_unet = train_unet
        if train_unet:
            self.trainable_unet = unet
        else:  # kept out of the module tree: DDP does not wrap it and checkpoints do not copy its weights
            object.__setattr__(self, "frozen_unet", unet)
        if lora_only:  # LoRA: the UNet's frozen base weights come from the base model, so checkpoints leave them out
            self.register_state_dict_post_hook(_drop_frozen_unet_weights)
            self.register_load_state_dict_post_hook(_allow_missing_frozen_unet_weights)

    @property
    def unet(self) -> torch.nn.Module:
        return self.trainable_unet if self.train_unet else self.frozen_unet

    def forward(self, clean: torch.Tensor, scheduler: Any, **kwargs) -> Dict[str, Any]:
        """``sami_loss(unet, encoder, scheduler, clean, train_unet=..., **kwargs)`` as a plain dict."""
        # A plain dict: accelerate's mixed-precision output conversion rebuilds mappings as type(out)(dict).
        return dict(sami_loss(self.unet, self.encoder, scheduler, clean, train_unet=self.train_unet, **kwargs))


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
