"""The differentiable primitives of SPEC section 1, validated and dispatched.

Shapes: images (``r``, ``y``, ``z``, ``g``, ``x``, ``loc``) and ``log_diag`` are
(B, C, H, W); ``off_diag`` is (B, C*S, H, W), channel c / offset i at c*S + i.
float32 and float64 compute in their own dtype; float16 and bfloat16 are
computed in float32 and cast back (the NLL stays float32). The Triton NLL
kernels read float16/bfloat16 themselves; other backends and ops get float32
copies.
"""
from __future__ import annotations

import torch

from . import _checks
from . import reference
from .backends import backend_for
from .basis import check_basis
from .stencil import Stencil

__all__ = [
    "apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t",
    "nll", "nll_basis", "precision_diagonal", "to_dense_upper",
]

_HALF = (torch.float16, torch.bfloat16)


def _upcast(*tensors):
    if tensors[0].dtype in _HALF:
        return tuple(t.float() for t in tensors)
    return tensors


def _nll_args(backend, *tensors):
    """The NLL's inputs for that backend: float16/bfloat16 upcast unless its kernels read them."""
    return tensors if getattr(backend, "half_nll", False) else _upcast(*tensors)


def _image_op(name: str, image_name: str, image, log_diag, off_diag, stencil):
    _checks.check_params(log_diag, off_diag, stencil)
    _checks.check_image(image_name, image, log_diag)
    _checks.check_finite(**{image_name: image, "log_diag": log_diag, "off_diag": off_diag})
    args = _upcast(image, log_diag, off_diag)
    out = getattr(backend_for(image.device), name)(*args, stencil)
    return out.to(image.dtype)


def apply_upper(r: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """``U r``: ``(U r)_p = exp(log_diag_p) r_p + sum_i off_diag_{p,i} r_{p+delta_i}``; (B, C, H, W)."""
    return _image_op("apply_upper", "r", r, log_diag, off_diag, stencil)


def apply_upper_t(y: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """``U^T y``, the transposed stencil; (B, C, H, W)."""
    return _image_op("apply_upper_t", "y", y, log_diag, off_diag, stencil)


def solve_upper(z: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """``U^-1 z`` (back-substitution in reverse raster order); (B, C, H, W).

    With ``z ~ N(0, I)``, ``loc + solve_upper(z, ...)`` is a sample of the
    structured Gaussian. Differentiable in all three tensors.
    """
    return _image_op("solve_upper", "z", z, log_diag, off_diag, stencil)


def solve_upper_t(g: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """``U^-T g`` (forward substitution in raster order); (B, C, H, W)."""
    return _image_op("solve_upper_t", "g", g, log_diag, off_diag, stencil)


def nll(x: torch.Tensor, loc: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor,
        stencil: Stencil) -> torch.Tensor:
    """Per-image negative log-likelihood, shape (B,):

    ``0.5 * ||U (x - loc)||^2 - sum(log_diag) + (C*H*W / 2) * log(2 pi)``.
    """
    _checks.check_params(log_diag, off_diag, stencil)
    _checks.check_image("x", x, log_diag)
    _checks.check_image("loc", loc, log_diag)
    _checks.check_finite(x=x, loc=loc, log_diag=log_diag, off_diag=off_diag)
    backend = backend_for(x.device)
    return backend.nll(*_nll_args(backend, x, loc, log_diag, off_diag), stencil)


def nll_basis(x: torch.Tensor, loc: torch.Tensor, log_diag: torch.Tensor, coeffs: torch.Tensor, basis: torch.Tensor,
              stencil: Stencil) -> torch.Tensor:
    """Per-image NLL, (B,), with ``off_diag = expand_basis(coeffs, basis)`` formed inside the kernel.

    coeffs: (B, C*n_b, H, W); basis: (S, n_b), shared by all images and channels.
    Differentiable in every tensor, the basis included (its gradient is a
    reduction over all pixels). Equivalent to ``nll(x, loc, log_diag,
    expand_basis(coeffs, basis), stencil)`` without the (B, C*S, H, W) tensor.
    """
    _checks.check_stencil(stencil)
    _checks.check_float_tensor("log_diag", log_diag, "(B, C, H, W)")
    if min(log_diag.shape) == 0:
        raise ValueError(f"log_diag: expected non-empty (B, C, H, W), got {tuple(log_diag.shape)}")
    check_basis(coeffs, basis, stencil, log_diag)
    _checks.check_image("x", x, log_diag)
    _checks.check_image("loc", loc, log_diag)
    _checks.check_finite(x=x, loc=loc, log_diag=log_diag, coeffs=coeffs, basis=basis)
    backend = backend_for(x.device)
    return backend.nll_basis(*_nll_args(backend, x, loc, log_diag, coeffs, basis), stencil)


def precision_diagonal(log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """Diagonal of ``Lambda = U^T U``: ``exp(2 log_diag_p) + sum_i off_diag_{p-delta_i,i}^2``; (B, C, H, W)."""
    _checks.check_params(log_diag, off_diag, stencil)
    _checks.check_finite(log_diag=log_diag, off_diag=off_diag)
    args = _upcast(log_diag, off_diag)
    return backend_for(log_diag.device).precision_diagonal(*args, stencil).to(log_diag.dtype)


def to_dense_upper(log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """Dense U, (B, C, n, n) with n = H*W in raster order; differentiable.

    O(n^2) memory: for small images, tests and teaching.
    """
    _checks.check_params(log_diag, off_diag, stencil)
    return reference.to_dense_upper(log_diag, off_diag, stencil)
