"""The input contract: every accepted image type read in its documented range, everything else refused,
and sampling knobs that would give NaN, noise or a silently different batch refused with a clear error."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from tiny import tiny_pipeline


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def pixels():
    """(2, 8, 8, 1) uint8 test images and the same as a [0, 1] tensor (diffusers' image range)."""
    array = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 1)).astype(np.uint8)
    return array, torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------- images: diffusers' conventions
def test_every_accepted_image_type_reads_as_the_same_pixels(pipe, pixels):
    from sami_adapter.images import to_unit_range

    array, expected = pixels
    readings = {
        "float tensor [0, 1]": expected,
        "uint8 tensor": torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(),
        "uint8 numpy": array,
        "uint16 numpy": array.astype(np.uint16) * 257,  # 255 * 257 = 65535
        "float numpy [0, 1]": array.astype(np.float64) / 255,
        "PIL L": [PIL.Image.fromarray(a[..., 0]) for a in array],
        "PIL RGB (grey content)": [PIL.Image.fromarray(np.repeat(a, 3, axis=-1)) for a in array],
        "PIL 16-bit": [PIL.Image.fromarray(a[..., 0].astype(np.uint16) * 257) for a in array],
    }
    reference = pipe.encode(expected).mean
    for name, images in readings.items():
        torch.testing.assert_close(to_unit_range(images, channels=1), expected, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(pipe.encode(images).mean, reference, atol=1e-6, rtol=0, msg=name)


def test_a_to_tensor_image_encodes_like_the_pil_image(pipe, pixels):
    array, _ = pixels
    image = PIL.Image.fromarray(array[0, ..., 0])
    to_tensor = torch.tensor(np.asarray(image), dtype=torch.float32)[None] / 255  # what torchvision's T.ToTensor() returns (not installed here)
    torch.testing.assert_close(pipe.encode(to_tensor[None]).mean, pipe.encode(image).mean, atol=0, rtol=0)


def test_minus_one_one_tensors_are_read_as_diffusers_reads_them(pipe, pixels):
    """diffusers' rule: a float batch with a value below 0 is [-1, 1] (deprecated, FutureWarning); else [0, 1]."""
    from diffusers.image_processor import VaeImageProcessor

    _, x = pixels
    with pytest.warns(FutureWarning, match=r"value range in \[-1,1\] is deprecated"):
        old = pipe.encode(x * 2 - 1).mean
    torch.testing.assert_close(old, pipe.encode(x).mean, atol=1e-6, rtol=0)
    with pytest.warns(FutureWarning):  # diffusers reads the same batch the same way
        torch.testing.assert_close(VaeImageProcessor().preprocess(x * 2 - 1), x * 2 - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.encode(x)  # [0, 1] images: no warning
        pipe.encode(torch.zeros(1, 1, 8, 8))  # a constant black image is [0, 1]


def test_another_size_is_resized_as_diffusers_resizes(pipe, pixels):
    from diffusers.image_processor import VaeImageProcessor

    array, x = pixels
    big = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")  # 16 px; nearest back down is exact
    torch.testing.assert_close(pipe.encode(big).mean, pipe.encode(x).mean, atol=1e-6, rtol=0)
    image = PIL.Image.fromarray(np.kron(array[0, ..., 0], np.ones((3, 3), np.uint8)))  # 24 px PIL: Lanczos, as diffusers
    lanczos = VaeImageProcessor(vae_scale_factor=1, do_normalize=False).preprocess(image, 8, 8)
    torch.testing.assert_close(pipe.encode(image).mean, pipe.encode(lanczos).mean, atol=1e-6, rtol=0)
    sizes = [PIL.Image.fromarray(array[0, ..., 0]), image]  # PIL images of different sizes are each resized
    assert pipe.encode(sizes).mean.shape == (2, 3)


def test_output_types_are_diffusers(pipe):
    from diffusers.image_processor import VaeImageProcessor

    pt, np_, pil, raw = (pipe(output_type=kind, batch_size=2, num_inference_steps=2, generator=_gen(3)).images
                         for kind in ("pt", "np", "pil", "latent"))
    assert pt.shape == (2, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    torch.testing.assert_close(pt, (raw.clamp(-1, 1) + 1) / 2)
    np.testing.assert_allclose(np_, VaeImageProcessor().postprocess(raw.clamp(-1, 1), output_type="np"))
    assert np_.shape == (2, 8, 8, 1) and pil[0].mode == "L" and pil[0].size == (8, 8)


def test_a_16_bit_png_file_is_not_read_as_white(tmp_path, pixels):
    from sami_adapter.training import ImageDataset

    array, expected = pixels
    PIL.Image.fromarray(array[0, ..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    PIL.Image.fromarray(array[0, ..., 0]).save(tmp_path / "plain.png")
    assert PIL.Image.open(tmp_path / "deep.png").mode.startswith("I")
    for channels in (1, 3):
        deep = ImageDataset([str(tmp_path / "deep.png")], 8, channels).load(0, np.random.default_rng(0))
        plain = ImageDataset([str(tmp_path / "plain.png")], 8, channels).load(0, np.random.default_rng(0))
        torch.testing.assert_close(deep, plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain[0], expected[0, 0] * 2 - 1)  # the datasets yield the UNet's [-1, 1]


# ---------------------------------------------------------------- images: refuse what is not
@pytest.mark.parametrize("images, error, message", [
    (torch.full((1, 1, 8, 8), 200.0), ValueError, r"float images must lie in \[0, 1\].*got values in \[200, 200\].*uint8"),
    (np.full((1, 8, 8, 1), 2.0), ValueError, r"float images must lie in \[0, 1\]"),
    (np.full((1, 8, 8, 1), -1.5), ValueError, r"float images must lie in \[0, 1\] \(or, deprecated as in diffusers, \[-1, 1\]\)"),
    (np.zeros((1, 8, 8, 1), dtype=np.int32), TypeError, "uint8 .0, 255., uint16 .0, 65535. or float .0, 1."),
    (torch.zeros((1, 1, 8, 8), dtype=torch.int64), TypeError, r"float in \[0, 1\] or uint8"),
    (torch.full((1, 1, 8, 8), float("nan")), ValueError, "NaN or inf"),
    (torch.zeros((1, 3, 8, 8)), ValueError, r"images have 3 channel\(s\).*the model takes 1; pass 1-channel images"),
    (np.zeros((8, 8, 3), np.float32), ValueError, r"images have 3 channel\(s\)"),  # one (H, W, C) image, as diffusers reads it
    ([PIL.Image.fromarray(np.zeros((8, 8), np.float32), mode="F")], ValueError, "mode F"),
])
def test_ambiguous_or_out_of_range_images_are_refused_naming_the_range(pipe, images, error, message):
    with pytest.raises(error, match=message):
        pipe.encode(images)


# ---------------------------------------------------------------- knobs
@pytest.mark.parametrize("kwargs, message", [
    ({"eta": 1.5}, r"eta must be in \[0, 1\]"),
    ({"eta": -0.1}, r"eta must be in \[0, 1\]"),
    ({"sami_scale": float("nan")}, "sami_scale must be a finite number"),
    ({"sami_scale": float("inf")}, "sami_scale must be a finite number"),
    ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
    ({"num_inference_steps": -3}, "num_inference_steps must be an integer >= 1"),
    ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"batch_size": -1}, "batch_size must be an integer >= 1"),
    ({"batch_size": 2.0}, "batch_size must be an integer >= 1"),
    ({"latents": torch.full((1, 1, 8, 8), float("nan"))}, "latents contain NaN or inf"),
    ({"batch_size": 3, "generator": [_gen(0), _gen(1)]}, "one per sample: got 2 for a batch of 3"),
    ({"z": torch.zeros(2, 3), "batch_size": 3}, "batch_size=3 but z holds 2 codes"),
])
def test_sampling_knobs_that_would_give_nan_noise_or_another_batch_are_refused(pipe, kwargs, message):
    kwargs = {"num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(output_type="pt", **kwargs)


def test_numpy_integers_and_generator_lists_that_fit_are_accepted(pipe):
    out = pipe(batch_size=np.int64(2), num_inference_steps=np.int32(2), generator=[_gen(0), _gen(1)], output_type="pt")
    assert out.images.shape == (2, 1, 8, 8)
    # a generator list gives each sample its own stream: sample 1 alone with generator 1 is the same image
    alone = pipe(batch_size=1, num_inference_steps=2, generator=[_gen(1)], output_type="pt")
    torch.testing.assert_close(out.images[1:], alone.images)


def test_float_and_numpy_scalar_timesteps_encode_like_integers(pipe, pixels):
    _, x = pixels
    reference = pipe.encode(x, timesteps=250, generator=_gen()).mean
    for t in (250.0, np.int64(250), np.float32(250), torch.tensor(250)):
        torch.testing.assert_close(pipe.encode(x, timesteps=t, generator=_gen()).mean, reference)
    multi = pipe.encode(x, timesteps=np.array([0, 250]), generator=_gen())
    assert multi.mean.shape == (2, 2, 3)
    with pytest.raises(ValueError, match="whole numbers"):
        pipe.encode(x, timesteps=250.5)
    with pytest.raises(ValueError, match="whole numbers"):
        pipe.encode(x, timesteps=[0, 10.25])


def test_traverse_and_interpolate_refuse_a_batch(pipe, pixels):
    _, x = pixels
    with pytest.raises(ValueError, match="traverse takes one code or one image, got a batch of 2"):
        pipe.traverse(torch.zeros(2, 3), dim=0, values=[0, 1], num_inference_steps=2)
    with pytest.raises(ValueError, match="traverse takes one code or one image, got a batch of 2"):
        pipe.traverse(x, dim=0, values=[0, 1], num_inference_steps=2)
    with pytest.raises(ValueError, match="interpolate takes one code at each end"):
        pipe.interpolate(torch.zeros(2, 3), torch.ones(3), steps=3, num_inference_steps=2)


# ---------------------------------------------------------------- LatentPosterior shapes
def test_one_image_at_several_timesteps(pipe, pixels):
    try:
        from sami_adapter.noise_levels import information_profile
    except ImportError:
        from sami_adapter.analysis import information_profile

    _, x = pixels
    one = pipe.encode(x[:1], timesteps=[0, 250, 900], generator=_gen())
    assert one.mean.shape == (3, 1, 3) and one.logvar.shape == (3, 1, 3) and one.sample(_gen()).shape == (3, 1, 3)
    torch.testing.assert_close(one.mean[0], pipe.encode(x[:1]).mean)  # t = 0 is the clean posterior
    three = torch.cat([x, x[:1]])
    profile = information_profile(pipe, three, timesteps=[0, 500], generator=_gen(), batch_size=2)  # 3 % 2 == 1
    full = information_profile(pipe, three, timesteps=[0, 500], generator=_gen(), batch_size=3)
    np.testing.assert_allclose(profile["kl"][0], full["kl"][0], rtol=1e-6)  # the clean row does not depend on the noise
