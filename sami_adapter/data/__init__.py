"""Procedural datasets with exact ground-truth factors."""

from .background_disks import BackgroundDisks, background_disk_fit, clean_background_disk_fraction, render_background_disks
from .base import FactorDataset
from .digits import Digits, confident_digit_fraction, digit_attributes, digit_split
from .disks import Disks, clean_disk_fraction, disk_moments, render_disks
from .dsprites import DSprites, render_sprites
from .moving_disks import MovingBackgroundDisks, MovingDisks

# A run with seed s draws its held-out images with seed s + HELD_OUT_SEED_OFFSET (finetune's report, the explorer's examples).
HELD_OUT_SEED_OFFSET = 10_000
# The moving (video) version of each dataset that has one: the trajectory-curvature measurement.
MOVING = {"disks": MovingDisks, "background_disks": MovingBackgroundDisks}
DATASETS = {"disks": Disks, "dsprites": DSprites, "background_disks": BackgroundDisks, "digits": Digits}

__all__ = [
    "FactorDataset",
    "BackgroundDisks",
    "background_disk_fit",
    "clean_background_disk_fraction",
    "render_background_disks",
    "Digits",
    "confident_digit_fraction",
    "digit_attributes",
    "digit_split",
    "Disks",
    "DSprites",
    "MovingDisks",
    "MovingBackgroundDisks",
    "DATASETS",
    "HELD_OUT_SEED_OFFSET",
    "MOVING",
    "clean_disk_fraction",
    "disk_moments",
    "render_disks",
    "render_sprites",
]
