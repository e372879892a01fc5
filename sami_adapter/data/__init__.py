"""Procedural datasets with exact ground-truth factors."""

from .background_disks import BackgroundDisks, background_disk_fit, clean_background_disk_fraction, render_background_disks
from .base import FactorDataset
from .disks import Disks, clean_disk_fraction, disk_moments, render_disks
from .dsprites import DSprites, render_sprites
from .moving_disks import MovingBackgroundDisks, MovingDisks

# The moving (video) version of each dataset that has one: the trajectory-curvature measurement.
MOVING = {"disks": MovingDisks, "background_disks": MovingBackgroundDisks}
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
    "MovingBackgroundDisks",
    "DATASETS",
    "MOVING",
    "clean_disk_fraction",
    "disk_moments",
    "render_disks",
    "render_sprites",
]
