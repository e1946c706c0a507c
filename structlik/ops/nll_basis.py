"""The NLL with a learned basis (paper section 4.3): ``off_diag = expand_basis(coeffs, basis)``
formed inside the kernels, so the (B, C*S, H, W) weights never exist. The op
``structlik::nll_basis``, its fused gradient ``nll_basis_backward``, the formula and the
public, validated ``nll_basis``.

Kernels: the reference (materialises the weights), C++ ``csrc/nll_basis.cpp`` (CPU),
Triton ``structlik/kernels/nll_basis.py`` (CUDA).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from ..basis import expand_basis
from ..stencil import Stencil
from . import _library
from ._library import save_inputs_and_u
from .nll import (_reference_grads, _reference_nll, _reference_nll_u, checked_nll, composed_grads, fused, stores_u,
                  x_and_loc_grads)

_ARGS = "Tensor x, Tensor loc, Tensor log_diag, Tensor coeffs, Tensor basis"


def _reference(x: Tensor, loc: Tensor, log_diag: Tensor, coeffs: Tensor, basis: Tensor, offsets: List[int]) -> Tensor:
    coeffs, basis = _library.upcast(coeffs, basis)
    return _reference_nll(x, loc, log_diag, expand_basis(coeffs, basis), offsets)


def _basis_grads(gw, coeffs, basis):
    """From the weights' gradient gw (B, C*S, H, W): d/dcoeffs_j = sum_i basis_ij gw_i and
    d/dbasis_ij = <gw_i, coeffs_j> over every pixel."""
    B, _, H, W = gw.shape
    S, nb = basis.shape
    gw = gw.reshape(B, -1, S, H, W)
    c = coeffs.reshape(B, -1, nb, H, W)
    gc = torch.einsum("ij,bcihw->bcjhw", basis.to(gw.dtype), gw).reshape(coeffs.shape).to(coeffs.dtype)
    gb = torch.einsum("bcihw,bcjhw->ij", gw, c.to(gw.dtype)).to(basis.dtype)
    return gc, gb


def _reference_backward(grad: Tensor, x: Tensor, loc: Tensor, log_diag: Tensor, coeffs: Tensor, basis: Tensor,
                        offsets: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = _library.compute_dtype(x)
    off_diag = expand_basis(coeffs.to(dtype), basis.to(dtype))
    gloc, gs, gw = _reference_grads(grad, x, loc, log_diag, off_diag, offsets)
    return (gloc, gs, *_basis_grads(gw, coeffs, basis))


def _reference_u(x: Tensor, loc: Tensor, log_diag: Tensor, coeffs: Tensor, basis: Tensor,
                 offsets: List[int]) -> Tuple[Tensor, Tensor]:
    coeffs, basis = _library.upcast(coeffs, basis)
    return _reference_nll_u(x, loc, log_diag, expand_basis(coeffs, basis), offsets)


def _reference_u_backward(grad: Tensor, x: Tensor, loc: Tensor, log_diag: Tensor, coeffs: Tensor, basis: Tensor,
                          u: Tensor, offsets: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _reference_backward(grad, x, loc, log_diag, coeffs, basis, offsets)


def _kernels():
    return _library.triton_kernels("nll_basis")


def _triton(x, loc, log_diag, coeffs, basis, offsets):
    return _kernels().forward(x, loc, log_diag, coeffs, basis, offsets)


def _triton_u(x, loc, log_diag, coeffs, basis, offsets):
    return _kernels().forward(x, loc, log_diag, coeffs, basis, offsets, with_u=True)


def _triton_backward(grad, x, loc, log_diag, coeffs, basis, offsets):
    return _kernels().backward(grad, x, loc, log_diag, coeffs, basis, offsets)


def _triton_u_backward(grad, x, loc, log_diag, coeffs, basis, u, offsets):
    return _kernels().backward(grad, x, loc, log_diag, coeffs, basis, offsets, u=u)


def _fake(x, *rest):
    return x.new_empty(x.shape[0], dtype=_library.compute_dtype(x))


def _fake_u(x, *rest):
    dtype = _library.compute_dtype(x)
    return x.new_empty(x.shape[0], dtype=dtype), x.new_empty(x.shape, dtype=dtype)


def _fake_backward(grad, x, loc, log_diag, coeffs, basis, *rest):
    return (loc.new_empty(loc.shape), log_diag.new_empty(log_diag.shape), coeffs.new_empty(coeffs.shape),
            basis.new_empty(basis.shape))


# per_slice_vmap: the basis gradient is a sum over all images, not per image
_nll_basis_backward = _library.define(
    f"nll_basis_backward(Tensor grad, {_ARGS}, int[] offsets) -> (Tensor, Tensor, Tensor, Tensor)",
    reference=_reference_backward, fake=_fake_backward, triton=_triton_backward, per_slice_vmap=True)
_nll_basis_u_backward = _library.define(
    f"nll_basis_u_backward(Tensor grad, {_ARGS}, Tensor u, int[] offsets) -> (Tensor, Tensor, Tensor, Tensor)",
    reference=_reference_u_backward, fake=_fake_backward, triton=_triton_u_backward, per_slice_vmap=True)


def _grads(ctx, grad, x, loc, log_diag, coeffs, basis, u=None):
    need = ctx.needs_input_grad
    if fused() and u is not None:       # u: what the training forward stored
        gloc, gs, gc, gb = _nll_basis_u_backward(grad, x, loc, log_diag, coeffs, basis, u, ctx.offsets)
    elif fused():
        gloc, gs, gc, gb = _nll_basis_backward(grad, x, loc, log_diag, coeffs, basis, ctx.offsets)
    else:
        gloc, gs, gw = composed_grads(grad, x, loc, log_diag, expand_basis(coeffs, basis), ctx.offsets)
        gc, gb = _basis_grads(gw, coeffs, basis)
    return (*x_and_loc_grads(gloc, need), gs if need[2] else None,
            gc if need[3] else None, gb if need[4] else None, None)


def _formula(ctx, grad):
    return _grads(ctx, grad, *ctx.saved_tensors)


def _formula_u(ctx, grad, _grad_u):
    if grad is None:        # not materialised: nothing flows back
        return None, None, None, None, None, None
    return _grads(ctx, grad, *ctx.saved_tensors)


_nll_basis = _library.define(f"nll_basis({_ARGS}, int[] offsets) -> Tensor", reference=_reference, fake=_fake,
                             triton=_triton, backward=_formula, setup_context=_library.save_inputs)
# The training forward: also u = U (x - loc), which the one-pass backward reads (Triton's kernels store it).
_nll_basis_u = _library.define(f"nll_basis_u({_ARGS}, int[] offsets) -> (Tensor, Tensor)", reference=_reference_u,
                               fake=_fake_u, triton=_triton_u, backward=_formula_u, setup_context=save_inputs_and_u)


def nll_basis_op(x, loc, log_diag, coeffs, basis, offsets, backend: str = "cpu"):
    """The differentiable op, unvalidated (the training forward where ``backend`` stores u)."""
    if stores_u(backend, x, loc, log_diag, coeffs, basis):
        return _nll_basis_u(x, loc, log_diag, coeffs, basis, offsets)[0]
    return _nll_basis(x, loc, log_diag, coeffs, basis, offsets)


def nll_basis(x: torch.Tensor, loc: torch.Tensor, log_diag: torch.Tensor, coeffs: torch.Tensor, basis: torch.Tensor,
              stencil: Stencil) -> torch.Tensor:
    """Per-image NLL, (B,), with ``off_diag = expand_basis(coeffs, basis)`` formed inside the kernel.

    coeffs: (B, C*n_b, H, W); basis: (S, n_b), shared by all images and channels.
    Differentiable in every tensor, the basis included (its gradient is a
    reduction over all pixels). Equivalent to ``nll(x, loc, log_diag,
    expand_basis(coeffs, basis), stencil)`` without the (B, C*S, H, W) tensor.
    """
    return checked_nll("x", x, loc, log_diag, coeffs, stencil, basis=basis)
