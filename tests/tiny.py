"""Tiny models built in code for fast tests, and the small folders tests build around them."""

import os
import shutil

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from sami_adapter import SAMIEncoder, SAMIPipeline


def tiny_unet(sample_size: int = 8, channels: int = 1, prediction_type: str = "epsilon") -> UNet2DModel:
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def tiny_encoder(sample_size: int = 8, channels: int = 1, latent_dim: int = 3, **kwargs) -> SAMIEncoder:
    return SAMIEncoder(
        in_channels=channels,
        sample_size=sample_size,
        latent_dim=latent_dim,
        block_out_channels=(8, 16),
        hidden_dim=32,
        norm_num_groups=4,
        **kwargs,
    )


def tiny_pipeline(latent_dim: int = 3, prediction_type: str = "epsilon", random_head: bool = True) -> SAMIPipeline:
    """A tiny pipeline; ``random_head`` gives the zero-initialised head random weights so guidance is non-zero."""
    import torch

    encoder = tiny_encoder(latent_dim=latent_dim)
    if random_head:
        with torch.no_grad():
            encoder.head.weight.normal_(0, 0.3)
    pipe = SAMIPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(clip_sample=False, prediction_type=prediction_type), encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_base(path, sample_size: int = 8) -> str:
    """A tiny pixel-space 'pretrained' base model in diffusers' pipeline layout (unet/ and scheduler/) at ``path``."""
    tiny_unet(sample_size=sample_size).save_pretrained(os.path.join(path, "unet"))
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(os.path.join(path, "scheduler"))
    return str(path)


def hub_cache(cache_dir, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Put ``folder`` into ``cache_dir`` the way huggingface_hub stores a downloaded model repo."""
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)


def finetune_args(base, out, *extra):
    """examples/finetune.py flags of a tiny, fast run on an 8 px base."""
    return ["--pretrained_model_name_or_path", base, "--output_dir", str(out), "--resolution", "8", "--train_batch_size", "4",
            "--latent_dim", "3", "--encoder_channels", "8,16", "--report_to", "none", "--num_eval_images", "4",
            "--num_inference_steps", "2", "--logging_steps", "1", "--validation_steps", "0", "--seed", "3", "--num_threads", "1", *extra]
