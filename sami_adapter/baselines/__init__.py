"""Baselines trained in the same harness as SAMI: the same encoder architecture, data and wall-clock budget.

* :class:`BetaVAE` (:func:`train_beta_vae`): a β-VAE whose encoder is a noise-blind
  :class:`~sami_adapter.SAMIEncoder` and whose decoder is a small deconvolution network.
* :class:`DiffAE` (:func:`train_diffae`): a DiffAE-style diffusion autoencoder, the same encoder
  feeding a code ``z`` into a ``UNet2DModel`` through its class embedding, trained jointly.

Both expose ``encode(images) -> LatentPosterior`` (use ``.mean`` as the representation), so the
metrics of :mod:`sami_adapter.report` apply to them exactly as to a SAMI pipeline.
"""

from .beta_vae import BetaVAE, ConvDecoder, train_beta_vae
from .common import TrainingBudget
from .diffae import DiffAE, train_diffae

__all__ = ["BetaVAE", "ConvDecoder", "DiffAE", "TrainingBudget", "train_beta_vae", "train_diffae"]
