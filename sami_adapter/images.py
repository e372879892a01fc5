"""The image input contract, diffusers' (``VaeImageProcessor``) with two additions: what the pipeline
and the image-folder dataset accept, and how it is read.

| input                         | dtype                   | value range  | layout                         |
|-------------------------------|-------------------------|--------------|--------------------------------|
| ``PIL.Image`` (or a list)     | 8-bit modes (L, RGB, RGBA, P, ...) or 16-bit grey (I;16, I) | the mode's full range | converted to the model's channels |
| ``numpy.ndarray``             | float                   | [0, 1]       | (N, H, W, C) or (H, W, C)      |
| ``torch.Tensor``              | float (16, 32, 64 bits) | [0, 1]       | (N, C, H, W) or (C, H, W)      |
| ``numpy.ndarray`` / tensor    | uint8 (numpy also uint16) | [0, 255] / [0, 65535] | as above           |

Float arrays and tensors are in [0, 1], as in diffusers (``T.ToTensor()`` gives exactly this). A
float batch with any value below 0 is read as [-1, 1] instead, with diffusers' ``FutureWarning``
(its ``VaeImageProcessor.preprocess`` rule: the whole batch is judged by its minimum, and diffusers
has deprecated [-1, 1] input). The additions: uint8/uint16 inputs and 16-bit grey PNGs are scaled by
their dtype's maximum, where diffusers reads only 8-bit PIL images.

Images of another size are resized to the model's as diffusers resizes them: PIL images with
Lanczos (``VaeImageProcessor``'s default ``resample``), arrays and tensors with
``torch.nn.functional.interpolate`` (nearest). Refused, with the fix in the message: NaN or inf,
float values outside [-1, 1], other integer dtypes, float PIL images (mode F), and a channel count
other than the model's for arrays and tensors (PIL images are converted to it).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch

ImageInput = Union[torch.Tensor, np.ndarray, PIL.Image.Image, Sequence[PIL.Image.Image]]
_TOLERANCE = 1e-3  # rounding slack at the ends of a range
_INT_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # PIL modes of 16-bit grey images (16-bit PNGs open as one of them)
MINUS_ONE_ONE_WARNING = (
    "Passing `image` as torch tensor with value range in [-1,1] is deprecated. The expected value range for image tensor is "
    "[0,1] when passing as pytorch tensor or numpy Array."
)  # diffusers' VaeImageProcessor wording, so a filter written for diffusers catches ours too


def _processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=1, do_normalize=False)  # only its resize rules are used


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


def _pil_batch(images: Sequence[PIL.Image.Image], channels: Optional[int], size: Optional[Tuple[int, int]]) -> np.ndarray:
    """PIL images as one float (N, H, W, C) array in [0, 1]; 8-bit images resized in PIL (Lanczos) first."""
    if size is not None:
        processor = _processor()
        images = [im if im.mode in SIXTEEN_BIT_MODES else processor.resize(im, *size) for im in images]
    arrays = [pil_to_array(im, channels) for im in images]
    if len({a.shape for a in arrays}) > 1 and size is None:
        raise ValueError(f"PIL images of different sizes {sorted({a.shape[:2] for a in arrays})}; resize them to one size.")
    if size is not None:  # 16-bit images (PIL cannot Lanczos-resize them) follow the array rule
        arrays = [a if a.shape[:2] == tuple(size) else _resize_array(a, size) for a in arrays]
    return np.stack(arrays)


def _resize_array(array: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    return _resize(torch.from_numpy(array).permute(2, 0, 1)[None], size)[0].permute(1, 2, 0).numpy()


def _resize(images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return _processor().resize(images, *size)


def to_unit_range(images: ImageInput, channels: Optional[int] = None, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Images of any accepted kind (module docstring) as a float32 tensor (N, C, H, W) in [0, 1].

    Args:
        images: a tensor, a numpy array, a PIL image or a list of PIL images.
        channels: the model's channel count; PIL images are converted to it (grey or RGB), arrays
            and tensors must have it.
        size: (height, width) to resize to, as diffusers does; None keeps the size.

    Raises:
        TypeError: not a tensor, array or PIL image(s), or an integer dtype other than uint8/uint16.
        ValueError: NaN/inf, values outside [-1, 1] (floats), or another channel count.
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(im, PIL.Image.Image) for im in images):
        images = _pil_batch(images, channels, size)
    if isinstance(images, np.ndarray):
        images = _array_to_tensor(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, numpy array or PIL image(s), got {type(images).__name__}.")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"image tensors must be (N, C, H, W) or (C, H, W), got shape {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point():
        raise TypeError(f"image tensors must be float in [0, 1] or uint8 in [0, 255], got dtype {images.dtype}.")
    else:
        images = _float_to_unit(images)
    if channels is not None and images.shape[1] != channels:
        raise ValueError(
            f"images have {images.shape[1]} channel(s) (shape {tuple(images.shape)}, read as (N, C, H, W)) but the model takes "
            f"{channels}; pass {channels}-channel images (numpy arrays are (N, H, W, C)), or PIL images, which are converted."
        )
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        images = _resize(images, size)
    return images


def _array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) or (H, W, C) numpy images as a float tensor (N, C, H, W), integers scaled to [0, 1]."""
    if array.dtype in _INT_MAX:
        array = array.astype(np.float32) / _INT_MAX[array.dtype]
    elif not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"numpy images must be uint8 [0, 255], uint16 [0, 65535] or float [0, 1], got dtype {array.dtype}.")
    if array.ndim == 3:  # one (H, W, C) image, as diffusers reads it
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"numpy images must be (N, H, W, C) or one (H, W, C) image, got shape {array.shape}.")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)


def _float_to_unit(images: torch.Tensor) -> torch.Tensor:
    """diffusers' rule: [0, 1], unless the batch has a value below 0, then [-1, 1] (deprecated, warned)."""
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf; pass finite pixel values in [0, 1].")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1 - _TOLERANCE or hi > 1 + _TOLERANCE:
        raise ValueError(
            f"float images must lie in [0, 1] (or, deprecated as in diffusers, [-1, 1]), got values in [{lo:.4g}, {hi:.4g}]; "
            "for 0-255 pixels pass uint8 or divide by 255."
        )
    images = images.float()
    if lo < 0:
        warnings.warn(f"{MINUS_ONE_ONE_WARNING} You passed `image` with value range [{lo:.4g},{hi:.4g}]", FutureWarning, stacklevel=4)
        return ((images + 1) / 2).clamp(0, 1)
    return images.clamp(0, 1)


def to_model_range(images: ImageInput, channels: Optional[int] = None, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """:func:`to_unit_range`, mapped to the UNet's [-1, 1]."""
    return to_unit_range(images, channels, size) * 2 - 1


def unit_from_model(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] tensors (the UNet's range, what the datasets yield) as [0, 1] images, the pipeline's input and ``pt`` output."""
    return (images + 1) / 2


def model_from_unit(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (the pipeline's ``pt`` output) in the UNet's [-1, 1]."""
    return images * 2 - 1


def postprocess(sample: torch.Tensor, output_type: str = "pil") -> Any:
    """(N, C, H, W) in [-1, 1] -> what diffusers' ``VaeImageProcessor.postprocess`` returns:
    ``"pt"`` (N, C, H, W) in [0, 1], ``"np"`` (N, H, W, C) in [0, 1], ``"pil"`` a list of images."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=1).postprocess(sample.clamp(-1, 1), output_type=output_type)


# ---------------------------------------------------------------------------- image grids
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1) -> PIL.Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image with ``nrow`` images per row."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = nrow
    nrows = int(np.ceil(n / ncol))
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = arr[i]
    img = PIL.Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), PIL.Image.NEAREST)
    return img


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 1) -> str:
    """Save ``image_grid(images, nrow, scale)`` as a PNG at ``path`` (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_grid(images, nrow, scale).save(path)
    return path
