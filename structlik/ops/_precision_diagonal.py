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
from ._library import save_inputs
from ._weight_grad import weight_grad_op


def _reference(log_diag: Tensor, off_diag: Tensor, offsets: List[int]) -> Tensor:
    args = upcast(log_diag, off_diag)
    return reference.precision_diagonal(*args, Stencil.from_flat_offsets(offsets)).to(log_diag.dtype).contiguous()


def _triton(log_diag: Tensor, off_diag: Tensor, offsets: List[int]) -> Tensor:
    return _library.triton_kernels("precision_diagonal").launch(log_diag, off_diag, offsets)


def _fake(log_diag, off_diag, offsets):
    return log_diag.new_empty(log_diag.shape)


# Lambda_pp = d_p^2 + sum_i w_{p-delta_i,i}^2: d/ds = 2 G d^2, d/dw_{p,i} = 2 w_{p,i} G_{p+delta_i},
# 0 where p + delta_i is outside (that weight is not part of U: contract §1), whatever it holds.
def _backward(ctx, G):
    log_diag, off_diag = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_w = None
    if need[1]:
        B, CS, H, W = off_diag.shape
        read = reference.read_mask(Stencil.from_flat_offsets(ctx.offsets).offsets, H, W, off_diag.device)
        w = torch.where(read, off_diag.unflatten(1, (-1, read.shape[0])), 0).flatten(1, 2)
        grad_w = 2 * w * weight_grad_op(torch.ones_like(G), G, ctx.offsets)
    return (2 * G * (2 * log_diag).exp() if need[0] else None, grad_w, None)


precision_diagonal_op = _library.define(
    "precision_diagonal(Tensor log_diag, Tensor off_diag, int[] offsets) -> Tensor", reference=_reference,
    fake=_fake, triton=_triton, backward=_backward, setup_context=save_inputs)


def precision_diagonal(log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil, *,
                       blame: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Diagonal of ``Lambda = U^T U``: ``exp(2 log_diag_p) + sum_i off_diag_{p-delta_i,i}^2``; (B, C, H, W)."""
    _checks.check_params(log_diag, off_diag, stencil)
    _forced.prepare(log_diag.device)
    log_diag, off_diag = _checks.promote(log_diag, off_diag)
    out = precision_diagonal_op(*upcast(log_diag, off_diag), stencil.flat_offsets).to(log_diag.dtype)
    _checks.check_result(out, blame or {"log_diag": log_diag, "off_diag": off_diag}, op="precision_diagonal")
    return out
