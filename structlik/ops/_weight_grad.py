"""``weight_grad(a, b, batch)_{j, c*S+i, p} = sum_{k = j mod batch} a_kp b_{k,p+delta_i}``: the gradient of
``sum_k a_k^T U b_k`` with respect to the weights, image k using parameters k % batch (a distribution's
samples, a low-rank factor's columns), which every formula of docs/contract.md §1 uses. Internal:
``structlik::weight_grad``.

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
from ._library import offsets_count


def _reference(a: Tensor, b: Tensor, offsets: List[int], batch: int) -> Tensor:
    terms = reference.weight_grad(*upcast(a, b), Stencil.from_flat_offsets(offsets))
    return reference.sum_repeats(terms, batch).to(a.dtype).contiguous()


def _triton(a: Tensor, b: Tensor, offsets: List[int], batch: int) -> Tensor:
    return _library.triton_kernels("weight_grad").launch(a, b, offsets, batch)


def _fake(a, b, offsets, batch):
    torch._check(batch > 0 and a.shape[0] % batch == 0 or a.shape[0] == batch == 0,
                 lambda: f"batch: expected a divisor of a's batch {a.shape[0]}, got {batch}")
    return a.new_empty(batch, a.shape[1] * offsets_count(offsets), *a.shape[2:])


# d/da_p = sum_i G_{p,i} b_{p+delta_i} and d/db_q = sum_i G_{q-delta_i,i} a_{q-delta_i}: U b and U^T a
# with weights G (image k reading G's image k % batch, as the image ops' repeated parameters) and a zero diagonal (the ops of structlik/ops/_apply_upper.py, whose own formulas use
# this op: looked up by name when the backward runs, so neither module imports the other).
def _backward(ctx, G):
    apply_upper_op, apply_upper_t_op = _library.OPS["apply_upper"], _library.OPS["apply_upper_t"]
    a, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    zero_diagonal = a.new_full((G.shape[0], *a.shape[1:]), float("-inf"))     # exp(-inf) = 0
    return (apply_upper_op(b, zero_diagonal, G, ctx.offsets) if need[0] else None,
            apply_upper_t_op(a, zero_diagonal, G, ctx.offsets) if need[1] else None,
            None, None)


def _save(ctx, inputs, output):
    a, b, ctx.offsets, _ = inputs
    ctx.save_for_backward(a, b)


weight_grad_op = _library.define("weight_grad(Tensor a, Tensor b, int[] offsets, int batch) -> Tensor",
                                 reference=_reference, fake=_fake, triton=_triton, backward=_backward, setup_context=_save)
