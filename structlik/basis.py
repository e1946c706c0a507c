"""The learned basis of paper section 4.3: L = s(B W(z)).

Each pixel's S off-diagonal weights are a linear combination of n_b basis
vectors shared by all images: ``off_diag[c*S + i, p] = sum_j basis[i, j] *
coeffs[c*n_b + j, p]``. The decoder then predicts n_b coefficients per pixel
and channel instead of S weights. The fused ops (``ops.nll_basis``) form the S
weights of each pixel on the fly, so the (B, C*S, H, W) tensor is never built;
sampling materialises it with :func:`expand_basis`.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _checks, reference
from .stencil import Stencil

__all__ = ["LearnedBasis", "expand_basis"]


def check_basis(basis, stencil: Stencil, dtype=None, device=None) -> int:
    """Validate the (S, n_b) basis (of that dtype and device, when given); returns n_b."""
    _checks.check_float_tensor("basis", basis, "(S, n_b)")
    if basis.shape[0] != stencil.S:
        raise ValueError(f"basis: expected shape (S, n_b) with S={stencil.S}, got {tuple(basis.shape)}")
    n_b = basis.shape[1]
    if n_b == 0:
        raise ValueError("basis: expected at least one basis vector (n_b >= 1)")
    if dtype is not None and basis.dtype != dtype:
        raise TypeError(f"basis: dtype {basis.dtype} does not match the images' dtype {dtype}")
    if device is not None and basis.device != device:
        raise ValueError(f"basis: device {basis.device} does not match the images' device {device}")
    return n_b


def expand_basis(coeffs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(B, C*n_b, H, W) coefficients and (S, n_b) basis -> (B, C*S, H, W) off_diag (materialised)."""
    _checks.check_float_tensor("basis", basis, "(S, n_b)")
    S, n_b = basis.shape
    layout = "(B, C*n_b, D, H, W)" if isinstance(coeffs, torch.Tensor) and coeffs.dim() == 5 else "(B, C*n_b, H, W)"
    _checks.check_float_tensor("coeffs", coeffs, layout)
    CNB = coeffs.shape[1]
    if n_b == 0 or CNB % n_b:
        raise ValueError(f"coeffs: expected shape {layout} with n_b={n_b} (basis: {tuple(basis.shape)}), "
                         f"got {tuple(coeffs.shape)}")
    if coeffs.device != basis.device:
        raise ValueError(f"basis: device {basis.device} does not match coeffs' device {coeffs.device}")
    return reference.expand_basis(*_checks.promote(coeffs, basis))


class LearnedBasis(nn.Module):
    """A learnable (S, n_b) basis for the off-diagonal weights, shared across images.

    ``forward(coeffs)`` materialises off_diag (B, C*S, H, W) from coefficients
    (B, C*n_b, H, W); pass ``basis=module.basis`` to ``structured_gaussian_nll`` /
    ``StructuredNormal`` with the coefficients as ``off_diag`` for the fused path.

    Args:
        stencil: the sparsity pattern (S offsets).
        n_basis: number of basis vectors n_b.
    """

    def __init__(self, stencil: Stencil, n_basis: int):
        super().__init__()
        _checks.check_stencil(stencil)
        if not isinstance(n_basis, int) or n_basis < 1:
            raise ValueError(f"n_basis: expected a positive integer, got {n_basis!r}")
        self.stencil = stencil
        # Small random init: every offset starts weakly coupled, so U starts near diagonal.
        self.basis = nn.Parameter(torch.randn(stencil.S, n_basis) / (stencil.S * n_basis) ** 0.5)

    @property
    def n_basis(self) -> int:
        return self.basis.shape[1]

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        return expand_basis(coeffs, self.basis)

    def extra_repr(self) -> str:
        return f"stencil={self.stencil!r}, n_basis={self.n_basis}"
