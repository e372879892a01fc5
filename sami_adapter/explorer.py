"""The explorer's model side, without a page: an :class:`Explorer` (the loaded pipeline, held-out examples and
each dimension's noise level) and the views that answer the page's requests with images, arrays and matplotlib
figures (:func:`encode_view`, :func:`traverse_view`, :func:`multiscale_view`, :func:`sample_view`,
:func:`grid_view`, :func:`interpolation_view`). ``examples/explore.py`` is the Gradio page over them; they work
from Python or a notebook too. Every decode and encode is a call to :class:`~sami_adapter.SAMIPipeline`.

Dimensions are ordered by their *characteristic noise level* (:mod:`sami_adapter.noise_levels`), read from
an evaluation report in the adapter directory or given as ``axes``, else measured on held-out examples and cached.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .adapter import read_adapter_config, resolve_adapter_dir
from .data import DATASETS, HELD_OUT_SEED_OFFSET
from .encoder import ACTIVE_KL_NATS, TRAVERSAL_RANGE
from .extras import import_extra
from .images import image_grid, model_from_unit, unit_from_model
from .noise_levels import characteristic_noise_levels, default_timestep_grid, information_profile
from .pipeline import SAMIPipeline
from .report import to_jsonable
from .training import ImageDataset, dataset_images

MULTISCALE_TIMESTEPS = (0, 100, 250, 400, 550, 700, 850)
# Deterministic DDIM (eta 0) at 12 steps draws the same pictures as at 25 or 100: on a 16 px
# background_disks adapter at sami_scale 3, the decoded disk moves by a median 0.06 px against a
# 100-step decode from the same noise (0.02 px at 25 steps), the background by 0.001; half the wait.
EXPLORER_STEPS = 12
MAX_UPLOAD_PIXELS = 25_000_000  # checked from the file header, before anything is decoded
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DISPLAY_SIDE = 192  # pixels of a displayed image (small images are enlarged, nearest neighbour)


class InputError(ValueError):
    """A problem with what the user gave the page; its message is shown there as it is."""


# ---------------------------------------------------------------------------------------- state
@dataclass
class Explorer:
    """What the views need: the pipeline, held-out examples and each dimension's noise level.

    Args:
        pipe: the loaded :class:`~sami_adapter.SAMIPipeline`.
        examples: (N, C, H, W) held-out images in [0, 1] (the pipeline's range), or None when the adapter's data are not
            a built-in dataset (then only uploads).
        kl: (D,) data-mean clean ``KL(q(z_i | x_0) || N(0, 1))`` in nats.
        noise_timestep: (D,) characteristic noise level ``t*`` of each dimension (NaN: inactive, or
            information kept beyond the measured grid, see ``censored``).
        noise_sigma: (D,) the noise scale ``s_t`` at ``t*``.
        censored: (D,) True where a dimension keeps over half its information up to the last level.
        order: active dimensions by increasing ``t*`` (censored last), the order of the sliders.
        axes_source: where the levels came from (a report, or measured here).
        axes_cache: the file the measured levels are cached in (None when read from a report).
        num_inference_steps: DDIM steps of every decode.
        eta: DDIM eta of every decode (each decode uses one seeded generator, so a traversal and the
            reconstruction it starts from share all their randomness for any eta).
        name: the adapter's name, shown in the page title.
    """

    pipe: SAMIPipeline
    examples: Optional[torch.Tensor]
    kl: np.ndarray
    noise_timestep: np.ndarray
    noise_sigma: np.ndarray
    censored: np.ndarray
    order: List[int]
    axes_source: str = ""
    axes_cache: Optional[str] = None
    num_inference_steps: int = EXPLORER_STEPS
    eta: float = 0.0
    name: str = ""

    @property
    def latent_dim(self) -> int:
        return self.pipe.latent_dim

    @property
    def inactive(self) -> List[int]:
        return [i for i in range(self.latent_dim) if i not in self.order]

    def dimension_label(self, dim: int) -> str:
        """Slider label: the dimension, its KL and its characteristic noise level."""
        head = f"z{dim}  (KL {self.kl[dim]:.2f} nats)"
        if dim not in self.order:
            return f"{head}: inactive"
        if self.censored[dim]:
            return f"{head}: keeps over half its information at every measured noise level"
        t, s = self.noise_timestep[dim], self.noise_sigma[dim]
        if not np.isfinite(t):
            return f"{head}: noise level not measured"
        return f"{head}: loses half its information at t = {t:.0f} (noise scale s_t = {s:.2f})"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def display(images: torch.Tensor, nrow: Optional[int] = None) -> Image.Image:
    """(N, C, H, W) images in [0, 1] as one enlarged PIL grid (the project's ``image_grid``)."""
    scale = max(1, DISPLAY_SIDE // max(images.shape[-2:]))
    return image_grid(model_from_unit(images.detach().cpu()), nrow or images.shape[0], scale=scale)


# ---------------------------------------------------------------------------------------- loading
def load_examples(adapter_config: Dict[str, Any], pipe: SAMIPipeline, num_examples: int) -> Optional[torch.Tensor]:
    """Held-out images of the adapter's built-in training dataset (the set finetune.py reports on), or None."""
    training = adapter_config.get("training") if isinstance(adapter_config.get("training"), dict) else {}
    name = training.get("dataset")
    if name not in DATASETS or training.get("train_data_dir") or training.get("dataset_name") or pipe.is_latent:
        return None
    resolution = int(pipe.unet.config.sample_size)
    dataset = DATASETS[name](num_samples=num_examples, resolution=resolution, seed=int(training.get("seed", 0)) + HELD_OUT_SEED_OFFSET,
                             split="test")
    if dataset.num_channels != pipe.unet.config.in_channels:
        return None
    return unit_from_model(dataset_images(dataset, num_examples))  # the datasets' [-1, 1] -> the pipeline's [0, 1]


def levels_from_report(path: str, latent_dim: int) -> Optional[Dict[str, Any]]:
    """The characteristic noise levels stored in an evaluation report.json (or an explorer cache file)."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    axes = report.get("axis_discovery", report)
    levels, profile = axes.get("characteristic_noise_levels"), axes.get("profile")
    if not isinstance(levels, dict) or not isinstance(profile, dict) or "kl" not in profile:
        return None
    kl = np.asarray(profile["kl"][0], dtype=np.float64)
    if kl.shape != (latent_dim,):
        return None

    def column(key: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in levels[key]], dtype=np.float64)

    return {"kl": kl, "timestep": column("timestep"), "sigma": column("sigma"),
            "censored": np.asarray(levels["censored"], dtype=bool), "order": [int(i) for i in levels["order"]], "source": f"from {path}"}


def _cache_key(adapter_dir: str, images: torch.Tensor, grid: Sequence[int], seed: int) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(os.path.join(adapter_dir, "encoder"))):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    h.update(images.numpy().tobytes())
    h.update(json.dumps([list(grid), seed]).encode())
    return h.hexdigest()[:16]


def measure_levels(pipe: SAMIPipeline, images: torch.Tensor, seed: int = 0, num_levels: int = 21) -> Dict[str, Any]:
    """Clean KL and characteristic noise levels of every dimension on ``images`` (:mod:`sami_adapter.noise_levels`)."""
    grid = default_timestep_grid(pipe.scheduler.config.num_train_timesteps, num_levels)
    profile = information_profile(pipe, model_from_unit(images), grid, generator=_generator(seed))
    levels = characteristic_noise_levels(profile, kl_threshold=ACTIVE_KL_NATS)
    return {"profile": profile, "levels": levels}


def find_levels(adapter_dir: str, pipe: SAMIPipeline, images: Optional[torch.Tensor], axes: Optional[str], cache_dir: str,
                seed: int = 0) -> Dict[str, Any]:
    """Per-dimension KL and noise levels: from ``axes`` or a report in the adapter, else measured and cached."""
    d = pipe.latent_dim
    candidates = [axes] if axes else [os.path.join(adapter_dir, sub, "report.json") for sub in ("report", "evaluation", ".")]
    for path in candidates:
        found = levels_from_report(path, d) if path and os.path.isfile(path) else None
        if found is not None:
            return found
        if axes:
            raise ValueError(f"--axes {axes}: no characteristic noise levels for a {d}-dim code in it; pass the report.json "
                             "that examples/evaluate.py wrote for this adapter, or leave --axes out to measure them.")
    if images is None:
        # No data to measure on: every dimension gets a slider, in index order.
        return {"kl": np.full(d, np.nan), "timestep": np.full(d, np.nan), "sigma": np.full(d, np.nan),
                "censored": np.zeros(d, dtype=bool), "order": list(range(d)), "source": "not measured (no held-out data)"}
    grid = default_timestep_grid(pipe.scheduler.config.num_train_timesteps, 21)
    cache = os.path.join(cache_dir, f"axes-{_cache_key(adapter_dir, images, grid, seed)}.json")
    measured_here = f"measured on {images.shape[0]} held-out examples"
    found = levels_from_report(cache, d) if os.path.isfile(cache) else None
    if found is not None:
        return {**found, "source": measured_here, "cache": cache}
    measured = measure_levels(pipe, images, seed)
    summary = {"profile": {"kl": to_jsonable(measured["profile"]["kl"])},
               "characteristic_noise_levels": to_jsonable(measured["levels"])}
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cache + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f)
    os.replace(tmp, cache)  # never leave a half-written cache behind
    return {**levels_from_report(cache, d), "source": measured_here, "cache": cache}


def load_explorer(adapter: str, num_examples: int = 256, axes: Optional[str] = None, cache_dir: Optional[str] = None,
                  num_inference_steps: int = EXPLORER_STEPS, eta: float = 0.0, device: str = "cpu") -> Explorer:
    """Load an adapter (directory or Hub repo id) and everything the views need."""
    adapter_dir = resolve_adapter_dir(adapter)
    if adapter_dir is None:
        raise ValueError(f"{adapter!r} is not a SAMI adapter (no sami_adapter_config.json in that directory or Hub repo); "
                         "train one with examples/finetune.py --output_dir DIR and pass DIR.")
    pipe = SAMIPipeline.from_pretrained(adapter_dir).to(device)
    config = read_adapter_config(adapter_dir)
    examples = load_examples(config, pipe, num_examples)
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "sami-adapter", "explore")
    levels = find_levels(adapter_dir, pipe, examples, axes, cache_dir)
    return Explorer(pipe=pipe, examples=examples, kl=levels["kl"], noise_timestep=levels["timestep"], noise_sigma=levels["sigma"],
                    censored=levels["censored"], order=levels["order"], axes_source=levels["source"], axes_cache=levels.get("cache"),
                    num_inference_steps=num_inference_steps, eta=eta, name=os.path.basename(os.path.normpath(adapter)))


def load_image(file: Union[str, os.PathLike, Image.Image], explorer: Explorer) -> torch.Tensor:
    """An uploaded picture as the (1, C, H, W) tensor in [0, 1] that ``encode`` takes.

    It is converted and resized like the training images of ``finetune.py --train_data_dir`` (grey
    or RGB to the UNet's channels, short side to the resolution, centre crop). Raises
    :class:`InputError` with a readable message for a missing, empty, oversized or unreadable file.
    """
    channels, height, _ = explorer.pipe.image_shape()
    if channels not in (1, 3):
        raise InputError(f"This adapter's model takes {channels}-channel images; uploads can be grey or RGB only.")
    if isinstance(file, Image.Image):
        source: Any = file
        label = "the image"
    else:
        if file is None or not os.path.isfile(file):
            raise InputError("No file was received: choose an image file (PNG, JPEG, WebP or BMP) to upload.")
        label = os.path.basename(str(file))
        size = os.path.getsize(file)
        if size == 0:
            raise InputError(f"{label} is empty (0 bytes): upload a PNG, JPEG, WebP or BMP image.")
        if size > MAX_UPLOAD_BYTES:
            raise InputError(f"{label} is {size / 2**20:.0f} MB; the explorer takes files up to {MAX_UPLOAD_BYTES // 2**20} MB. "
                             f"It shrinks every image to {height} px anyway: downscale it first.")
        try:
            with Image.open(file) as header:  # reads the header only
                width_px, height_px = header.size
        except (OSError, Image.DecompressionBombError, ValueError):
            raise InputError(f"{label} is not a picture this app can read: upload a PNG, JPEG, WebP or BMP image.") from None
        if width_px * height_px > MAX_UPLOAD_PIXELS:
            raise InputError(f"{label} is {width_px}x{height_px} pixels; the explorer takes at most {MAX_UPLOAD_PIXELS / 1e6:.0f} "
                             f"megapixels. It shrinks every image to {height} px anyway: downscale it first.")
        source = str(file)
    try:
        image = ImageDataset([source], height, channels, center_crop=True).load(0, np.random.default_rng(0))
    except (ValueError, OSError) as e:
        raise InputError(f"{label} could not be decoded as an image ({e}). Upload a PNG, JPEG, WebP or BMP picture.") from None
    return unit_from_model(image.unsqueeze(0))


def example_image(explorer: Explorer, index: int) -> torch.Tensor:
    """Held-out example ``index`` as (1, C, H, W)."""
    if explorer.examples is None:
        raise InputError("This adapter was not trained on a built-in dataset, so there are no held-out examples: upload an image.")
    n = explorer.examples.shape[0]
    if not 0 <= int(index) < n:
        raise InputError(f"Example {index} does not exist; pick one from 0 to {n - 1}.")
    return explorer.examples[int(index) : int(index) + 1]


# ---------------------------------------------------------------------------------------- views
def _figure(width: float = 6.0, height: float = 3.0):
    # A Figure not registered with pyplot: freed with its last reference, safe in a server's threads.
    Figure = import_extra("matplotlib.figure", "The explorer's figures").Figure
    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot(111)


def posterior_figure(mean: np.ndarray, std: np.ndarray, explorer: Explorer):
    """Bar chart of the posterior mean per dimension with ±1 standard deviation; inactive dimensions grey."""
    fig, ax = _figure()
    dims = np.arange(mean.size)
    colors = ["tab:blue" if i in explorer.order else "0.7" for i in dims]
    ax.bar(dims, mean, yerr=std, color=colors, capsize=3, ecolor="0.3")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(dims, [f"z{i}" for i in dims])
    ax.set_ylabel("posterior mean ± std")
    ax.set_title("q(z | x_0): blue = active dimensions, grey = inactive (prior N(0, 1))", fontsize=9)
    fig.tight_layout()
    return fig


def _decode_kwargs(explorer: Explorer, seed: int, sami_scale: float) -> Dict[str, Any]:
    return {"num_inference_steps": explorer.num_inference_steps, "eta": explorer.eta, "generator": _generator(seed),
            "sami_scale": float(sami_scale), "output_type": "pt"}


def encode_view(explorer: Explorer, image: torch.Tensor, sami_scale: float = 3.0, seed: int = 0) -> Dict[str, Any]:
    """Encode one image and reconstruct it at ``sami_scale`` 1 (the exact SAMI decoder) and at ``sami_scale``.

    Both reconstructions start from the same seeded noise. Returns a dict with ``z`` (D,) the
    posterior mean, ``std`` (D,), ``kl`` (D,) this image's KL to the prior per dimension,
    ``reconstruction`` and ``reconstruction_scaled`` (1, C, H, W) in [0, 1], ``pictures`` (input,
    reconstruction at 1, at ``sami_scale``, as display images) and ``figure`` (the bar chart).
    """
    pipe = explorer.pipe
    posterior = pipe.encode(image)
    exact = pipe.reconstruct(image, **_decode_kwargs(explorer, seed, 1.0)).images.cpu()
    scaled = exact if float(sami_scale) == 1.0 else pipe.reconstruct(image, **_decode_kwargs(explorer, seed, sami_scale)).images.cpu()
    mean, std = posterior.mean[0].double().cpu().numpy(), posterior.std[0].double().cpu().numpy()
    return {
        "z": mean,
        "std": std,
        "kl": posterior.kl_per_dim()[0].double().cpu().numpy(),
        "image": image.cpu(),
        "reconstruction": exact,
        "reconstruction_scaled": scaled,
        "pictures": [display(image), display(exact), display(scaled)],
        "figure": posterior_figure(mean, std, explorer),
    }


def traverse_view(explorer: Explorer, z: Sequence[float], dim: int, value: float, sami_scale: float = 3.0, seed: int = 0,
                  reference: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Decode the code ``z`` with coordinate ``dim`` set to ``value`` (``SAMIPipeline.traverse``).

    With the same ``seed`` and ``sami_scale`` as a reconstruction of ``z``, the decode starts from
    the same noise, so ``|image - reference|`` shows only what moving ``dim`` changed. Returns
    ``image`` (1, C, H, W), ``z`` (D,) the decoded code, ``change`` the mean absolute pixel change
    from ``reference`` (None without one) and ``pictures`` (the image and, with a reference, the
    absolute difference on the same [0, 1] scale: black = unchanged).
    """
    if not 0 <= int(dim) < explorer.latent_dim:
        raise InputError(f"Dimension {dim} does not exist; this code has z0 to z{explorer.latent_dim - 1}.")
    code = torch.as_tensor(np.asarray(z, dtype=np.float32)).view(1, -1)
    out = explorer.pipe.traverse(code, int(dim), [float(value)], **_decode_kwargs(explorer, seed, sami_scale))
    image = out.images.cpu()
    result: Dict[str, Any] = {"image": image, "z": out.z[0].double().cpu().numpy(), "change": None, "pictures": [display(image)]}
    if reference is not None:
        difference = (image - reference.cpu()).abs()
        result["change"] = float(difference.mean())
        result["pictures"].append(display(difference))  # black = unchanged
    return result


def multiscale_view(explorer: Explorer, image: torch.Tensor, timesteps: Sequence[int] = MULTISCALE_TIMESTEPS, seed: int = 0) -> Dict[str, Any]:
    """``q(z | x_t)`` of one image at several noise levels (``SAMIPipeline.encode(image, timesteps)``).

    Returns ``timesteps`` (K,), ``mean`` and ``std`` (K, D) and ``figure``: per active dimension,
    the posterior mean ± std against the noise level. As ``t`` grows the posterior falls back to the
    prior N(0, 1); a dimension whose mean holds on longer encodes a coarser property.
    """
    steps = [int(t) for t in timesteps]
    posterior = explorer.pipe.encode(image, timesteps=steps, generator=_generator(seed))
    mean = posterior.mean[:, 0].double().cpu().numpy()
    std = posterior.std[:, 0].double().cpu().numpy()
    fig, ax = _figure(6.0, 3.2)
    dims = explorer.order or list(range(mean.shape[1]))
    for k, i in enumerate(dims):
        line = ax.plot(steps, mean[:, i], marker="o", ms=3, label=f"z{i}")[0]
        ax.fill_between(steps, mean[:, i] - std[:, i], mean[:, i] + std[:, i], color=line.get_color(), alpha=0.12)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("noise level t of x_t")
    ax.set_ylabel("posterior mean ± std")
    ax.set_title("What the encoder still knows about this image at each noise level", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    return {"timesteps": np.asarray(steps), "mean": mean, "std": std, "figure": fig}


def sample_view(explorer: Explorer, seed: int = 0, num_images: int = 8, sami_scale: float = 3.0) -> Dict[str, Any]:
    """Draw ``num_images`` codes from the prior and decode them (``SAMIPipeline.__call__``, seeded).

    Returns ``images`` (N, C, H, W), ``z`` (N, D) and ``picture`` (one grid, up to 8 per row).
    """
    if not 1 <= int(num_images) <= 64:
        raise InputError(f"Draw between 1 and 64 images, not {num_images}.")
    out = explorer.pipe(batch_size=int(num_images), **_decode_kwargs(explorer, seed, sami_scale))
    images = out.images.cpu()
    return {"images": images, "z": out.z.double().cpu().numpy(), "picture": display(images, nrow=min(8, images.shape[0]))}


def grid_view(explorer: Explorer, z: Sequence[float], sami_scale: float = 3.0, seed: int = 0, steps: int = 7) -> Dict[str, Any]:
    """One traversal row per active dimension (``SAMIPipeline.traverse``), in ``explorer.order``: by
    characteristic noise level, so the rows go from fine to coarse properties.

    Every row moves its coordinate through ``steps`` values in [-TRAVERSAL_RANGE, TRAVERSAL_RANGE], all other coordinates
    kept at ``z``, every decode from the same seeded noise. Returns ``images`` (rows * steps, C, H, W)
    in [0, 1], ``rows`` (the dimensions), ``values`` and ``picture`` (one grid, a row per dimension).
    """
    if not 2 <= int(steps) <= 15:
        raise InputError(f"A grid row takes between 2 and 15 values, not {steps}.")
    if not explorer.order:
        raise InputError("This adapter has no active dimension (every KL is below the threshold): there is nothing to traverse.")
    code = torch.as_tensor(np.asarray(z, dtype=np.float32)).view(1, -1)
    values = np.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, int(steps)).tolist()
    images = explorer.pipe.traverse(code, explorer.order, values, max_batch_size=len(values), **_decode_kwargs(explorer, seed, sami_scale)).images.cpu()
    return {"images": images, "rows": list(explorer.order), "values": values, "picture": display(images, nrow=int(steps))}


def interpolation_view(explorer: Explorer, image_a: torch.Tensor, image_b: torch.Tensor, steps: int = 8, sami_scale: float = 3.0,
                       seed: int = 0) -> Dict[str, Any]:
    """Decode ``(1 - w) z_a + w z_b`` for ``steps`` evenly spaced ``w`` (``SAMIPipeline.interpolate``), between the
    posterior means of two images, all from the same seeded noise. Returns ``images`` (steps, C, H, W), ``z``
    (steps, D) and ``picture`` (image a, the decodes, image b in one row)."""
    if not 2 <= int(steps) <= 16:
        raise InputError(f"Interpolate over between 2 and 16 steps, not {steps}.")
    pipe = explorer.pipe
    z_a, z_b = pipe.encode(image_a).mean, pipe.encode(image_b).mean
    out = pipe.interpolate(z_a, z_b, steps=int(steps), **_decode_kwargs(explorer, seed, sami_scale))
    images = out.images.cpu()
    row = torch.cat([image_a.cpu(), images, image_b.cpu()])
    return {"images": images, "z": out.z.double().cpu().numpy(), "picture": display(row, nrow=row.shape[0])}


def code_record(explorer: Explorer, z: Sequence[float], sami_scale: float, seed: int) -> Dict[str, Any]:
    """The current code and everything needed to decode it again, as JSON-ready values."""
    return {
        "adapter": explorer.name,
        "z": [float(v) for v in z],
        "sami_scale": float(sami_scale),
        "seed": int(seed),
        "num_inference_steps": explorer.num_inference_steps,
        "eta": explorer.eta,
        "decode": "pipe(z=torch.tensor([z]), sami_scale=sami_scale, num_inference_steps=num_inference_steps, eta=eta, "
                  "generator=torch.Generator().manual_seed(seed))",
    }


def write_code(explorer: Explorer, state: Optional[Dict[str, Any]], directory: str) -> str:
    """Write :func:`code_record` of the page state to ``directory/sami-code-<hash>.json``; return its path."""
    if not state:
        raise InputError("Encode an image first: there is no code to export yet.")
    record = code_record(explorer, state["z"], state["scale"], state["seed"])
    text = json.dumps(record, indent=2)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"sami-code-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json")
    with open(path, "w") as f:
        f.write(text)
    return path


def write_thumbnails(explorer: Explorer, directory: str, count: int = 12) -> List[str]:
    """PNG files of the first ``count`` held-out examples, for the page's example thumbnails."""
    if explorer.examples is None:
        return []
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(min(count, explorer.examples.shape[0])):
        path = os.path.join(directory, f"example-{i}.png")
        display(explorer.examples[i : i + 1]).save(path)
        paths.append(path)
    return paths
