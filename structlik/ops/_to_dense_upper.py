"""Dense U, for small images, tests and teaching (plain PyTorch, differentiable; not an op)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks, reference
from ..stencil import Stencil
from . import _library


def to_dense_upper(log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil,
                   cross: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense U, (B, C, n, n) with n = H*W in raster order; differentiable. With ``cross``, dense M
    over the C*n unknowns in channel-major order (channel c, pixel p at c*n + p): (B, C*n, C*n).

    O(n^2) memory: for small images, tests and teaching.
    """
    _checks.check_params(log_diag, off_diag, stencil)
    coupled = cross is not None
    cross = _checks.check_cross(cross, "log_diag", log_diag)
    log_diag, off_diag, cross = _checks.promote_optional(log_diag, off_diag, cross)
    op_stencil = Stencil.from_flat_offsets(_library.op_offsets(stencil, log_diag))     # a volume's: its tall view
    fold = _library.fold
    dense = reference.to_dense_upper(fold(log_diag), fold(off_diag), op_stencil, fold(cross))
    return dense.flatten(1, 2) if coupled and cross is None else dense    # one channel: (B, n, n)
