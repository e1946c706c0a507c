"""Dense U, for small images, tests and teaching (plain PyTorch, differentiable; not an op)."""
from __future__ import annotations

import torch

from .. import _checks, reference
from ..stencil import Stencil


def to_dense_upper(log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """Dense U, (B, C, n, n) with n = H*W in raster order; differentiable.

    O(n^2) memory: for small images, tests and teaching.
    """
    _checks.check_params(log_diag, off_diag, stencil)
    log_diag, off_diag = _checks.promote(log_diag, off_diag)
    return reference.to_dense_upper(log_diag, off_diag, stencil)
