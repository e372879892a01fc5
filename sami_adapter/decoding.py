"""What :class:`~sami_adapter.SAMIPipeline` does with a code besides sampling from it: reconstruct images,
traverse one coordinate or several, interpolate between two codes. Every decode of one call starts from one
shared initial noise, so only the code differs between its images."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from .images import ImageInput


class CodeDecodingMixin:
    """``reconstruct``, ``traverse`` and ``interpolate`` on top of the pipeline's ``encode``, ``check_z``,
    ``prepare_latents`` and ``__call__``."""

    def reconstruct(self, images: ImageInput, **kwargs) -> Any:
        """Decode ``z = mean(q(z | x_0))`` of ``images``; ``kwargs`` go to :meth:`__call__`."""
        z = self.encode(images).mean
        return self(z=z, **kwargs)

    def traverse(
        self,
        z_or_image: Union[torch.Tensor, ImageInput],
        dim: Union[int, Sequence[int]],
        values: Union[Sequence[float], Sequence[Sequence[float]]],
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        max_batch_size: Optional[int] = None,
        **kwargs,
    ) -> Any:
        """Move one code coordinate, or several in turn, through ``values``, all else fixed (same code, same initial noise).

        Args:
            z_or_image: a code (latent_dim,) / (1, latent_dim), or one image to encode (posterior mean).
            dim: the coordinate to move, or a list of them: one row of images each, stacked in that order.
            values: the values it takes, one output image each; with several ``dim``, one list for every
                row or one list per row.
            generator: generator of the shared initial noise.
            latents: shared initial noise (1, C, H, W); drawn when None.
            max_batch_size: decode at most this many images per call (default: all at once); every call
                starts from the same noise, so this changes the cost, not what is decoded.
            kwargs: passed to :meth:`__call__`.
        """
        if isinstance(z_or_image, torch.Tensor) and z_or_image.ndim <= 2 and z_or_image.shape[-1] == self.latent_dim:
            z = self.check_z(z_or_image)
        else:
            z = self.encode(z_or_image).mean
        if z.shape[0] != 1:
            raise ValueError(f"traverse takes one code or one image, got a batch of {z.shape[0]}; call it once per item.")
        dims = [dim] if isinstance(dim, (int, np.integer)) else list(dim)
        nested = len(values) > 0 and isinstance(values[0], (list, tuple, np.ndarray))
        rows = [list(v) for v in values] if nested else [values] * len(dims)
        if len(rows) != len(dims):
            raise ValueError(f"got {len(rows)} value lists for {len(dims)} dimensions.")
        codes = []
        for d, row_values in zip(dims, rows):
            if not 0 <= d < self.latent_dim:
                raise ValueError(f"dim must be in [0, {self.latent_dim}), got {d}.")
            row_values = [float(v) for v in np.asarray(row_values, dtype=np.float64).reshape(-1)]
            if not row_values:
                raise ValueError("values is empty: traverse makes one image per value; pass at least one, e.g. values=[-2, 0, 2].")
            if not np.isfinite(row_values).all():
                raise ValueError(f"values must be finite numbers, got {row_values}.")
            row = z.repeat(len(row_values), 1)
            row[:, d] = torch.as_tensor(row_values, device=row.device, dtype=row.dtype)
            codes.append(row)
        codes = torch.cat(codes)
        noise = self.prepare_latents(codes.shape[0], generator, latents, shared=True)
        step = max_batch_size or codes.shape[0]
        outputs = [self(z=codes[i : i + step], latents=noise[i : i + step], generator=generator, **kwargs)
                   for i in range(0, codes.shape[0], step)]
        return _concatenate(outputs, kwargs.get("return_dict", True))

    def interpolate(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        steps: int = 8,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> Any:
        """Decode ``(1 - w) z_a + w z_b`` for ``steps`` evenly spaced ``w`` in [0, 1], with shared initial noise."""
        z_a, z_b = self.check_z(z_a), self.check_z(z_b)
        if z_a.shape[0] != 1 or z_b.shape[0] != 1:
            raise ValueError(f"interpolate takes one code at each end, got batches of {z_a.shape[0]} and {z_b.shape[0]}.")
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}.")
        w = torch.linspace(0, 1, steps, device=z_a.device, dtype=z_a.dtype).view(-1, 1)
        codes = (1 - w) * z_a + w * z_b
        return self(z=codes, latents=self.prepare_latents(steps, generator, latents, shared=True), generator=generator, **kwargs)


def _concatenate(outputs: list, return_dict: bool) -> Any:
    """One output from the outputs of several calls (images and codes in order)."""
    parts = [(o.images, o.z) if return_dict else o for o in outputs]
    if len(parts) == 1:
        images, z = parts[0]
    else:
        first = parts[0][0]
        if isinstance(first, torch.Tensor):
            images = torch.cat([p[0] for p in parts])
        elif isinstance(first, np.ndarray):
            images = np.concatenate([p[0] for p in parts])
        else:
            images = [image for p in parts for image in p[0]]
        z = torch.cat([p[1] for p in parts])
    return type(outputs[0])(images=images, z=z) if return_dict else (images, z)
