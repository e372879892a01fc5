"""Baselines trained in the same harness as SAMI: the same encoder architecture, data and wall-clock budget.

* :class:`BetaVAE` (:func:`train_beta_vae`): a β-VAE whose encoder is a noise-blind
  :class:`~sami_adapter.SAMIEncoder` and whose decoder is a small deconvolution network.
* :class:`DiffAE` (:func:`train_diffae`): a DiffAE-style diffusion autoencoder, the same encoder
  feeding a code ``z`` into a ``UNet2DModel`` through its class embedding, trained jointly.
* :class:`PDAE` (:func:`train_pdae`): PDAE on a frozen pretrained ``UNet2DModel``: the same encoder and a
  gradient estimator ``G(x_t, t, z)`` whose output shifts the base's noise prediction.

All take :class:`~sami_adapter.SAMIPipeline`'s calls (``encode``, ``reconstruct``, generation by
``model(batch_size=...)``; images in [0, 1]; :class:`~sami_adapter.baselines.common.AutoencoderMixin`), so
the measurements of :mod:`sami_adapter.representation` apply to them exactly as to a SAMI pipeline.
"""

from .beta_vae import BetaVAE, ConvDecoder, train_beta_vae
from .common import TrainingBudget
from .diffae import DiffAE, train_diffae
from .pdae import PDAE, GradientEstimator, train_pdae

__all__ = ["BetaVAE", "ConvDecoder", "DiffAE", "GradientEstimator", "PDAE", "TrainingBudget", "train_beta_vae", "train_diffae", "train_pdae"]
