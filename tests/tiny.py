"""Tiny models built in code for fast tests."""

from diffusers import DDIMScheduler, UNet2DModel

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
