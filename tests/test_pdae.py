"""The PDAE baseline: PDAE's shift coefficient and weighting against their closed forms, the loss with a silent
estimator, the decoding shift, training, save/load and the shared baseline calls, on tiny models."""

import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel, UNet2DModel
from tiny import tiny_unet

from sami_adapter.baselines import PDAE, train_pdae
from sami_adapter.baselines.pdae import base_forward, shift_and_weight
from sami_adapter.data import Disks

TINY_ENCODER = {"latent_dim": 3, "encoder_channels": (8, 16), "hidden_dim": 32, "norm_num_groups": 4}


def _linear_schedule():
    """betas, alphas, abar and abar_{t-1} of the default DDPM schedule, in float64 numpy (independent of diffusers)."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    return betas, 1 - betas, abar, np.append(1.0, abar[:-1])


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return PDAE.from_base(tiny_unet(), DDPMScheduler(), **{**TINY_ENCODER, **kwargs})


def _images(n, seed=0):
    return Disks(num_samples=1, resolution=8).sample(n, np.random.default_rng(seed))[0]


def _wake_estimator(model, seed=1):
    """Random weights in G's zero-initialised output layer and in the encoder's zero-initialised head, so G and z are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (model.estimator.conv_out.weight, model.estimator.conv_out.bias, model.encoder.head.weight):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_shift_and_weight_are_pdaes_closed_forms():
    betas, alphas, abar, abar_prev = _linear_schedule()
    scheduler = DDPMScheduler()
    shift, weight = shift_and_weight(scheduler.betas)
    expected_shift = -np.sqrt(alphas) * (1 - abar_prev) / np.sqrt(1 - abar)
    snr = abar / (1 - abar)
    np.testing.assert_allclose(shift.numpy(), expected_shift, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(weight.numpy(), snr**0.1 / (1 + snr), rtol=1e-6)
    assert shift[0] == 0  # abar_{-1} = 1: no shift at the first step
    # (P1)-(P2): shifting eps by c_t G moves DDPM's mean (x_t - beta_t / s_t eps) / sqrt(alpha_t) by Sigma_t G
    sigma2 = betas * (1 - abar_prev) / (1 - abar)
    mean_shift = -betas / np.sqrt(1 - abar) / np.sqrt(alphas) * expected_shift
    np.testing.assert_allclose(mean_shift, sigma2, rtol=1e-12)
    np.testing.assert_allclose(shift_and_weight(scheduler.betas, 0.5)[1].numpy(), snr**0.5 / (1 + snr), rtol=1e-6)


def test_silent_estimator_gives_the_base_loss():
    """At initialisation G is exactly 0, so the loss is the base's weighted denoising loss at the same t and noise."""
    model = _model()
    images = _images(6)
    loss = model.loss(images, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(images.shape, generator=g)
    noisy = model.noise_scheduler.add_noise(images, noise, t)
    with torch.no_grad():
        base = model.unet(noisy, t).sample
        assert torch.equal(model.estimate(noisy, t, model.code(images))[1], torch.zeros_like(noisy))
    _, _, abar, _ = _linear_schedule()
    snr = abar[t.numpy()] / (1 - abar[t.numpy()])
    weight = torch.tensor(snr**0.1 / (1 + snr), dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(loss["loss"], (weight * (noise - base) ** 2).mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss["mse"], ((noise - base) ** 2).mean(), rtol=1e-4, atol=1e-7)
    loss["loss"].backward()  # only the encoder and G learn; the base has no gradient
    assert all(p.grad is None for p in model.unet.parameters())
    assert any(p.grad is not None for p in model.estimator.parameters())


def test_the_estimator_enters_with_pdaes_coefficient():
    model = _model()
    _wake_estimator(model)
    images = _images(4, seed=1)
    t = torch.tensor([0, 7, 400, 999])
    noisy = model.noise_scheduler.add_noise(images, torch.randn(images.shape), t)
    z = model.code(images).detach()
    with torch.no_grad():
        base, g = model.estimate(noisy, t, z)
        guided = model.guided_noise(noisy, t, z)
        other = model.estimate(noisy, t, z + 1)[1]
    torch.testing.assert_close(base, model.unet(noisy, t).sample)
    assert g.abs().mean() > 1e-3 and not torch.allclose(g, other)  # G is non-zero and reads z
    _, alphas, abar, abar_prev = _linear_schedule()
    c = torch.tensor(-np.sqrt(alphas) * (1 - abar_prev) / np.sqrt(1 - abar), dtype=torch.float32)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(guided, base + c * g, rtol=1e-5, atol=1e-6)


def test_decoding_shifts_ddims_noise_by_s_t_times_g():
    """Two DDIM steps by hand with eps_hat = eps_theta - s_t G (PDAE's DDIM sampler) give decode's images."""
    model = _model()
    _wake_estimator(model)
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    start = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    decoded = model.decode(z, num_inference_steps=2, latents=start)
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config, clip_sample=False)
    scheduler.set_timesteps(2)
    abar = scheduler.alphas_cumprod.double()
    x = start
    for k, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            eps, g = model.estimate(x, t, z)
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        eps_hat = eps - s.float() * g
        prev = abar[scheduler.timesteps[k + 1]] if k + 1 < len(scheduler.timesteps) else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - s.float() * eps_hat) / a.float()
        x = prev.sqrt().float() * x0 + (1 - prev).sqrt().float() * eps_hat
    torch.testing.assert_close(decoded, x.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    # any variance-preserving scheduler decodes through the same conversion (here a sigma-parameterised one)
    euler = model.decode(z, num_inference_steps=3, generator=torch.Generator().manual_seed(0), scheduler=EulerDiscreteScheduler())
    assert euler.shape == decoded.shape and torch.isfinite(euler).all()


def test_training_lowers_the_held_out_denoising_loss():
    torch.manual_seed(0)
    base = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                       up_block_types=("UpBlock2D",), layers_per_block=1, norm_num_groups=4, add_attention=False)
    data = Disks(num_samples=1, resolution=8)
    model = train_pdae(data, base, DDPMScheduler(), max_steps=150, batch_size=8, lr=2e-3, seed=0, progress=False, log_every=50, **TINY_ENCODER)
    assert model.training_log["steps"] == 150 and len(model.training_log["history"]) == 3
    images = _images(32, seed=9)  # held out: drawn from another seed than every training batch
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (32,), generator=g)
    noise = torch.randn(images.shape, generator=g)
    noisy = model.noise_scheduler.add_noise(images, noise, t)
    weight = model.weight[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        base_loss = (weight * (noise - base(noisy, t).sample) ** 2).mean()
        guided_loss = (weight * (noise - model.guided_noise(noisy, t, model.code(images))) ** 2).mean()
    assert guided_loss < 0.5 * base_loss, (float(guided_loss), float(base_loss))
    assert all(torch.equal(p, q) for p, q in zip(model.unet.parameters(), base.parameters()))  # the base is frozen (and copied)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = _model(base_model="models/tiny")
    _wake_estimator(model)
    model.save_pretrained(str(tmp_path / "pdae"))
    assert sorted(os.listdir(tmp_path / "pdae")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = PDAE.from_pretrained(str(tmp_path / "pdae"))
    state, again = model.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert loaded.config.base_model == "models/tiny" and not any(p.requires_grad for p in loaded.unet.parameters())
    assert all(p.requires_grad for p in loaded.estimator.parameters())
    torch.testing.assert_close(loaded.shift, model.shift, rtol=0, atol=0)
    images = (_images(3) + 1) / 2
    decode = dict(num_inference_steps=2, eta=1.0, output_type="pt")
    assert torch.equal(loaded.encode(images).mean, model.encode(images).mean)
    assert torch.equal(loaded.reconstruct(images, generator=torch.Generator().manual_seed(0), **decode).images,
                       model.reconstruct(images, generator=torch.Generator().manual_seed(0), **decode).images)


def test_encode_reconstruct_and_generate_through_the_shared_calls():
    model = _model()
    _wake_estimator(model)
    images = (_images(4, seed=2) + 1) / 2  # [0, 1], as the pipeline takes them
    posterior = model.encode(images)
    assert posterior.mean.shape == (4, 3)
    torch.testing.assert_close(posterior.mean, model.code(images * 2 - 1))  # [0, 1] in, the encoder sees [-1, 1]
    out = model.reconstruct(images, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="pt").images
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    samples = model(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np").images
    assert samples.shape == (3, 8, 8, 1) and 0 <= samples.min() and samples.max() <= 1
    counts = model.parameter_counts()
    assert counts["unet"] == sum(p.numel() for p in tiny_unet().parameters()) and 0 < counts["estimator"] < 2 * counts["unet"]


def test_bases_it_cannot_sit_on_are_refused():
    data = Disks(num_samples=1, resolution=16)
    with pytest.raises(ValueError, match="the data are 1-channel 16 px. Use a base trained at the data's resolution"):
        train_pdae(data, tiny_unet(), DDPMScheduler(), max_steps=1, progress=False, **TINY_ENCODER)
    text = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, cross_attention_dim=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(TypeError, match="takes a pixel-space diffusers UNet2DModel as its base; got a UNet2DConditionModel"):
        PDAE.from_base(text, DDPMScheduler())
    skip = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "SkipDownBlock2D"), up_block_types=("SkipUpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match=r"cannot share the skip-path blocks \['SkipDownBlock2D', 'SkipUpBlock2D'\]"):
        PDAE.from_base(skip, DDPMScheduler())


def test_base_forward_is_the_base_and_its_features_feed_the_decoder_half():
    unet = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        out, features = base_forward(unet, x, t)
        assert torch.equal(out, unet(x, t).sample)
    # conv_in's output, then each down block's resnets (and downsampler): as many skips as the up blocks take
    assert len(features.skips) == sum(len(block.resnets) for block in unet.up_blocks)
    assert features.emb.shape == (2, 32) and features.hidden.shape == (2, 16, 4, 4)
    assert not unet._forward_hooks and not unet.conv_in._forward_hooks  # hooks are gone after the call
