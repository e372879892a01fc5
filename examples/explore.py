#!/usr/bin/env python
"""Explore the latent code of a SAMI adapter in the browser: encode, traverse, multiscale, sample.

    pip install -e ".[app]"
    python examples/explore.py sami-disks-adapter                 # http://127.0.0.1:7860, works offline
    python examples/explore.py you/sami-cifar --port 7861 --share true

The page is a thin Gradio layer over the view functions of :mod:`sami_adapter.explorer`, which take an
:class:`~sami_adapter.explorer.Explorer` (the loaded pipeline, held-out examples and the per-dimension noise
levels) and return images, arrays and matplotlib figures; use them from Python or a notebook without a browser:

* :func:`encode_view`: input, reconstructions at ``sami_scale`` 1 and at a chosen scale, and the
  posterior ``q(z | x_0)`` (mean and standard deviation per dimension, as a bar chart);
* :func:`traverse_view`: decode a code with one coordinate moved, with the same initial noise as the
  reconstruction, so the difference shows only that coordinate's effect;
* :func:`multiscale_view`: ``q(z | x_t)`` of the current image at a few noise levels (what the
  encoder still knows at each level);
* :func:`sample_view`: ``z ~ N(0, I)`` decoded.

Every decode and encode is a call to :class:`~sami_adapter.SAMIPipeline` (``reconstruct``,
``traverse``, ``encode``, ``__call__``); the app adds no sampling or encoding of its own.

Traversal sliders come one per active dimension (clean KL above ``ACTIVE_KL_NATS``), ordered by the noise level
at which the dimension loses half its information (its *characteristic noise level*, see
:mod:`sami_adapter.noise_levels`): read from an evaluation report (``examples/evaluate.py``) in the
adapter directory or given with ``--axes``, else measured once on held-out examples and cached.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from sami_adapter.encoder import ACTIVE_KL_NATS, TRAVERSAL_RANGE
from sami_adapter.explorer import (
    EXPLORER_STEPS,
    MAX_UPLOAD_BYTES,
    MULTISCALE_TIMESTEPS,
    Explorer,
    InputError,
    display,
    encode_view,
    example_image,
    grid_view,
    interpolation_view,
    load_explorer,
    load_image,
    multiscale_view,
    sample_view,
    traverse_view,
    write_code,
    write_thumbnails,
)
from sami_adapter.extras import import_extra

SLIDER_RANGE = 4.0  # traversal sliders span [-4, 4] prior standard deviations


def _more_tabs(gr, explorer: Explorer, state, scale, seed, files_dir: str) -> None:
    """The Grid and Interpolate tabs and the code export, inside the page being built."""

    def page_error(e: Exception):
        return gr.Error(str(e), print_exception=False)

    def on_grid(state, steps, progress=gr.Progress(track_tqdm=True)):
        if not state:
            raise gr.Error("Encode an image first (the grid starts from its code).", print_exception=False)
        try:
            return grid_view(explorer, state["z"], state["scale"], state["seed"], int(steps))["picture"]
        except InputError as e:
            raise page_error(e) from None

    def end_image(upload, index):
        return load_image(upload, explorer) if upload else example_image(explorer, int(index))

    def on_interpolate(upload_a, index_a, upload_b, index_b, steps, scale, seed, progress=gr.Progress(track_tqdm=True)):
        try:
            return interpolation_view(explorer, end_image(upload_a, index_a), end_image(upload_b, index_b), int(steps), scale,
                                      int(seed))["picture"]
        except InputError as e:
            raise page_error(e) from None

    def on_export(state):
        try:
            return write_code(explorer, state, os.path.join(files_dir, "codes"))
        except InputError as e:
            raise page_error(e) from None

    has_examples = explorer.examples is not None
    n_examples = explorer.examples.shape[0] if has_examples else 1
    with gr.Tab("Grid"):
        gr.Markdown(f"One row per active dimension, from {-TRAVERSAL_RANGE:g} to {TRAVERSAL_RANGE:g} prior standard deviations, all other "
                    "coordinates at the encoded code; rows in the slider order (noise level), every image from the same noise.")
        with gr.Row():
            grid_steps = gr.Slider(2, 15, value=7, step=1, label="values per row")
            grid_button = gr.Button("Decode the grid", variant="primary")
        grid = gr.Image(label="traversal grid", type="pil", format="png", interactive=False)
    with gr.Tab("Interpolate"):
        gr.Markdown("Decode codes on the straight line between the posterior means of two images (held-out examples, or uploads).")
        with gr.Row():
            with gr.Column():
                index_a = gr.Slider(0, n_examples - 1, value=0, step=1, label="image a: held-out example", visible=has_examples)
                upload_a = gr.File(label="or upload image a", type="filepath")
            with gr.Column():
                index_b = gr.Slider(0, n_examples - 1, value=min(1, n_examples - 1), step=1, label="image b: held-out example",
                                    visible=has_examples)
                upload_b = gr.File(label="or upload image b", type="filepath")
        with gr.Row():
            inter_steps = gr.Slider(2, 16, value=8, step=1, label="steps")
            inter_button = gr.Button("Decode from a to b", variant="primary")
        interpolation = gr.Image(label="a, the decodes from a to b, b", type="pil", format="png", interactive=False)
    with gr.Row():
        export = gr.Button("Export the current code as JSON")
        code_file = gr.File(label="code (JSON)", interactive=False)
    grid_button.click(on_grid, [state, grid_steps], grid, api_name="grid")
    inter_button.click(on_interpolate, [upload_a, index_a, upload_b, index_b, inter_steps, scale, seed], interpolation,
                       api_name="interpolate")
    export.click(on_export, state, code_file, api_name="code")


def _event_handlers(gr, explorer: Explorer, dims: List[int]) -> Dict[str, Any]:
    """The page's callbacks: encode an image, move one dimension's slider (a factory per dimension), reset, sample."""

    def page_error(e: Exception):
        return gr.Error(str(e), print_exception=False)

    def pick_image(source: str, index: float, upload: Optional[str]) -> torch.Tensor:
        if source == "upload":
            return load_image(upload, explorer)
        return example_image(explorer, int(index))

    def slider_value(value: float) -> float:
        # What the slider shows; the code itself stays exact in the page state.
        return round(float(np.clip(value, -SLIDER_RANGE, SLIDER_RANGE)), 3)

    def on_encode(source, index, upload, scale, seed, progress=gr.Progress(track_tqdm=True)):
        try:
            image = pick_image(source, index, upload)
            view = encode_view(explorer, image, scale, int(seed))
            multi = multiscale_view(explorer, image, seed=int(seed))
        except InputError as e:
            raise page_error(e) from None
        state = {"z": view["z"].tolist(), "original": view["z"].tolist(), "reference": view["reconstruction_scaled"],
                 "scale": float(scale), "seed": int(seed)}
        slider_values = [slider_value(view["z"][i]) for i in dims]
        return (*view["pictures"], view["figure"], multi["figure"], view["pictures"][2], None, state, *slider_values)

    def moved(dim: int):
        def on_move(state, value, progress=gr.Progress(track_tqdm=True)):
            if not state:
                raise gr.Error("Encode an image first (Encode tab), then move a slider.", print_exception=False)
            view = traverse_view(explorer, state["z"], dim, value, state["scale"], state["seed"], reference=state["reference"])
            state = {**state, "z": view["z"].tolist()}
            return view["pictures"][0], view["pictures"][1], state

        return on_move

    def on_reset(state):
        if not state:
            raise gr.Error("Encode an image first.", print_exception=False)
        state = {**state, "z": list(state["original"])}
        return (display(state["reference"]), None, state, *[slider_value(state["z"][i]) for i in dims])

    def on_sample(seed, count, scale, progress=gr.Progress(track_tqdm=True)):
        try:
            return sample_view(explorer, int(seed), int(count), scale)["picture"]
        except InputError as e:
            raise page_error(e) from None

    return {"encode": on_encode, "moved": moved, "reset": on_reset, "sample": on_sample}


def _input_column(gr, explorer: Explorer, files_dir: str) -> tuple:
    """The left column: which image (a held-out example, its thumbnails, or an upload), sami_scale, seed and Encode."""
    has_examples = explorer.examples is not None
    with gr.Column(scale=1, min_width=260):
        source = gr.Radio(["example", "upload"], value="example" if has_examples else "upload", label="Image",
                          interactive=has_examples)
        n_examples = explorer.examples.shape[0] if has_examples else 1
        index = gr.Slider(0, n_examples - 1, value=0, step=1, label="held-out example", visible=has_examples)
        thumbnails = write_thumbnails(explorer, os.path.join(files_dir, "examples"))
        if thumbnails:
            preview = gr.Image(label="example", type="filepath", height=96, interactive=False)
            gr.Examples([[path, i] for i, path in enumerate(thumbnails)], [preview, index], label="held-out examples",
                        examples_per_page=len(thumbnails))
        upload = gr.File(label="or upload an image (PNG, JPEG, WebP, BMP)", type="filepath")
        scale = gr.Slider(0.0, 6.0, value=3.0, step=0.5, label="sami_scale (1 = exact SAMI decoder; > 1 sharpens)")
        seed = gr.Number(0, precision=0, label="seed (initial noise)")
        encode_button = gr.Button("Encode", variant="primary")
    return source, index, upload, scale, seed, encode_button


def _traverse_tab(gr, explorer: Explorer) -> tuple:
    """The Traverse tab: one slider per dimension (active ones by noise level, inactive ones folded away), reset, the decode."""
    with gr.Tab("Traverse"):
        gr.Markdown("One slider per active dimension, ordered by the noise level at which it loses half its information "
                    "(coarse properties survive more noise). Moving one re-decodes from the same noise as the reconstruction, "
                    "so the difference image shows only that dimension's effect.")
        with gr.Row():
            with gr.Column(scale=2):
                sliders = {}
                for i in explorer.order:
                    sliders[i] = gr.Slider(-SLIDER_RANGE, SLIDER_RANGE, value=0.0, step=0.05, label=explorer.dimension_label(i))
                if explorer.inactive:
                    with gr.Accordion(f"inactive dimensions (KL < {ACTIVE_KL_NATS} nats): moving them should change nothing",
                                      open=False):
                        for i in explorer.inactive:
                            sliders[i] = gr.Slider(-SLIDER_RANGE, SLIDER_RANGE, value=0.0, step=0.05, label=explorer.dimension_label(i))
                reset = gr.Button("Reset to the encoded code")
            with gr.Column(scale=1):
                traversed = gr.Image(label="decoded", type="pil", format="png", height=200, interactive=False)
                difference = gr.Image(label="|change| from the reconstruction", type="pil", format="png", height=200, interactive=False)
    return sliders, reset, traversed, difference


def build_app(explorer: Explorer, files_dir: Optional[str] = None):
    """The Gradio Blocks page wired to the views (every event is queued; one runs at a time).

    ``files_dir`` holds what the page serves as files: example thumbnails and exported codes.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import tempfile

    gr = import_extra("gradio", "The explorer app")

    files_dir = files_dir or tempfile.mkdtemp(prefix="sami-explore-")
    dims = explorer.order + explorer.inactive
    has_examples = explorer.examples is not None
    on = _event_handlers(gr, explorer, dims)
    title = f"SAMI latent explorer: {explorer.name}"
    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"## {title}\n{explorer.latent_dim}-dimensional code, {len(explorer.order)} active (KL > {ACTIVE_KL_NATS} nats). "
            f"Decoding: {explorer.num_inference_steps} DDIM steps, eta {explorer.eta:g}. Noise levels {explorer.axes_source}."
        )
        state = gr.State(None)
        with gr.Row():
            source, index, upload, scale, seed, encode_button = _input_column(gr, explorer, files_dir)
            with gr.Column(scale=2):
                with gr.Row():
                    input_image = gr.Image(label="input", type="pil", format="png", height=200, interactive=False)
                    exact_image = gr.Image(label="reconstruction, sami_scale 1", type="pil", format="png", height=200, interactive=False)
                    scaled_image = gr.Image(label="reconstruction, chosen sami_scale", type="pil", format="png", height=200, interactive=False)
                posterior_plot = gr.Plot(label="posterior q(z | x_0)")
        sliders, reset, traversed, difference = _traverse_tab(gr, explorer)
        with gr.Tab("Multiscale"):
            multiscale_plot = gr.Plot(label="q(z | x_t) of the current image")
        with gr.Tab("Sample"):
            with gr.Row():
                sample_seed = gr.Number(0, precision=0, label="seed")
                sample_count = gr.Slider(1, 16, value=8, step=1, label="images")
                sample_button = gr.Button("Sample z ~ N(0, I)", variant="primary")
            samples = gr.Image(label="samples", type="pil", format="png", interactive=False)
        _more_tabs(gr, explorer, state, scale, seed, files_dir)

        slider_list = [sliders[i] for i in dims]
        encode_button.click(
            on["encode"], [source, index, upload, scale, seed],
            [input_image, exact_image, scaled_image, posterior_plot, multiscale_plot, traversed, difference, state, *slider_list],
            api_name="encode",
        )
        for i in dims:
            sliders[i].release(on["moved"](i), [state, sliders[i]], [traversed, difference, state], api_name=f"traverse_z{i}")
        reset.click(on["reset"], state, [traversed, difference, state, *slider_list], api_name="reset")
        sample_button.click(on["sample"], [sample_seed, sample_count, scale], samples, api_name="sample")
        upload.upload(lambda: "upload", None, source, api_name=False, queue=False)
        index.change(lambda: "example", None, source, api_name=False, queue=False)  # a slider move or an example thumbnail
        if has_examples:
            app.load(on["encode"], [source, index, upload, scale, seed],
                     [input_image, exact_image, scaled_image, posterior_plot, multiscale_plot, traversed, difference, state, *slider_list],
                     api_name=False)
    app.queue(default_concurrency_limit=1)  # two decodes in parallel on a small CPU are each slower than in turn
    return app


def _true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="Adapter directory (examples/finetune.py --output_dir) or Hub repo id.")
    parser.add_argument("--port", type=int, default=7860, help="Port to serve on (0: a free one).")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 to serve your network).")
    parser.add_argument("--share", type=_true_or_false, default=False, metavar="{true,false}",
                        help="Open a public gradio.live link (needs internet; default false).")
    parser.add_argument("--num_inference_steps", type=int, default=EXPLORER_STEPS,
                        help=f"DDIM steps of every decode (default {EXPLORER_STEPS}: an answer in under half a second on 2 CPU cores at 16 px).")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta of every decode.")
    parser.add_argument("--num_examples", type=int, default=256, help="Held-out examples to pick from (and to measure noise levels on).")
    parser.add_argument("--axes", default=None, help="report.json of examples/evaluate.py with the noise levels (default: look in the adapter, else measure).")
    parser.add_argument("--cache_dir", default=None, help="Where measured noise levels are cached (default ~/.cache/sami-adapter/explore).")
    parser.add_argument("--num_threads", type=int, default=1,
                        help="torch CPU threads. Small models decode fastest on one (thread hand-offs dominate, and a busy "
                             "machine makes more threads much slower); raise it for large models.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device of the pipeline.")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        explorer = load_explorer(args.adapter, args.num_examples, args.axes, args.cache_dir, args.num_inference_steps, args.eta, args.device)
    except ValueError as e:  # not an adapter, or --axes without levels for it
        raise SystemExit(str(e)) from None
    port = args.port
    if port == 0:
        import socket

        with socket.socket() as s:
            s.bind((args.host, 0))
            port = s.getsockname()[1]
    import tempfile

    files_dir = tempfile.mkdtemp(prefix="sami-explore-")
    app = build_app(explorer, files_dir)
    # footer_links is Gradio 6's (pyproject pins gradio>=6.17.3,<7: the versions whose page loads nothing from outside).
    app.launch(server_name=args.host, server_port=port, share=args.share, max_file_size=MAX_UPLOAD_BYTES, show_error=True,
               footer_links=["api"], allowed_paths=[files_dir])


if __name__ == "__main__":
    main()
