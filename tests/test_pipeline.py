"""SAMIPipeline: sampling, encoding, round trips and input errors on tiny models."""

import inspect
import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, KDPM2DiscreteScheduler
from tiny import tiny_encoder, tiny_pipeline, tiny_unet

from sami_adapter import SAMIEncoder, SAMIPipeline, apply_guidance, guided_output, sami_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_call_shapes_output_types_and_z():
    pipe = tiny_pipeline()
    out = pipe(batch_size=3, num_inference_steps=4, generator=_gen(), output_type="pt")
    assert out.images.shape == (3, 1, 8, 8) and out.z.shape == (3, 3)
    assert out.images.abs().max() <= 1
    pil = pipe(batch_size=2, num_inference_steps=2, generator=_gen()).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    arr = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert arr.shape == (1, 8, 8, 1) and 0 <= arr.min() and arr.max() <= 1


def test_guidance_changes_samples_and_scale_zero_is_unconditional():
    pipe = tiny_pipeline()
    noise = torch.randn(2, 1, 8, 8, generator=_gen(1))
    z = torch.randn(2, 3, generator=_gen(2))
    guided = pipe(z=z, latents=noise, num_inference_steps=4, output_type="pt").images
    other = pipe(z=-z, latents=noise, num_inference_steps=4, output_type="pt").images
    off = pipe(z=z, latents=noise, num_inference_steps=4, sami_scale=0.0, output_type="pt").images
    off_other = pipe(z=-z, latents=noise, num_inference_steps=4, sami_scale=0.0, output_type="pt").images
    assert not torch.allclose(guided, other)
    torch.testing.assert_close(off, off_other)


def test_guidance_scale_is_cfg_and_refused_without_text_conditioning():
    """``sami_scale`` is the SAMI knob; ``guidance_scale`` keeps diffusers' meaning (the CFG weight),
    so an unconditional UNet refuses it instead of silently reading it as the SAMI knob."""
    pipe = tiny_pipeline()
    noise = torch.randn(2, 1, 8, 8, generator=_gen(1))
    z = torch.randn(2, 3, generator=_gen(2))
    default = pipe(z=z, latents=noise, num_inference_steps=4, output_type="pt").images
    torch.testing.assert_close(default, pipe(z=z, latents=noise, num_inference_steps=4, sami_scale=1.0, guidance_scale=1.0, output_type="pt").images)
    assert not torch.allclose(default, pipe(z=z, latents=noise, num_inference_steps=4, sami_scale=2.0, output_type="pt").images)
    with pytest.raises(ValueError, match="guidance_scale=2.0 is the classifier-free guidance weight.*sami_scale"):
        pipe(z=z, latents=noise, num_inference_steps=4, guidance_scale=2.0)
    for name in ("sami_scale", "guidance_scale"):
        assert inspect.signature(SAMIPipeline.__call__).parameters[name].default == 1.0
    for fn in (apply_guidance, guided_output, sami_loss):
        params = inspect.signature(fn).parameters
        assert "sami_scale" in params and "guidance_scale" not in params


def test_encode_single_and_multiscale():
    pipe = tiny_pipeline()
    x = torch.rand(4, 1, 8, 8)
    post = pipe.encode(x)
    assert post.mean.shape == (4, 3) and post.logvar.shape == (4, 3)
    multi = pipe.encode(x, timesteps=[0, 100, 900], generator=_gen())
    assert multi.mean.shape == (3, 4, 3)
    torch.testing.assert_close(multi.mean[0], post.mean)  # t = 0 is the clean image
    single = pipe.encode(x, timesteps=100, generator=_gen())
    assert single.mean.shape == (4, 3)
    assert post.sample(_gen()).shape == (4, 3) and post.kl().shape == (4,)


def test_reconstruct_traverse_interpolate():
    pipe = tiny_pipeline()
    x = torch.rand(2, 1, 8, 8)
    rec = pipe.reconstruct(x, num_inference_steps=3, output_type="pt", generator=_gen())
    assert rec.images.shape == (2, 1, 8, 8)
    torch.testing.assert_close(rec.z, pipe.encode(x).mean)
    trav = pipe.traverse(x[:1], dim=1, values=[-2, 0, 2], num_inference_steps=3, output_type="pt", generator=_gen())
    assert trav.images.shape == (3, 1, 8, 8)
    assert torch.equal(trav.z[:, 1], torch.tensor([-2.0, 0.0, 2.0]))
    assert torch.equal(trav.z[:, 0], trav.z[0, 0].expand(3))
    inter = pipe.interpolate(torch.zeros(3), torch.ones(3), steps=5, num_inference_steps=3, output_type="pt")
    torch.testing.assert_close(inter.z[:, 0], torch.linspace(0, 1, 5))


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDPMScheduler, KDPM2DiscreteScheduler])
def test_scheduler_swap(scheduler_cls):
    """With sami_scale 0 the pipeline is exactly the scheduler's own loop over the UNet; with guidance it differs.
    (The guided output itself is checked against closed forms for every scheduler in test_guidance.py.)"""
    pipe = tiny_pipeline()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    z, noise = torch.randn(2, 3, generator=_gen(1)), torch.randn(2, 1, 8, 8, generator=_gen(2))
    off = pipe(z=z, latents=noise, num_inference_steps=4, sami_scale=0.0, generator=_gen(), output_type="pt").images
    scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    sample, g = noise * scheduler.init_noise_sigma, _gen()
    kwargs = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            sample = scheduler.step(pipe.unet(scheduler.scale_model_input(sample, t), t).sample, t, sample, **kwargs).prev_sample
    torch.testing.assert_close(off, (sample.clamp(-1, 1) + 1) / 2)  # pt output in [0, 1], as diffusers
    guided = pipe(z=z, latents=noise, num_inference_steps=4, generator=_gen(), output_type="pt").images
    assert torch.isfinite(guided).all() and (guided - off).abs().max() > 1e-4


def test_save_load_round_trip_identical(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "encoder" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((tmp_path / "model_index.json").read_text())["encoder"] == ["sami_adapter.encoder", "SAMIEncoder"]
    loaded = SAMIPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, num_inference_steps=3, generator=_gen(5), output_type="pt").images
    b = loaded(batch_size=2, num_inference_steps=3, generator=_gen(5), output_type="pt").images
    assert torch.equal(a, b)
    encoder = SAMIEncoder.from_pretrained(tmp_path / "encoder")
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(encoder(x, 0).mean, pipe.encoder(x, 0).mean)


def test_custom_pipeline_entry(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=os.path.join(ROOT, "pipelines", "sami"), trust_remote_code=True)
    assert type(loaded).__name__ == "SAMIPipeline"
    loaded.set_progress_bar_config(disable=True)
    a = pipe(batch_size=1, num_inference_steps=2, generator=_gen(3), output_type="pt").images
    b = loaded(batch_size=1, num_inference_steps=2, generator=_gen(3), output_type="pt").images
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_push_to_hub_uploads_the_saved_pipeline(tmp_path, monkeypatch):
    """The network edge is replaced; everything up to the upload runs for real."""
    import diffusers.utils.hub_utils as hub_utils

    uploaded = {}

    class _Repo:
        repo_id = "user/sami-test"

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.path.relpath(os.path.join(r, f), folder_path) for r, _, fs in os.walk(folder_path) for f in fs)

    def no_remote_card(*args, **kwargs):
        raise hub_utils.EntryNotFoundError("offline test: no remote model card")

    monkeypatch.setattr(hub_utils, "create_repo", lambda *a, **k: _Repo())
    monkeypatch.setattr(hub_utils.ModelCard, "load", no_remote_card)
    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload_folder)
    tiny_pipeline().push_to_hub("user/sami-test")
    assert uploaded["repo_id"] == "user/sami-test"
    assert "model_index.json" in uploaded["files"]
    assert os.path.join("encoder", "diffusion_pytorch_model.safetensors") in uploaded["files"]


# ---------------------------------------------------------------- bad input
def test_bad_images_raise():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=r"image tensors must be \(N, C, H, W\) or \(C, H, W\), got shape \(2, 1, 1, 8, 8\)"):
        pipe.encode(torch.zeros(2, 1, 1, 8, 8))
    with pytest.raises(ValueError, match="the model takes 1"):
        pipe.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN or inf"):
        pipe.encode(torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="NaN or inf"):
        pipe.reconstruct(torch.full((1, 1, 8, 8), float("inf")))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pipe.encode("not an image")


def test_pil_and_numpy_images_are_accepted():
    pipe = tiny_pipeline()
    arr = (np.random.rand(2, 8, 8, 1) * 255).astype(np.uint8)
    from_np = pipe.encode(arr).mean
    from_pil = pipe.encode(pipe.postprocess(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1, "pil")).mean
    torch.testing.assert_close(from_np, from_pil)


def test_bad_z_and_latents_raise():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=r"z must have shape \(N, 3\)"):
        pipe(z=torch.zeros(2, 5), num_inference_steps=2)
    with pytest.raises(ValueError, match="NaN"):
        pipe(z=torch.full((1, 3), float("nan")), num_inference_steps=2)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(z=torch.zeros(2, 3), latents=torch.zeros(1, 1, 8, 8), num_inference_steps=2)
    with pytest.raises(ValueError, match="dim must be"):
        pipe.traverse(torch.zeros(3), dim=7, values=[0, 1])


def test_encoder_for_another_unet_raises(tmp_path):
    with pytest.raises(ValueError, match="saved for another UNet"):
        SAMIPipeline(unet=tiny_unet(sample_size=8), scheduler=DDPMScheduler(), encoder=tiny_encoder(sample_size=16))
    with pytest.raises(ValueError, match="saved for another UNet"):
        SAMIPipeline(unet=tiny_unet(channels=1), scheduler=DDPMScheduler(), encoder=tiny_encoder(channels=3))
    # also when loading a saved pipeline whose encoder was swapped on disk
    tiny_pipeline().save_pretrained(tmp_path)
    tiny_encoder(sample_size=16).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match="saved for another UNet"):
        SAMIPipeline.from_pretrained(tmp_path)


def test_unsuitable_scheduler_and_timesteps_raise():
    pipe = tiny_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(TypeError, match="alphas_cumprod"):
        pipe(batch_size=1, num_inference_steps=2)
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="out of range"):
        pipe.encode(torch.zeros(1, 1, 8, 8), timesteps=[-1, 10])
    with pytest.raises(ValueError, match="out of range"):
        pipe.encode(torch.zeros(1, 1, 8, 8), timesteps=1000)


def test_encoder_posterior_and_time_blind_option():
    enc = tiny_encoder(time_conditioning=False)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(enc(x, 0).mean, enc(x, 999).mean)
    enc = tiny_encoder()
    post = enc(x, 0)
    # zero-initialised head: every posterior starts at N(0, e^{-1}), so guidance starts at exactly 0
    assert torch.equal(post.mean, torch.zeros(2, 3))
    torch.testing.assert_close(post.logvar, torch.full((2, 3), -1.0))
    torch.testing.assert_close(post.kl(), 3 * 0.5 * (np.exp(-1) - 1 + 1) * torch.ones(2))
    with pytest.raises(ValueError, match="expects input of shape"):
        enc(torch.zeros(2, 3, 8, 8), 0)


# ---------------------------------------------------------------- diffusers' calling conventions
def test_prompt_is_the_first_positional_argument_and_z_a_keyword():
    from test_latent_diffusion import latent_pipeline

    pipe = latent_pipeline()
    z = torch.randn(1, pipe.latent_dim, generator=_gen(1))
    positional = pipe("a red cat", z=z, num_inference_steps=2, generator=_gen(), output_type="pt").images
    keyword = pipe(prompt="a red cat", z=z, num_inference_steps=2, generator=_gen(), output_type="pt").images
    assert torch.equal(positional, keyword)
    with pytest.raises(TypeError, match=r"first positional argument is prompt .* got a Tensor; pass SAMI codes by keyword: pipe\(z=codes\)"):
        tiny_pipeline()(torch.zeros(1, 3))


def test_num_images_per_prompt_repeats_each_code_and_prompt():
    pipe = tiny_pipeline()
    z = torch.randn(2, 3, generator=_gen(1))
    out = pipe(z=z, num_images_per_prompt=3, num_inference_steps=2, generator=_gen(), output_type="pt")
    assert out.images.shape == (6, 1, 8, 8) and torch.equal(out.z, z.repeat_interleave(3, dim=0))
    assert not torch.equal(out.images[0], out.images[1])  # same code, its own initial noise
    noise = torch.randn(6, 1, 8, 8, generator=_gen(2))
    each = pipe(z=z.repeat_interleave(3, dim=0), latents=noise, num_inference_steps=2, output_type="pt").images
    torch.testing.assert_close(pipe(z=z, latents=noise, num_images_per_prompt=3, num_inference_steps=2, output_type="pt").images, each)
    assert pipe(num_images_per_prompt=4, num_inference_steps=1, output_type="pt").images.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="num_images_per_prompt must be an integer >= 1, got 0"):
        pipe(num_images_per_prompt=0)

    from test_latent_diffusion import latent_pipeline

    text = latent_pipeline()
    out = text(["a cat", "a dog"], num_images_per_prompt=2, num_inference_steps=1, generator=_gen(), output_type="latent")
    assert out.images.shape[0] == 4 and out.z.shape == (4, text.latent_dim)


def test_callback_on_step_end_has_diffusers_signature_and_can_replace_tensors():
    pipe = tiny_pipeline()
    z, noise = torch.randn(2, 3, generator=_gen(1)), torch.randn(2, 1, 8, 8, generator=_gen(2))
    seen = []

    def record(p, step_index, timestep, callback_kwargs):
        assert p is pipe and set(callback_kwargs) == {"latents", "z"}
        seen.append((step_index, int(timestep), callback_kwargs["latents"].clone()))
        return {}

    final = pipe(z=z, latents=noise, num_inference_steps=3, output_type="latent", callback_on_step_end=record,
                 callback_on_step_end_tensor_inputs=["latents", "z"]).images
    assert [s for s, _, _ in seen] == [0, 1, 2] and [t for _, t, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.equal(seen[-1][2], final) and pipe.num_timesteps == 3

    def zero_code(p, step_index, timestep, callback_kwargs):  # the returned tensors replace the pipeline's
        return {"z": torch.zeros_like(callback_kwargs["z"])} if step_index == 0 else {}

    switched = pipe(z=z, latents=noise, num_inference_steps=3, output_type="latent", callback_on_step_end=zero_code,
                    callback_on_step_end_tensor_inputs=["z"]).images
    assert not torch.equal(switched, final) and torch.isfinite(switched).all()

    def stop(p, step_index, timestep, callback_kwargs):
        p._interrupt = True
        return {}

    stopped = pipe(z=z, latents=noise, num_inference_steps=3, output_type="latent", callback_on_step_end=stop).images
    assert torch.equal(stopped, seen[0][2])  # diffusers' interrupt: the remaining steps are skipped
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs has \['noise'\]; this pipeline can pass"):
        pipe(z=z, num_inference_steps=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


def test_empty_traversal_and_a_zero_terminal_snr_epsilon_scheduler_are_refused():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=r"values is empty: traverse makes one image per value; pass at least one, e.g. values=\[-2, 0, 2\]"):
        pipe.traverse(torch.zeros(3), dim=0, values=[])
    zero_snr = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **zero_snr)
    with pytest.raises(ValueError, match=r"starts at timestep 999, where alphas_cumprod is 0 .*Use a v-prediction model, a scheduler "
                                         r"without zero terminal SNR \(rescale_betas_zero_snr=False\), or timestep_spacing='leading'"):
        pipe(batch_size=1, num_inference_steps=4)
    v_pipe = tiny_pipeline(prediction_type="v_prediction")  # what the message offers works
    v_pipe.scheduler = DDIMScheduler.from_config(v_pipe.scheduler.config, **zero_snr)
    assert torch.isfinite(v_pipe(batch_size=1, num_inference_steps=4, output_type="latent", generator=_gen()).images).all()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="leading")
    assert torch.isfinite(pipe(batch_size=1, num_inference_steps=4, output_type="latent", generator=_gen()).images).all()
