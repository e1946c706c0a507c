"""structlik: exact, fast structured (correlated) Gaussian likelihoods for images.

The precision is ``Lambda = U^T U`` with U sparse and upper-triangular in raster
order; see docs/contract.md §1 and Dorta et al., "Training VAEs Under Structured
Residuals".
"""
import torch  # noqa: F401  (must precede any compiled extension)

from . import backends, color, ops, reference
from .head import IllConditionedWarning, bound_coupled_weights, bound_weights, head_channels, split_head
from .basis import LearnedBasis, expand_basis
from .color import YCbCrStructuredNormal
from .conditional import ConditionalStructuredNormal
from .distribution import StructuredNormal
from . import kl  # noqa: E402,F401  (registers kl_divergence for StructuredNormal)
from .loss import StructuredGaussianNLLLoss, structured_gaussian_nll
from .priors import gamma_prior_log_prob, variance_minimiser, variance_weight
from .stencil import Stencil

backends.sync()     # STRUCTLIK_BACKEND, if set, forces its backend from the first call on

__version__ = "0.1.0"

__all__ = [
    "Stencil", "StructuredNormal", "ConditionalStructuredNormal", "bound_weights", "bound_coupled_weights",
    "split_head", "head_channels",
    "IllConditionedWarning", "structured_gaussian_nll", "StructuredGaussianNLLLoss",
    "LearnedBasis", "expand_basis", "YCbCrStructuredNormal", "gamma_prior_log_prob", "variance_minimiser",
    "variance_weight", "ops", "backends", "color", "reference", "__version__",
]
