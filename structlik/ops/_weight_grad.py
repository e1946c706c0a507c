"""``weight_grad(a, b)_{c*S+i, p} = a_p b_{p+delta_i}``: the gradient of ``a^T U b`` with respect
to the weights, which every formula of docs/contract.md §1 uses. Internal: ``structlik::weight_grad``.

Kernels: the reference, C++ ``csrc/weight_grad.cpp`` (CPU), Triton ``structlik/kernels/weight_grad.py`` (CUDA).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .. import reference
from ..stencil import Stencil
from .._dtypes import upcast
from . import _library
from ._library import offsets_count, save_inputs


def _reference(a: Tensor, b: Tensor, offsets: List[int]) -> Tensor:
    return reference.weight_grad(*upcast(a, b), Stencil.from_flat_offsets(offsets)).to(a.dtype).contiguous()


def _triton(a: Tensor, b: Tensor, offsets: List[int]) -> Tensor:
    return _library.triton_kernels("weight_grad").launch(a, b, offsets)


def _fake(a, b, offsets):
    return a.new_empty(a.shape[0], a.shape[1] * offsets_count(offsets), *a.shape[2:])


# d/da_p = sum_i G_{p,i} b_{p+delta_i} and d/db_q = sum_i G_{q-delta_i,i} a_{q-delta_i}: U b and U^T a
# with weights G and a zero diagonal (the ops of structlik/ops/_apply_upper.py, whose own formulas use
# this op: looked up by name when the backward runs, so neither module imports the other).
def _backward(ctx, G):
    apply_upper_op, apply_upper_t_op = _library.OPS["apply_upper"], _library.OPS["apply_upper_t"]
    a, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    zero_diagonal = torch.full_like(a, float("-inf"))     # exp(-inf) = 0
    return (apply_upper_op(b, zero_diagonal, G, ctx.offsets) if need[0] else None,
            apply_upper_t_op(a, zero_diagonal, G, ctx.offsets) if need[1] else None,
            None)


weight_grad_op = _library.define("weight_grad(Tensor a, Tensor b, int[] offsets) -> Tensor", reference=_reference,
                                 fake=_fake, triton=_triton, backward=_backward, setup_context=save_inputs)
