"""Procedural datasets with exact ground-truth factors."""

from .base import FactorDataset
from .disks import Disks, clean_disk_fraction, disk_moments, render_disks
from .dsprites import DSprites, render_sprites
from .moving_disks import MovingDisks

DATASETS = {"disks": Disks, "dsprites": DSprites}

__all__ = [
    "FactorDataset",
    "Disks",
    "DSprites",
    "MovingDisks",
    "DATASETS",
    "clean_disk_fraction",
    "disk_moments",
    "render_disks",
    "render_sprites",
]
