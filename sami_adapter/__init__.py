"""sami-adapter: turn a pretrained diffusers diffusion model into a representation learner (SAMI)."""

from .encoder import LatentPosterior, SAMIEncoder, nested_guidance_bands
from .guidance import alpha_sigma_from_alphas_cumprod, apply_guidance, guided_output, noise_level, posterior_score, to_epsilon
from .objective import SAMILossOutput, elbo_constant, elbo_weights, sami_loss
from .pipeline import SAMIPipeline, SAMIPipelineOutput
from .rate import RateControl, TCDiscriminator

__version__ = "0.1.0"

__all__ = [
    "LatentPosterior",
    "RateControl",
    "TCDiscriminator",
    "SAMIEncoder",
    "SAMIPipeline",
    "SAMIPipelineOutput",
    "SAMILossOutput",
    "alpha_sigma_from_alphas_cumprod",
    "apply_guidance",
    "elbo_constant",
    "elbo_weights",
    "guided_output",
    "nested_guidance_bands",
    "noise_level",
    "posterior_score",
    "sami_loss",
    "to_epsilon",
]
