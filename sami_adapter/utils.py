"""Small shared helpers: image grids and input checks."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image with ``nrow`` images per row."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = nrow
    nrows = int(np.ceil(n / ncol))
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 1) -> str:
    """Save ``image_grid(images, nrow, scale)`` as a PNG at ``path`` (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_grid(images, nrow, scale).save(path)
    return path
