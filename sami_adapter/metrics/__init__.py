"""Array-level scores of a representation: disentanglement metrics with disentanglement_lib's
definitions (Locatello et al. 2019), factor alignment, linear R², trajectory curvature, reconstruction
similarity (SSIM), and the usefulness of a code for a label (linear-probe and kNN accuracy, held-out and
cross-validated).

``codes`` are (N, D) float arrays, ``factors`` are (N, K) integer factor indices, ``labels`` (N,) classes.
"""

from ..extras import import_extra

for _module in ("sklearn", "scipy"):  # the classifiers and statistics the metrics are defined with
    import_extra(_module, "sami_adapter.metrics (the disentanglement metrics)")

from ._discretize import discrete_entropy, discrete_mutual_info, histogram_discretize
from .alignment import factor_alignment
from .curvature import trajectory_curvature
from .dci import completeness_from_importance, dci, dci_importance, disentanglement_from_importance
from .factor_vae import factor_vae_score
from .knn import knn_accuracy, knn_cv_accuracy
from .linear_probe import linear_probe_accuracy, linear_probe_cv_accuracy
from .linear_r2 import linear_r2, r2_score
from .mig import mig, mig_per_factor
from .modularity import explicitness, modularity, modularity_from_mutual_info
from .sap import sap, sap_score_matrix
from .ssim import ssim

__all__ = [
    "histogram_discretize",
    "discrete_mutual_info",
    "discrete_entropy",
    "mig",
    "mig_per_factor",
    "dci",
    "dci_importance",
    "disentanglement_from_importance",
    "completeness_from_importance",
    "sap",
    "sap_score_matrix",
    "modularity",
    "modularity_from_mutual_info",
    "explicitness",
    "factor_vae_score",
    "trajectory_curvature",
    "factor_alignment",
    "linear_r2",
    "r2_score",
    "ssim",
    "linear_probe_accuracy",
    "linear_probe_cv_accuracy",
    "knn_accuracy",
    "knn_cv_accuracy",
]
