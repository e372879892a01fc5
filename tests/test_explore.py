"""examples/explore.py: the view functions on a tiny trained adapter, the running app through
gradio_client, and the page in headless chromium."""

import base64
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from scripts import load_example
from tiny import tiny_unet

from sami_adapter import SAMIEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "explore.py")
OFF = 2  # the dimension switched off in the tiny adapter


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


explore = _load("explore_app", SCRIPT)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A 3-dim adapter trained for 20 steps on 8 px disks over a tiny base UNet, then z2 switched off.

    The encoder starts with narrow posteriors (log-variance -3), so after a short run z0 and z1 carry
    KL > 0.1 nats and their guidance moves the samples. z2 gets zero weights and bias in both head
    rows: q(z2 | x_t) is exactly the prior N(0, 1) for every input, so its KL is 0 and its guidance
    term is exactly 0: moving z2 must change no pixel.
    """
    from accelerate.state import AcceleratorState
    from diffusers import DDPMScheduler

    finetune = _load("finetune_for_explore", os.path.join(ROOT, "examples", "finetune.py"))
    root = tmp_path_factory.mktemp("explore")
    base, out = root / "base", root / "adapter"
    torch.manual_seed(0)
    tiny_unet(sample_size=8).save_pretrained(base / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(base / "scheduler")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        finetune.main(["--pretrained_model_name_or_path", str(base), "--output_dir", str(out), "--resolution", "8",
                       "--train_batch_size", "8", "--latent_dim", "3", "--encoder_channels", "8,16",
                       "--learning_rate", "1e-2", "--max_train_steps", "20", "--report_to", "none", "--validation_steps", "0",
                       "--logging_steps", "10", "--seed", "3", "--num_threads", "1", "--no_report"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    encoder = SAMIEncoder.from_pretrained(out / "encoder")
    with torch.no_grad():
        for row in (OFF, encoder.config.latent_dim + OFF):
            encoder.head.weight[row] = 0.0
            encoder.head.bias[row] = 0.0
    encoder.save_pretrained(out / "encoder")
    return str(out)


@pytest.fixture(scope="module")
def explorer(adapter_dir, tmp_path_factory):
    ex = explore.load_explorer(adapter_dir, num_examples=32, cache_dir=str(tmp_path_factory.mktemp("cache")), num_inference_steps=6)
    ex.pipe.set_progress_bar_config(disable=True)
    return ex


# ---------------------------------------------------------------------------------------- views
def test_active_dimensions_order_and_cached_levels(explorer, adapter_dir):
    assert explorer.kl[OFF] == 0.0
    assert explorer.kl[0] > explore.ACTIVE_KL_NATS and explorer.kl[1] > explore.ACTIVE_KL_NATS
    assert sorted(explorer.order) == [0, 1] and explorer.inactive == [OFF]
    assert explorer.dimension_label(OFF) == "z2  (KL 0.00 nats): inactive"
    assert explorer.axes_source == "measured on 32 held-out examples" and os.path.isfile(explorer.axes_cache)
    # Loaded again, the levels come from the cache file (edited here to tell a read from a re-measurement).
    with open(explorer.axes_cache) as f:
        cached = json.load(f)
    assert cached["characteristic_noise_levels"]["order"] == explorer.order
    cached["characteristic_noise_levels"]["order"] = explorer.order[::-1]
    edited = os.path.join(os.path.dirname(explorer.axes_cache), "edited")
    os.makedirs(edited)
    with open(os.path.join(edited, os.path.basename(explorer.axes_cache)), "w") as f:
        json.dump(cached, f)
    again = explore.load_explorer(adapter_dir, num_examples=32, cache_dir=edited)
    assert again.order == explorer.order[::-1] and again.axes_cache.startswith(edited)
    np.testing.assert_allclose(again.kl, explorer.kl)
    # An evaluation report in the adapter directory (what examples/evaluate.py writes) takes precedence over measuring.
    from sami_adapter.noise_levels import discover_axes
    from sami_adapter.report import axes_to_json, write_json

    axes = discover_axes(explorer.pipe, explorer.examples[:16], timesteps=[0, 200, 400, 600, 800, 999], seed=1)
    report = write_json(os.path.join(adapter_dir, "evaluation", "report.json"), {"axis_discovery": axes_to_json(axes)})
    try:
        from_report = explore.load_explorer(adapter_dir, num_examples=32, cache_dir=edited)
    finally:
        shutil.rmtree(os.path.dirname(report))
    assert from_report.axes_source == f"from {report}" and from_report.axes_cache is None
    assert from_report.order == list(axes["levels"]["order"])
    np.testing.assert_allclose(from_report.kl, axes["profile"]["kl"][0])


def test_encode_view_is_the_pipeline_reconstruction(explorer):
    image = explore.example_image(explorer, 3)
    view = explore.encode_view(explorer, image, sami_scale=2.0, seed=5)
    posterior = explorer.pipe.encode(image)
    np.testing.assert_allclose(view["z"], posterior.mean[0].double().numpy())
    np.testing.assert_allclose(view["std"], posterior.std[0].double().numpy())
    assert view["std"][OFF] == 1.0 and view["z"][OFF] == 0.0
    kwargs = dict(num_inference_steps=explorer.num_inference_steps, eta=explorer.eta, output_type="pt")
    exact = explorer.pipe.reconstruct(image, sami_scale=1.0, generator=torch.Generator().manual_seed(5), **kwargs).images
    scaled = explorer.pipe.reconstruct(image, sami_scale=2.0, generator=torch.Generator().manual_seed(5), **kwargs).images
    assert torch.equal(view["reconstruction"], exact) and torch.equal(view["reconstruction_scaled"], scaled)
    assert len(view["pictures"]) == 3 and view["pictures"][0].size == view["pictures"][1].size
    assert len(view["figure"].axes[0].patches) == explorer.latent_dim  # one bar per dimension


def test_traverse_view_changes_only_through_active_dimensions(explorer):
    image = explore.example_image(explorer, 0)
    view = explore.encode_view(explorer, image, sami_scale=3.0, seed=1)
    reference = view["reconstruction_scaled"]
    same = explore.traverse_view(explorer, view["z"], 0, view["z"][0], 3.0, 1, reference=reference)
    assert same["change"] == 0.0 and torch.equal(same["image"], reference)  # same code, same noise: the reconstruction
    off = explore.traverse_view(explorer, view["z"], OFF, 2.5, 3.0, 1, reference=reference)
    assert off["change"] == 0.0 and off["z"][OFF] == 2.5
    moved = explore.traverse_view(explorer, view["z"], 0, view["z"][0] + 2.5, 3.0, 1, reference=reference)
    assert moved["change"] > 0.01 and len(moved["pictures"]) == 2
    np.testing.assert_allclose(moved["z"][1:], view["z"][1:])
    with pytest.raises(explore.InputError, match=r"Dimension 3 does not exist; this code has z0 to z2\."):
        explore.traverse_view(explorer, view["z"], 3, 0.0)


def test_multiscale_view_falls_back_to_the_prior(explorer):
    image = explore.example_image(explorer, 1)
    view = explore.multiscale_view(explorer, image, timesteps=(0, 300, 999), seed=2)
    assert view["mean"].shape == (3, 3) and view["std"].shape == (3, 3)
    np.testing.assert_allclose(view["mean"][0], explorer.pipe.encode(image).mean[0].double().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(view["mean"][:, OFF], 0.0)
    np.testing.assert_array_equal(view["std"][:, OFF], 1.0)
    assert len(view["figure"].axes[0].lines) >= len(explorer.order)


def test_sample_view_is_seeded_pipeline_sampling(explorer):
    a = explore.sample_view(explorer, seed=4, num_images=3, sami_scale=1.0)
    b = explore.sample_view(explorer, seed=4, num_images=3, sami_scale=1.0)
    c = explore.sample_view(explorer, seed=5, num_images=3, sami_scale=1.0)
    assert a["images"].shape == (3, 1, 8, 8) and a["z"].shape == (3, 3)
    assert torch.equal(a["images"], b["images"]) and not torch.equal(a["images"], c["images"])
    direct = explorer.pipe(batch_size=3, generator=torch.Generator().manual_seed(4), num_inference_steps=explorer.num_inference_steps,
                           eta=explorer.eta, sami_scale=1.0, output_type="pt")
    assert torch.equal(a["images"], direct.images)
    with pytest.raises(explore.InputError, match="Draw between 1 and 64 images, not 0."):
        explore.sample_view(explorer, num_images=0)


def test_grid_view_is_one_traversal_per_active_dimension(explorer):
    image = explore.example_image(explorer, 2)
    z = explorer.pipe.encode(image).mean[0].double().numpy()
    view = explore.grid_view(explorer, z, sami_scale=2.0, seed=3, steps=4)
    assert view["rows"] == explorer.order
    np.testing.assert_allclose(view["values"], [-2.5, -2.5 + 5 / 3, 2.5 - 5 / 3, 2.5], rtol=0, atol=1e-12)
    assert view["images"].shape == (len(explorer.order) * 4, 1, 8, 8)
    for r, d in enumerate(explorer.order):  # each row is SAMIPipeline.traverse from the same seeded noise
        direct = explorer.pipe.traverse(torch.as_tensor(z, dtype=torch.float32), d, view["values"], sami_scale=2.0,
                                        num_inference_steps=explorer.num_inference_steps, eta=explorer.eta,
                                        generator=torch.Generator().manual_seed(3), output_type="pt").images
        assert torch.equal(view["images"][4 * r : 4 * r + 4], direct)
    with pytest.raises(explore.InputError, match="A grid row takes between 2 and 15 values, not 1."):
        explore.grid_view(explorer, z, steps=1)


def test_interpolation_view_runs_between_the_two_codes(explorer):
    a, b = explore.example_image(explorer, 0), explore.example_image(explorer, 5)
    view = explore.interpolation_view(explorer, a, b, steps=3, sami_scale=1.0, seed=2)
    z_a, z_b = (explorer.pipe.encode(x).mean[0].double().numpy() for x in (a, b))
    np.testing.assert_allclose(view["z"], np.stack([z_a, (z_a + z_b) / 2, z_b]), rtol=1e-5, atol=1e-6)
    assert view["images"].shape == (3, 1, 8, 8) and 0 <= view["images"].min() and view["images"].max() <= 1
    with pytest.raises(explore.InputError, match="between 2 and 16 steps, not 1"):
        explore.interpolation_view(explorer, a, b, steps=1)


def test_code_export_decodes_to_the_same_image(explorer, tmp_path):
    image = explore.example_image(explorer, 1)
    view = explore.encode_view(explorer, image, sami_scale=2.0, seed=4)
    state = {"z": view["z"].tolist(), "scale": 2.0, "seed": 4}
    path = explore.write_code(explorer, state, str(tmp_path))
    with open(path) as f:
        record = json.load(f)
    assert record["z"] == state["z"] and record["sami_scale"] == 2.0 and record["seed"] == 4
    decoded = explorer.pipe(z=torch.tensor([record["z"]]), sami_scale=record["sami_scale"], num_inference_steps=record["num_inference_steps"],
                            eta=record["eta"], generator=torch.Generator().manual_seed(record["seed"]), output_type="pt").images
    torch.testing.assert_close(decoded, view["reconstruction_scaled"])
    with pytest.raises(explore.InputError, match="Encode an image first"):
        explore.write_code(explorer, None, str(tmp_path))
    thumbs = explore.write_thumbnails(explorer, str(tmp_path / "thumbs"), count=3)
    assert len(thumbs) == 3 and all(Image.open(p).size[0] >= 8 for p in thumbs)


def test_load_image_converts_like_training_and_refuses_bad_files(explorer, tmp_path):
    rgb = np.zeros((30, 40, 3), dtype=np.uint8)
    rgb[10:20, 15:25] = 255
    Image.fromarray(rgb).save(tmp_path / "disk.png")
    image = explore.load_image(str(tmp_path / "disk.png"), explorer)
    assert image.shape == (1, 1, 8, 8) and image.min() >= 0 and image.max() <= 1  # the pipeline's [0, 1]
    assert image[0, 0, 4, 4] > 0.95 and image[0, 0, 0, 0] == 0.0  # white centre, black corner, centre-cropped
    assert torch.equal(explore.load_image(Image.fromarray(rgb), explorer), image)
    explore.encode_view(explorer, image, seed=0)  # what an upload gives, encode takes

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(explore.InputError, match=r"empty.png is empty \(0 bytes\): upload a PNG, JPEG, WebP or BMP image\."):
        explore.load_image(str(tmp_path / "empty.png"), explorer)
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(explore.InputError, match=r"notes.txt is not a picture this app can read"):
        explore.load_image(str(tmp_path / "notes.txt"), explorer)
    Image.new("L", (6000, 5000)).save(tmp_path / "huge.png")
    with pytest.raises(explore.InputError, match=r"huge.png is 6000x5000 pixels; the explorer takes at most 25 megapixels"):
        explore.load_image(str(tmp_path / "huge.png"), explorer)
    with pytest.raises(explore.InputError, match="No file was received"):
        explore.load_image(None, explorer)


def test_command_line_flags():
    args = explore.parse_args(["sami-disks-adapter"])
    assert args.share is False and args.host == "127.0.0.1" and args.num_inference_steps == 12 and args.num_threads == 1
    assert explore.parse_args(["a", "--share", "True", "--port", "0"]).share is True
    with pytest.raises(SystemExit):
        explore.parse_args(["a", "--share", "maybe"])


# ---------------------------------------------------------------------------------------- the running app
@contextmanager
def serve(adapter, workdir, steps=explore.EXPLORER_STEPS, num_examples=256):
    """Run examples/explore.py on 127.0.0.1 and a free port; yield its URL; stop its process group."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env.update({"PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(workdir / "gradio")})
    log_path = workdir / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, SCRIPT, adapter, "--port", "0", "--num_examples", str(num_examples), "--cache_dir", str(workdir / "cache"),
                                 "--num_inference_steps", str(steps)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, url = time.time() + 150, None
        while url is None:
            match = re.search(r"Running on local URL:\s+(http://127\.0\.0\.1:\d+)", log_path.read_text())
            url = match.group(1) if match else None
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the app did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def app_url(adapter_dir, tmp_path_factory):
    pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]'")
    with serve(adapter_dir, tmp_path_factory.mktemp("app"), steps=6, num_examples=32) as url:
        yield url


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.float64)


def test_app_end_to_end_with_gradio_client(app_url, explorer, tmp_path):
    client_module = pytest.importorskip("gradio_client", reason="the end-to-end test needs gradio_client (installed with gradio)")
    client = client_module.Client(app_url + "/", verbose=False)
    endpoints = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/encode", "/traverse_z0", "/traverse_z1", "/traverse_z2", "/reset", "/sample", "/grid", "/interpolate", "/code"} <= endpoints
    with pytest.raises(Exception, match="Encode an image first"):
        client.predict(api_name="/code")

    out = client.predict("example", 0, None, 3.0, 0, api_name="/encode")
    inputs, exact, scaled = (_pixels(p) for p in out[:3])
    sliders = dict(zip(explorer.order + explorer.inactive, out[-3:]))  # the page lists active dimensions first
    assert inputs.shape == exact.shape == scaled.shape and sliders[OFF] == 0.0

    # Moving the switched-off dimension changes nothing; moving an active one changes the image.
    decoded_off, diff_off = client.predict(3.0, api_name=f"/traverse_z{OFF}")
    change_off = np.abs(_pixels(decoded_off) - scaled).mean()
    client.predict(api_name="/reset")
    decoded_on, diff_on = client.predict(sliders[0] + 3.0, api_name="/traverse_z0")
    change_on = np.abs(_pixels(decoded_on) - scaled).mean()
    assert change_off < change_on and change_on > 1.0  # mean change in 0-255 pixel units
    assert _pixels(diff_off).max() <= _pixels(diff_on).max()

    # The grid: a row of 5 per active dimension; the code export: the page's current code as JSON.
    grid = _pixels(client.predict(5, api_name="/grid"))
    assert grid.shape[0] < grid.shape[1] and grid.std() > 0
    with open(client.predict(api_name="/code")) as f:
        record = json.load(f)
    assert len(record["z"]) == explorer.latent_dim and record["z"][0] == pytest.approx(sliders[0] + 3.0, abs=1e-4)
    assert record["seed"] == 0 and record["sami_scale"] == 3.0
    between = _pixels(client.predict(None, 0, None, 1, 4, 3.0, 0, api_name="/interpolate"))
    assert between.shape[1] > 5 * between.shape[0] and between.std() > 0  # a, four decodes, b in one row

    first = _pixels(client.predict(7, 4, 1.0, api_name="/sample"))
    again = _pixels(client.predict(7, 4, 1.0, api_name="/sample"))
    np.testing.assert_array_equal(first, again)

    # Bad uploads give a message in the page and the app keeps serving.
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a picture")
    Image.new("L", (6000, 5000)).save(tmp_path / "huge.png")
    (tmp_path / "big.png").write_bytes(os.urandom(explore.MAX_UPLOAD_BYTES + 1))  # refused by Gradio itself
    for name, message in [("empty.png", "is empty (0 bytes)"), ("notes.txt", "is not a picture this app can read"),
                          ("huge.png", "6000x5000 pixels"), ("big.png", "exceeds the maximum file size")]:
        with pytest.raises(Exception, match=re.escape(message)):
            client.predict("upload", 0, client_module.handle_file(str(tmp_path / name)), 3.0, 0, api_name="/encode")
    again = client.predict("example", 0, None, 3.0, 0, api_name="/encode")
    np.testing.assert_array_equal(_pixels(again[2]), scaled)


# ---------------------------------------------------------------------------------------- the page in a browser
def find_browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    """Headless chromium driven with the DevTools protocol over ``--remote-debugging-pipe``
    (NUL-terminated JSON messages on file descriptors 3 and 4; no extra package needed)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--remote-debugging-pipe"]

    def __init__(self, executable, profile_dir, width=1280, height=1300):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        flags = [*self.FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "about:blank"]
        command = "exec " + " ".join([executable, *flags]) + f" 3<&{to_browser} 4>&{from_browser}"
        self.proc = subprocess.Popen(["bash", "-c", command], pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id, self.events = b"", 0, []

    def _message(self, timeout):
        while b"\0" not in self._buffer:
            if not select.select([self._read], [], [], timeout)[0]:
                raise TimeoutError("the browser did not answer")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser exited")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method, session=None, timeout=60, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
            self.proc.wait(10)
        except Exception:
            os.killpg(self.proc.pid, signal.SIGKILL)
        os.close(self._write)
        os.close(self._read)


PAGE_STATE = """(() => {
  const images = [...document.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0 && i.src.includes('file='));
  return {sliders: [...document.querySelectorAll('input[type=range]')].length,
          images: images.length,
          busy: document.querySelectorAll('.eta-bar, .progress-text').length,
          text: document.body.innerText};
})()"""


CLICK = """((name) => {  // a tab (role=tab: Gradio also keeps hidden copies of tab labels for measuring) or a button
  const visible = [...document.querySelectorAll('[role=tab], button')].filter(b => b.innerText.trim() === name && b.offsetParent !== null);
  const button = visible.find(b => b.getAttribute('role') === 'tab') || visible.find(b => b.tabIndex !== -1);
  if (button) button.click();
  return !!button;
})(%s)"""

SHOWN = """((label) => {
  const block = [...document.querySelectorAll('.block')].find(b => b.offsetParent !== null && b.querySelector('img')
                                                                  && b.innerText.includes(label));
  const image = block && block.querySelector('img');
  if (image) image.scrollIntoView({block: 'center'});  // Gradio's images load lazily: only near the viewport
  return {shown: !!(image && image.complete && image.naturalWidth > 0 && image.src.includes('file=')),
          busy: document.querySelectorAll('.eta-bar, .progress-text').length,
          thumbnails: [...document.querySelectorAll('img')].filter(i => i.src.includes('example-') && i.naturalWidth > 0).length,
          errors: [...document.querySelectorAll('.toast-body')].map(e => e.innerText).join(' | ')};
})(%s)"""


def _until(browser, session, expression, done, timeout=90):
    deadline, value = time.time() + timeout, {}
    while time.time() < deadline:
        value = browser.send("Runtime.evaluate", session=session, expression=expression, returnByValue=True)["result"].get("value") or {}
        if done(value):
            return value
        time.sleep(0.5)
    return value


def _open_tab_and_run(browser, session, tab, button, label):
    """Click a tab, then its button; wait until the image labelled ``label`` has loaded and nothing is running."""
    assert _until(browser, session, CLICK % json.dumps(tab), bool, timeout=10), tab
    time.sleep(2)  # the tab's content renders, then gets its event handlers: a click before that is lost
    clicked = _until(browser, session, CLICK % json.dumps(button), bool, timeout=10)
    buttons = "[...document.querySelectorAll('button')].filter(b => b.offsetParent !== null).map(b => b.innerText.trim()).join(' | ')"
    assert clicked, (button, browser.send("Runtime.evaluate", session=session, expression=buttons, returnByValue=True)["result"])
    return _until(browser, session, SHOWN % json.dumps(label), lambda v: v.get("shown") and v.get("busy") == 0)


def test_page_in_headless_chromium(request, tmp_path):
    """Open the page, wait until the first example is encoded, screenshot it, check what a person sees.

    With SAMI_EXPLORE_ADAPTER=DIR the page serves that adapter instead of the tiny one, and with
    SAMI_EXPLORE_SCREENSHOT=PATH the screenshot is also written there (the README's picture).
    """
    executable = find_browser()
    if executable is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (apt-get install -y chromium), as .ci/run does")
    pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]'")
    adapter = os.environ.get("SAMI_EXPLORE_ADAPTER")
    with (serve(adapter, tmp_path) if adapter else _shared(request)) as url:
        browser = Browser(executable, tmp_path / "profile")
        try:
            target = browser.send("Target.createTarget", url="about:blank")["targetId"]
            session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            browser.send("Network.enable", session=session)
            browser.send("Page.navigate", session=session, url=url + "/")
            deadline, state = time.time() + 90, {}
            while time.time() < deadline:
                state = browser.send("Runtime.evaluate", session=session, expression=PAGE_STATE, returnByValue=True)["result"].get("value") or {}
                if state.get("images", 0) >= 4 and state.get("busy", 1) == 0:
                    break
                time.sleep(0.5)
            time.sleep(0.5)  # let the plot finish painting
            shot = base64.b64decode(browser.send("Page.captureScreenshot", session=session, format="png")["data"])
            thumbnails = _until(browser, session, SHOWN % json.dumps("held-out examples"), lambda v: v.get("thumbnails", 0) >= 2)
            grid = _open_tab_and_run(browser, session, "Grid", "Decode the grid", "traversal grid")
            between = _open_tab_and_run(browser, session, "Interpolate", "Decode from a to b", "the decodes from a to b")
        finally:
            browser.close()
    path = tmp_path / "explorer.png"
    path.write_bytes(shot)
    # input + two reconstructions + the traversal image, all loaded from the app; the example and
    # sami_scale sliders plus one per active dimension.
    assert state.get("images", 0) >= 4, f"the page never showed its images: {state.get('text', '')[:500]}"
    assert state["busy"] == 0
    assert state["sliders"] >= 2 + (0 if adapter else 2)
    assert "SAMI latent explorer" in state["text"]
    assert thumbnails.get("thumbnails", 0) >= 2, "the held-out example thumbnails did not load"
    assert grid.get("shown") and between.get("shown"), (grid, between)  # the Grid and Interpolate tabs decode in the page
    assert "loses half its information" in state["text"] or "keeps over half its information" in state["text"]  # slider labels
    with Image.open(path) as picture:
        assert picture.size[0] >= 1000 and np.asarray(picture.convert("L")).std() > 10  # not a blank page
    # Nothing the page loaded came from anywhere but the app itself (no fonts, CDN or analytics).
    requested = {e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"}
    outside = sorted(u for u in requested if not u.startswith((url, "data:", "blob:", "about:")))
    assert requested and not outside, outside
    if os.environ.get("SAMI_EXPLORE_SCREENSHOT"):
        with Image.open(path) as picture:
            small = picture.convert("RGB").resize((picture.width * 3 // 4, picture.height * 3 // 4), Image.LANCZOS)
            small.quantize(colors=128).save(os.environ["SAMI_EXPLORE_SCREENSHOT"], optimize=True)


@contextmanager
def _shared(request):
    yield request.getfixturevalue("app_url")


def test_benchmark_times_the_explorer_answer_under_bf16_autocast(adapter_dir, tmp_path):
    """examples/benchmark.py part three on the tiny adapter, with --dtype bf16 on the CPU."""
    benchmark = load_example("benchmark")
    results = benchmark.main(["--sizes", "tiny", "--skip_training", "--num_inference_steps", "2", "--repeats", "1", "--warmup", "0",
                              "--threads", "1", "--device", "cpu", "--dtype", "bf16", "--no_progress", "--output_dir", str(tmp_path),
                              "--explorer_adapter", adapter_dir, "--profile"])
    profiles = results["sizes"]["tiny"]["profiles"]
    assert set(profiles) == {"guided_sampling", "frozen_training_step"} and all(p["top"][0]["self_ms"] > 0 for p in profiles.values())
    assert results["dtype"] == "bf16" and results["sizes"]["tiny"]["sampling"]["guided_s_per_image"] > 0
    e = results["explorer"]
    assert e["default_steps"] == explore.EXPLORER_STEPS == 12 and e["s_per_answer"] > 0 and e["s_per_answer_25_steps"] > 0
    assert set(e["passed"]) == {"s_per_answer"}
    table = (tmp_path / "benchmark.md").read_text()
    assert "Precision: bf16 (autocast)" in table and "Part three: the explorer" in table and "### Profile: tiny, guided sampling" in table
