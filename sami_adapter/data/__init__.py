"""Procedural datasets with exact ground-truth factors."""

from .background_disks import BackgroundDisks, background_disk_fit, clean_background_disk_fraction, render_background_disks
from .base import FactorDataset
from .disks import Disks, clean_disk_fraction, disk_moments, render_disks
from .dsprites import DSprites, render_sprites
from .moving_disks import MovingDisks

DATASETS = {"disks": Disks, "dsprites": DSprites, "background_disks": BackgroundDisks}

__all__ = [
    "FactorDataset",
    "BackgroundDisks",
    "background_disk_fit",
    "clean_background_disk_fraction",
    "render_background_disks",
    "Disks",
    "DSprites",
    "MovingDisks",
    "DATASETS",
    "clean_disk_fraction",
    "disk_moments",
    "render_disks",
    "render_sprites",
]
