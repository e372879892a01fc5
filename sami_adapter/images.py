"""The image input contract: what the pipeline and the image-folder dataset accept, and how it is read.

| input                         | dtype                   | value range  | layout                         |
|-------------------------------|-------------------------|--------------|--------------------------------|
| ``torch.Tensor``              | float (16, 32, 64 bits) | [-1, 1]      | (N, C, H, W) or (C, H, W)      |
| ``torch.Tensor``              | uint8                   | [0, 255]     | (N, C, H, W) or (C, H, W)      |
| ``numpy.ndarray``             | float                   | [0, 1]       | (N, H, W, C) or (N, H, W) grey |
| ``numpy.ndarray``             | uint8 / uint16          | [0, 255] / [0, 65535] | as above              |
| ``PIL.Image`` (or a list)     | 8-bit modes (L, RGB, RGBA, P, ...) or 16-bit grey (I;16, I) | the mode's full range | converted to the model's channels |

Everything is mapped to float32 in [-1, 1] (the UNet's range). The value range follows the dtype,
as in diffusers (``VaeImageProcessor``): tensors are in model range, numpy and PIL in image range.
What cannot be read without guessing is refused with the expected range in the message: float
values outside their range, other integer dtypes, float PIL images (mode F). A float tensor whose
values all lie in [0, 1] is allowed (bright images do), but warned about: it is the common sign
of images that skipped the ``x * 2 - 1`` step.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch

ImageInput = Union[torch.Tensor, np.ndarray, PIL.Image.Image, Sequence[PIL.Image.Image]]
_TOLERANCE = 1e-3  # rounding slack at the ends of a range
_INT_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # PIL modes of 16-bit grey images (16-bit PNGs open as one of them)


def pil_to_array(image: PIL.Image.Image, channels: Optional[int] = None) -> np.ndarray:
    """A PIL image as float32 (H, W, C) in [0, 1], with ``channels`` (1 or 3) channels if given.

    8-bit modes are divided by 255; 16-bit grey (``I;16``, or ``I`` with values up to 65535, as
    16-bit PNGs open) by 65535. Converting 16-bit images with PIL's ``convert("L")`` would clip them
    to white, so they are scaled here instead.

    Raises:
        ValueError: a float image (mode ``F``), or a 32-bit integer image with values beyond 65535.
    """
    mode = image.mode
    if mode == "F":
        raise ValueError("A float PIL image (mode F) has no defined value range; pass a numpy float array in [0, 1] instead.")
    if mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image).astype(np.float64)
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(
                f"A {mode} PIL image with values in [{array.min():g}, {array.max():g}]: expected 16-bit grey in [0, 65535]."
            )
        array = (array / 65535.0).astype(np.float32)[..., None]
        if channels == 3:
            array = np.repeat(array, 3, axis=-1)
        return array
    if channels is not None:
        image = image.convert("L" if channels == 1 else "RGB")
    elif mode not in ("L", "RGB"):
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[..., None] if array.ndim == 2 else array


def to_model_range(images: ImageInput, channels: Optional[int] = None) -> torch.Tensor:
    """Images of any accepted kind (module docstring) as a float32 tensor (N, C, H, W) in [-1, 1].

    Args:
        images: a tensor, a numpy array, a PIL image or a list of PIL images.
        channels: the model's channel count; PIL images are converted to it (grey or RGB).

    Raises:
        TypeError: not a tensor, array or PIL image(s), or an integer dtype other than uint8/uint16.
        ValueError: values outside the range of their type, or NaN/inf.
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(im, PIL.Image.Image) for im in images):
        arrays = [pil_to_array(im, channels) for im in images]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"PIL images of different sizes {sorted({a.shape[:2] for a in arrays})}; resize them to one size.")
        images = np.stack(arrays)
    if isinstance(images, np.ndarray):
        if images.dtype in _INT_MAX:
            array = images.astype(np.float32) / _INT_MAX[images.dtype]
        elif np.issubdtype(images.dtype, np.floating):
            array = images.astype(np.float32)
            _check_range(torch.from_numpy(array), 0.0, 1.0, "numpy float images", "for images in [-1, 1] pass a torch tensor")
        else:
            raise TypeError(f"numpy images must be uint8 [0, 255], uint16 [0, 65535] or float [0, 1], got dtype {images.dtype}.")
        if array.ndim == 3:
            array = array[..., None]
        if array.ndim != 4:
            raise ValueError(f"numpy images must be (N, H, W, C) or (N, H, W), got shape {images.shape}.")
        return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2) * 2.0 - 1.0
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, numpy array or PIL image(s), got {type(images).__name__}.")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise TypeError(f"image tensors must be float in [-1, 1] or uint8 in [0, 255], got dtype {images.dtype}.")
    _check_range(images, -1.0, 1.0, "image tensors", "for pixels in [0, 1] use x * 2 - 1, for 0-255 pass uint8")
    if images.numel() > 1 and images.min() >= 0 and images.max() <= 1 and images.max() > images.min():
        warnings.warn(
            "All values of these image tensors lie in [0, 1]; tensors are read as [-1, 1], so these are bright images. "
            "If they are [0, 1] pixels, pass x * 2 - 1.",
            stacklevel=3,
        )
    return images.float().clamp(-1.0, 1.0)


def _check_range(values: torch.Tensor, low: float, high: float, what: str, hint: str) -> None:
    if not torch.isfinite(values).all():
        raise ValueError(f"{what} contain NaN or inf; pass finite pixel values in [{low:g}, {high:g}].")
    lo, hi = values.min().item(), values.max().item()
    if lo < low - _TOLERANCE or hi > high + _TOLERANCE:
        raise ValueError(f"{what} must lie in [{low:g}, {high:g}], got values in [{lo:.4g}, {hi:.4g}]; {hint}.")
