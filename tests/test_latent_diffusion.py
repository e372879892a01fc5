"""SAMI on a latent diffusion model: a tiny Stable-Diffusion-style UNet2DConditionModel + AutoencoderKL + CLIP, built in code."""

import os

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from scripts import load_example
from tiny import tiny_encoder, tiny_pipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sami_adapter import SAMIPipeline, sami_loss, to_epsilon
from sami_adapter.adapter import save_adapter
from sami_adapter.lora import add_lora, merge_lora
from sami_adapter.base_model import load_latent_components
from sami_adapter.latent import (
    LatentCache,
    empty_prompt_embeddings,
    images_to_latents,
    latents_to_images,
    prompt_embeddings,
    vae_scale_factor,
)

LATENT_SIZE, PIXEL_SIZE, LATENT_CHANNELS, LATENT_DIM, TEXT_DIM, MAX_TOKENS = 8, 16, 4, 3, 16, 8
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- tiny components
def tiny_cond_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=PIXEL_SIZE,
    ).eval()


def tiny_text():
    """A CLIP tokenizer over single bytes (no merges) and a 2-layer CLIP text model of width 16."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)
    config = CLIPTextConfig(
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextModel(config).eval(), tokenizer


def latent_encoder(random_head: bool = True):
    encoder = tiny_encoder(sample_size=LATENT_SIZE, channels=LATENT_CHANNELS, latent_dim=LATENT_DIM)
    if random_head:  # the head is zero-initialised; random weights make the guidance non-zero
        with torch.no_grad():
            encoder.head.weight.normal_(0, 0.3)
    return encoder.eval()  # as from_pretrained returns it


def latent_pipeline(prediction_type: str = "epsilon", text: bool = True) -> SAMIPipeline:
    text_encoder, tokenizer = tiny_text() if text else (None, None)
    pipe = SAMIPipeline(
        unet=tiny_cond_unet(),
        scheduler=DDIMScheduler(clip_sample=False, prediction_type=prediction_type),
        encoder=latent_encoder(),
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    """Images in the VAE's [-1, 1]."""
    return torch.rand(n, 3, PIXEL_SIZE, PIXEL_SIZE, generator=_gen(seed)) * 2 - 1


def images(n: int, seed: int = 0) -> torch.Tensor:
    """The same images in [0, 1], as the pipeline (like diffusers) takes them."""
    return (pixels(n, seed) + 1) / 2


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved Stable-Diffusion-layout base pipeline (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    torch.manual_seed(0)
    text_encoder, tokenizer = tiny_text()
    path = tmp_path_factory.mktemp("tiny-sd")
    StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_cond_unet(),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)
    return str(path)


def base_pipeline(base_dir: str) -> SAMIPipeline:
    """The in-memory pipeline that an adapter on ``base_dir`` should reproduce."""
    components = load_latent_components(base_dir)
    scheduler_config = DDPMScheduler.load_config(base_dir, subfolder="scheduler")
    pipe = SAMIPipeline(
        unet=UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet"),
        scheduler=DDIMScheduler.from_config(scheduler_config, clip_sample=False),
        encoder=latent_encoder(),
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- encode / sample / traverse
def test_encode_goes_through_the_vae_latent_mean():
    pipe = latent_pipeline()
    x = pixels(2)
    assert pipe.vae_scale_factor == vae_scale_factor(pipe.vae) == 2 and pipe.is_latent and pipe.is_text_conditioned
    latents = images_to_latents(pipe.vae, x)
    assert latents.shape == (2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    raw = pipe.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(latents, raw * pipe.vae.config.scaling_factor)
    x = images(2)
    torch.testing.assert_close(pipe.preprocess(x), latents)

    post = pipe.encode(x)
    assert post.mean.shape == (2, LATENT_DIM)
    torch.testing.assert_close(post.mean, pipe.encoder(latents, 0).mean)
    torch.testing.assert_close(pipe.encode(x).mean, post.mean)  # deterministic: the latent mean, not a sample
    multi = pipe.encode(x, timesteps=[0, 100, 900], generator=_gen())
    assert multi.mean.shape == (3, 2, LATENT_DIM)
    torch.testing.assert_close(multi.mean[0], post.mean)
    assert pipe.encode(x, timesteps=100, generator=_gen()).mean.shape == (2, LATENT_DIM)


def test_pixel_checks_use_the_vae_resolution():
    pipe = latent_pipeline()
    small = images(1)[..., ::2, ::2]  # latent-sized pixels are resized to the VAE's resolution, as diffusers does
    big = torch.nn.functional.interpolate(small, size=(PIXEL_SIZE, PIXEL_SIZE), mode="nearest")
    torch.testing.assert_close(pipe.encode(small).mean, pipe.encode(big).mean)
    with pytest.raises(ValueError, match="the model takes 3; pass 3-channel images"):
        pipe.encode(torch.zeros(1, LATENT_CHANNELS, PIXEL_SIZE, PIXEL_SIZE))
    with pytest.raises(ValueError, match="NaN or inf"):
        pipe.encode(torch.full((1, 3, PIXEL_SIZE, PIXEL_SIZE), float("nan")))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sample_and_traverse_in_pixels(prediction_type):
    pipe = latent_pipeline(prediction_type)
    out = pipe(prompt="a red cat", guidance_scale=3.0, batch_size=2, num_inference_steps=2, generator=_gen(), output_type="pt")
    assert out.images.shape == (2, 3, PIXEL_SIZE, PIXEL_SIZE) and out.z.shape == (2, LATENT_DIM)
    assert torch.isfinite(out.images).all() and 0 <= out.images.min() and out.images.max() <= 1  # diffusers' [0, 1]
    latent = pipe(prompt="a red cat", guidance_scale=3.0, batch_size=2, num_inference_steps=2, generator=_gen(), output_type="latent").images
    assert latent.shape == (2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    torch.testing.assert_close(out.images, (latents_to_images(pipe.vae, latent).clamp(-1, 1) + 1) / 2)
    pil = pipe(prompt=["a", "b", "c"], num_inference_steps=2, generator=_gen()).images  # batch from the prompts
    assert len(pil) == 3 and pil[0].size == (PIXEL_SIZE, PIXEL_SIZE) and pil[0].mode == "RGB"

    trav = pipe.traverse(images(1), dim=1, values=[-2, 0, 2], num_inference_steps=2, output_type="pt", generator=_gen())
    assert trav.images.shape == (3, 3, PIXEL_SIZE, PIXEL_SIZE)
    assert torch.equal(trav.z[:, 1], torch.tensor([-2.0, 0.0, 2.0]))
    rec = pipe.reconstruct(images(2), prompt="a cat", num_inference_steps=2, output_type="pt", generator=_gen())
    torch.testing.assert_close(rec.z, pipe.encode(images(2)).mean)


def test_no_prompt_is_the_empty_prompt_and_knobs():
    pipe = latent_pipeline()
    z, noise = torch.randn(2, LATENT_DIM, generator=_gen(1)), torch.randn(2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=_gen(2))

    def run(**kwargs):
        return pipe(z=kwargs.pop("z", z), latents=noise, num_inference_steps=2, output_type="latent", **kwargs).images

    unconditional = run()
    torch.testing.assert_close(unconditional, run(prompt=""))
    empty = empty_prompt_embeddings(pipe.text_encoder, pipe.tokenizer)
    torch.testing.assert_close(unconditional, run(prompt_embeds=empty))
    assert not torch.allclose(unconditional, run(prompt="a dog"))
    # CFG against the empty prompt with no prompt is a no-op; with a prompt it is not
    torch.testing.assert_close(unconditional, run(guidance_scale=5.0))
    assert not torch.allclose(run(prompt="a dog"), run(prompt="a dog", guidance_scale=5.0))
    # sami_scale is the SAMI knob; 0 turns SAMI off
    assert not torch.allclose(run(prompt="a dog"), run(prompt="a dog", z=-z))
    torch.testing.assert_close(run(prompt="a dog", sami_scale=0.0), run(prompt="a dog", z=-z, sami_scale=0.0))
    # guidance_scale is CFG (diffusers' meaning), not the SAMI knob: with SAMI off it still changes
    # the output, and it does not act like sami_scale
    assert not torch.allclose(run(prompt="a dog", sami_scale=0.0), run(prompt="a dog", sami_scale=0.0, guidance_scale=2.0))
    assert not torch.allclose(run(prompt="a dog", sami_scale=2.0), run(prompt="a dog", guidance_scale=2.0))
    with pytest.raises(TypeError, match="cfg_scale"):
        run(prompt="a dog", cfg_scale=2.0)


def test_prompt_errors():
    pipe = latent_pipeline(text=False)
    with pytest.raises(ValueError, match="pass prompt_embeds"):
        pipe(num_inference_steps=1)
    out = pipe(prompt_embeds=torch.zeros(1, MAX_TOKENS, TEXT_DIM), batch_size=2, num_inference_steps=1, output_type="pt")
    assert out.images.shape == (2, 3, PIXEL_SIZE, PIXEL_SIZE)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        pipe(prompt_embeds=torch.zeros(1, MAX_TOKENS, TEXT_DIM + 1), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"\(1 or 2, L, D\)"):
        pipe(prompt_embeds=torch.zeros(3, MAX_TOKENS, TEXT_DIM), batch_size=2, num_inference_steps=1)
    with pytest.raises(ValueError, match="not text-conditioned"):
        tiny_pipeline()(prompt="a cat", num_inference_steps=1)
    with pytest.raises(ValueError, match="together"):
        SAMIPipeline(unet=tiny_cond_unet(), scheduler=DDIMScheduler(), encoder=latent_encoder(), text_encoder=tiny_text()[0])


# ---------------------------------------------------------------- CFG composition, by hand
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_cfg_composition_matches_hand_computation(prediction_type):
    pipe = latent_pipeline(prediction_type)
    w, s, t = 4.0, 1.5, 600
    x_t = torch.randn(2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=_gen(3))
    z = torch.randn(2, LATENT_DIM, generator=_gen(4))
    cond = prompt_embeddings(pipe.text_encoder, pipe.tokenizer, ["a red cat", "a dog"])
    uncond = prompt_embeddings(pipe.text_encoder, pipe.tokenizer, ["", ""])

    with torch.no_grad():
        out_c = pipe.unet(x_t, t, encoder_hidden_states=cond).sample
        out_u = pipe.unet(x_t, t, encoder_hidden_states=uncond).sample
    x = x_t.clone().requires_grad_(True)
    post = pipe.encoder(x, t)
    log_q = (-0.5 * ((z - post.mean) ** 2 / post.logvar.exp() + post.logvar)).sum()
    (g,) = torch.autograd.grad(log_q, x)
    assert g.abs().max() > 0
    abar = pipe.scheduler.alphas_cumprod[t].double()
    a, sd = abar.sqrt().float(), (1 - abar).sqrt().float()
    coefficient = sd if prediction_type == "epsilon" else sd / a  # eps - s_t g   |   v - (s_t / a_t) g
    expected = out_u + w * (out_c - out_u) - s * coefficient * g

    p_cond, p_uncond = pipe.encode_prompt(["a red cat", "a dog"], batch_size=2, do_cfg=True)
    torch.testing.assert_close(p_cond, cond)
    torch.testing.assert_close(p_uncond, uncond)
    got = pipe.guided_model_output(x_t, t, z, s, p_cond, p_uncond, guidance_scale=w)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    # whatever the parameterisation, the noise prediction is eps_u + w (eps_c - eps_u) - s * s_t * g
    alpha, sigma = a.double().expand(2), sd.double().expand(2)
    eps_c, eps_u, eps_got = (to_epsilon(o, x_t, alpha, sigma, prediction_type) for o in (out_c, out_u, got))
    torch.testing.assert_close(eps_got, eps_u + w * (eps_c - eps_u) - s * sd * g, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- training steps
def _batch(pipe, n=2):
    latents = images_to_latents(pipe.vae, pixels(n, seed=7))
    hidden = empty_prompt_embeddings(pipe.text_encoder, pipe.tokenizer, n)
    return latents, hidden


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_step_frozen_unet(prediction_type):
    pipe = latent_pipeline(prediction_type)
    pipe.unet.requires_grad_(False)
    latents, hidden = _batch(pipe)
    assert not latents.requires_grad  # the VAE runs under no_grad
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    out = sami_loss(pipe.unet, pipe.encoder, scheduler, latents, generator=_gen(), unet_kwargs={"encoder_hidden_states": hidden})
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in pipe.encoder.parameters()]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert all(p.grad is None for p in pipe.vae.parameters())


def test_training_step_lora_then_adapter_round_trip(base_dir, tmp_path):
    pipe = base_pipeline(base_dir)
    pipe.unet.requires_grad_(False)
    lora_config = add_lora(pipe.unet, rank=2, target_modules=ATTENTION)
    lora_params = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert lora_params and all(p.requires_grad for p in lora_params.values())
    latents, hidden = _batch(pipe)
    out = sami_loss(
        pipe.unet, pipe.encoder, DDPMScheduler(), latents, generator=_gen(), train_unet=True, unet_kwargs={"encoder_hidden_states": hidden}
    )
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params.values())
    assert all(p.grad is None for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.encoder.parameters())

    with torch.no_grad():  # a trained LoRA: non-zero B so that it changes the UNet
        for n, p in lora_params.items():
            p.add_(0.1 * torch.randn_like(p))
    adapter = save_adapter(str(tmp_path / "adapter"), pipe.encoder, base_dir, unet=pipe.unet, unet_mode="lora", lora_config=lora_config)
    _assert_no_base_weights(adapter)
    merge_lora(pipe.unet)
    loaded = SAMIPipeline.from_pretrained(adapter)
    loaded.set_progress_bar_config(disable=True)
    a, b = (_fixed_call(p) for p in (pipe, loaded))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    # diffusers reads the same LoRA: StableDiffusionPipeline.load_lora_weights on the base gives the adapter's UNet
    sd = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    sd.load_lora_weights(os.path.join(adapter, "unet_lora"))
    x, hidden = torch.randn(2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=_gen(5)), _batch(pipe)[1]
    with torch.no_grad():
        expected = loaded.unet(x, 500, encoder_hidden_states=hidden).sample
        torch.testing.assert_close(sd.unet(x, 500, encoder_hidden_states=hidden).sample, expected, atol=1e-5, rtol=1e-4)
        plain = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")(x, 500, encoder_hidden_states=hidden).sample
    assert (plain - expected).abs().max() > 1e-4  # the LoRA changes the UNet, so the match above means something


# ---------------------------------------------------------------- saving and loading
def _assert_no_base_weights(adapter_dir: str) -> None:
    files = sorted(os.path.relpath(os.path.join(r, f), adapter_dir) for r, _, fs in os.walk(adapter_dir) for f in fs)
    assert not [f for f in files if f.split(os.sep)[0] in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")], files
    assert [f for f in files if f.endswith(".safetensors") and not f.startswith("unet_lora")] == [os.path.join("encoder", "diffusion_pytorch_model.safetensors")]
    assert "model_index.json" not in files


def _fixed_call(pipe: SAMIPipeline) -> torch.Tensor:
    z = torch.randn(2, LATENT_DIM, generator=_gen(11))
    noise = torch.randn(2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=_gen(12))
    return pipe(z=z, latents=noise, prompt="a cat", guidance_scale=2.0, num_inference_steps=2, output_type="pt").images


def test_frozen_adapter_round_trip_loads_the_base_components(base_dir, tmp_path):
    pipe = base_pipeline(base_dir)
    adapter = save_adapter(str(tmp_path / "adapter"), pipe.encoder, base_dir, unet_mode="frozen")
    _assert_no_base_weights(adapter)
    loaded = SAMIPipeline.from_pretrained(adapter)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, AutoencoderKL) and isinstance(loaded.text_encoder, CLIPTextModel)
    assert isinstance(loaded.unet, UNet2DConditionModel) and loaded.tokenizer is not None
    assert torch.equal(_fixed_call(pipe), _fixed_call(loaded))
    assert torch.equal(pipe.encode(images(2)).mean, loaded.encode(images(2)).mean)
    # explicit components win over the base's
    vae = tiny_vae()
    assert SAMIPipeline.from_pretrained(adapter, vae=vae).vae is vae


def test_full_unet_adapter_loads_a_conditional_unet(base_dir, tmp_path):
    pipe = base_pipeline(base_dir)
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.5)  # "jointly trained"
    adapter = save_adapter(str(tmp_path / "adapter"), pipe.encoder, base_dir, unet=pipe.unet, unet_mode="full")
    assert not (tmp_path / "adapter" / "vae").exists() and not (tmp_path / "adapter" / "text_encoder").exists()
    loaded = SAMIPipeline.from_pretrained(adapter)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, UNet2DConditionModel) and isinstance(loaded.vae, AutoencoderKL)
    assert torch.equal(_fixed_call(pipe), _fixed_call(loaded))


def test_pixel_base_has_no_latent_components(tmp_path):
    tiny_pipeline().unet.save_pretrained(tmp_path / "bare_unet")
    assert load_latent_components(str(tmp_path / "bare_unet")) == {}


def test_full_latent_pipeline_save_pretrained_round_trip(tmp_path):
    pipe = latent_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = SAMIPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_fixed_call(pipe), _fixed_call(loaded))


# ---------------------------------------------------------------- latent cache
def test_latent_cache_encodes_each_item_once(tmp_path):
    vae = tiny_vae()
    calls = []
    encode = vae.encode
    vae.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    cache = LatentCache(tmp_path / "cache", {"model": "tiny", "resolution": PIXEL_SIZE})
    images = pixels(4)
    first = cache.get_or_compute(vae, torch.tensor([0, 1]), images[:2])
    again = cache.get_or_compute(vae, [1, 0, 2, 3], images[[1, 0, 2, 3]])
    assert calls == [2, 2] and len(cache) == 4 and cache.get(3) is not None and cache.get(9) is None
    torch.testing.assert_close(again[:2], first[[1, 0]])
    torch.testing.assert_close(again, images_to_latents(vae, images[[1, 0, 2, 3]]))
    reopened = LatentCache(tmp_path / "cache", {"model": "tiny", "resolution": PIXEL_SIZE})
    assert torch.equal(reopened.get(2), again[2])
    with pytest.raises(ValueError, match="different settings"):
        LatentCache(tmp_path / "cache", {"model": "tiny", "resolution": 2 * PIXEL_SIZE})


@pytest.mark.parametrize("unet_mode", ["frozen", "lora"])
def test_finetune_script_trains_a_latent_adapter(base_dir, tmp_path, unet_mode):
    """examples/finetune.py on a Stable-Diffusion-layout base: VAE latents, empty-prompt conditioning,
    LoRA on the attention projections, latent cache; the adapter loads back without base weights."""
    from accelerate.state import AcceleratorState
    from PIL import Image

    finetune = load_example("finetune")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    pipe = base_pipeline(base_dir)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = tmp_path / "adapter"
    AcceleratorState._reset_state(reset_partial_state=True)
    finetune.main(["--pretrained_model_name_or_path", base_dir, "--train_data_dir", str(folder), "--resolution", str(resolution),
                   "--center_crop", "--cache_latents", "--unet_mode", unet_mode, "--latent_dim", "2", "--encoder_channels", "8,16",
                   "--train_batch_size", "2", "--max_train_steps", "2", "--num_eval_images", "2", "--num_inference_steps", "2",
                   "--report_to", "none", "--output_dir", str(out), "--validation_steps", "0", "--num_threads", "1"])
    AcceleratorState._reset_state(reset_partial_state=True)
    assert len([f for f in os.listdir(out / "latent_cache") if f.endswith(".safetensors")]) == 3
    assert not any((out / name).exists() for name in ("unet", "vae", "text_encoder", "tokenizer"))
    if unet_mode == "lora":
        from safetensors.torch import load_file

        keys = load_file(str(out / "unet_lora" / "pytorch_lora_weights.safetensors")).keys()
        assert keys and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in keys)
    loaded = SAMIPipeline.from_pretrained(str(out))
    assert loaded.is_latent and loaded.is_text_conditioned
    assert (out / "report" / "report.json").exists()
