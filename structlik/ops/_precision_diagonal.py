"""The diagonal of ``Lambda = U^T U`` (docs/contract.md §1; the Gamma prior's argument, eq. 13):
the op ``structlik::precision_diagonal``, its formula and the public, validated function.

Kernels: the reference, C++ ``csrc/precision_diagonal.cpp`` (CPU), Triton
``structlik/kernels/precision_diagonal.py`` (CUDA).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from .. import _checks, reference
from ..stencil import Stencil
from .._dtypes import upcast
from . import _forced, _library
from ._weight_grad import weight_grad_op


def _reference(log_diag: Tensor, off_diag: Tensor, offsets: List[int], cross: Optional[Tensor] = None) -> Tensor:
    args = upcast(log_diag, off_diag, *(() if cross is None else (cross,)))
    out = reference.precision_diagonal(*args[:2], Stencil.from_flat_offsets(offsets), args[2] if len(args) > 2 else None)
    return out.to(log_diag.dtype).contiguous()


def _triton(log_diag: Tensor, off_diag: Tensor, offsets: List[int], cross: Optional[Tensor] = None) -> Tensor:
    return _library.triton_kernels("precision_diagonal").launch(log_diag, off_diag, offsets, cross)


def _fake(log_diag, off_diag, offsets, cross=None):
    return log_diag.new_empty(log_diag.shape)


def _save(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], inputs[3] if len(inputs) > 3 else None)
    ctx.offsets, ctx.inputs = inputs[2], len(inputs)


# Lambda_pp = d_p^2 + sum_i w_{p-delta_i,i}^2 (+ sum_{c<j} xi_{kappa(c,j),p}^2 at channel j):
# d/ds = 2 G d^2, d/dw_{p,i} = 2 w_{p,i} G_{p+delta_i}, 0 where p + delta_i is outside (that weight is
# not part of U: contract §1), whatever it holds; d/dxi_{kappa(c,j)} = 2 xi G_j.
def _backward(ctx, G):
    log_diag, off_diag, cross = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_w = None
    if need[1]:
        B, CS, H, W = off_diag.shape
        read = reference.read_mask(Stencil.from_flat_offsets(ctx.offsets), H, W, off_diag.device)
        w = torch.where(read, off_diag.unflatten(1, (-1, read.shape[0])), 0).flatten(1, 2)
        grad_w = 2 * w * weight_grad_op(torch.ones_like(G), G, ctx.offsets, G.shape[0])
    grad_cross = None
    if cross is not None and need[3]:
        grad_cross = 2 * cross * G[:, reference.cross_pairs(G.shape[1], G.device)[1]]
    return (2 * G * (2 * log_diag).exp() if need[0] else None, grad_w, None, grad_cross)[:ctx.inputs]


precision_diagonal_op = _library.define(
    "precision_diagonal(Tensor log_diag, Tensor off_diag, int[] offsets, Tensor? cross=None) -> Tensor",
    reference=_reference, fake=_fake, triton=_triton, backward=_backward, setup_context=_save)


def precision_diagonal(log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil,
                       cross: Optional[torch.Tensor] = None, *,
                       blame: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Diagonal of ``Lambda = U^T U``: ``exp(2 log_diag_p) + sum_i off_diag_{p-delta_i,i}^2``; (B, C, H, W).
    With ``cross``, of ``M^T M``: channel j adds ``sum_{c<j} cross_{kappa(c,j),p}^2``."""
    _checks.check_params(log_diag, off_diag, stencil)
    cross = _checks.check_cross(cross, "log_diag", log_diag)
    _forced.prepare(log_diag.device)
    log_diag, off_diag, cross = _checks.promote_optional(log_diag, off_diag, cross)
    args = upcast(log_diag, off_diag, *(() if cross is None else (cross,)))
    args = [_library.fold(t) for t in args]
    out = precision_diagonal_op(*args[:2], _library.op_offsets(stencil, log_diag), args[2] if cross is not None else None)
    out = _library.unfold(out, log_diag).to(log_diag.dtype)
    inputs = {"log_diag": log_diag, "off_diag": off_diag, **({} if cross is None else {"cross": cross})}
    _checks.check_result(out, blame or inputs, op="precision_diagonal")
    return out
