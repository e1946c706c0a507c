"""``U r`` and ``U^T y`` (docs/contract.md §1): the ops ``structlik::apply_upper`` and
``structlik::apply_upper_t``, their formulas and the public, validated functions.

Kernels: the reference (``structlik.reference``), C++ ``csrc/apply_upper.cpp`` (CPU),
Triton ``structlik/kernels/apply_upper.py`` (CUDA).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .. import _checks, reference
from ..head import ILL_CONDITIONED, largest_weight_ratio
from ..reference import sum_repeats
from ..stencil import Stencil
from .._dtypes import upcast
from . import _forced, _library
from ._weight_grad import weight_grad_op

def _backward(transposed: bool):
    """M r: d/dr = M^T g, d/ds = g r d, d/dw_{p,i} = g_p r_{p+delta_i}, d/dxi_{kappa(c,j)} = g_c r_j;
    M^T y = sum over p of y_p M[p, :]: d/dy = M g, d/ds = y g d, d/dw_{p,i} = y_p g_{p+delta_i},
    d/dxi_{kappa(c,j)} = y_c g_j."""
    def backward(ctx, g):
        image, log_diag, off_diag, cross = ctx.saved_tensors
        need = ctx.needs_input_grad
        other = apply_upper_op if transposed else apply_upper_t_op
        row, column = (image, g) if transposed else (g, image)
        batch = log_diag.shape[0]
        grads = (other(g, log_diag, off_diag, ctx.offsets, cross) if need[0] else None,
                 sum_repeats(g * image, batch) * log_diag.exp() if need[1] else None,
                 weight_grad_op(row, column, ctx.offsets, batch) if need[2] else None,
                 None,
                 sum_repeats(reference.cross_grad(row, column), batch) if cross is not None and need[4] else None)
        return grads[:ctx.inputs]
    return backward


apply_upper_op = _library.define("apply_upper" + _library.IMAGE_SCHEMA.format(image="r"),
                                 **_library.image_kernels("apply_upper", reference.apply_upper, False),
                                 fake=_library.fake_image, backward=_backward(False),
                                 setup_context=_library.save_image_inputs)
apply_upper_t_op = _library.define("apply_upper_t" + _library.IMAGE_SCHEMA.format(image="y"),
                                   **_library.image_kernels("apply_upper", reference.apply_upper_t, True),
                                   fake=_library.fake_image, backward=_backward(True),
                                   setup_context=_library.save_image_inputs)


# The public name of each image op and its right-hand side's argument name.
IMAGE_OPS = {"apply_upper": "r", "apply_upper_t": "y", "solve_upper": "z", "solve_upper_t": "g"}


def image_op(op, name: str, image, log_diag, off_diag, stencil, *, cross=None, params_repeat: bool = False,
             blame: Optional[Dict[str, torch.Tensor]] = None):
    """One of the four image ops (``apply_upper_op`` ... ``solve_upper_t_op``), validated.
    ``cross``: the cross weights of coupled channels, or None. ``params_repeat``: the parameters
    may hold fewer images than ``image`` (image b uses parameters b % their batch; the
    distribution's samples). ``blame``: the tensors to name when the result is not finite
    (default: the op's own arguments). A solve's result that is not finite although its inputs
    are raises, naming the weight ratio that made U^-1 overflow."""
    image_name = IMAGE_OPS[name]
    _checks.check_stencil(stencil)
    _checks.check_against_image(image_name, image, stencil, _checks.param_layouts(stencil, log_diag, off_diag),
                                params_repeat)
    cross = _checks.check_cross(cross, image_name, image, params_repeat)
    _forced.prepare(image.device)
    image, log_diag, off_diag, cross = _checks.promote_optional(image, log_diag, off_diag, cross)
    folded = [_library.fold(t) for t in upcast(image, log_diag, off_diag)]
    out = op(*folded, _library.op_offsets(stencil, image),
             None if cross is None else _library.fold(upcast(image, cross)[1]))
    out = _library.unfold(out, image).to(image.dtype)
    solve = name.startswith("solve")
    inputs = {image_name: image, "log_diag": log_diag, "off_diag": off_diag,
              **({} if cross is None else {"cross": cross})}
    _checks.check_result(out, blame or inputs, op=name,
                         overflow=(lambda: ill_conditioned(log_diag, off_diag, stencil, name, cross)) if solve else None,
                         inf_ok=not solve)
    return out


def ill_conditioned(log_diag, off_diag, stencil, name: str = "solve_upper", cross=None) -> str:
    """Why a solve overflowed: the largest sum|w|/d (cross weights included), and the recipe that bounds it."""
    ratio = largest_weight_ratio(log_diag.detach(), off_diag.detach(), stencil.S,
                                 None if cross is None else cross.detach())
    inverse = "U^-T" if name.endswith("_t") else "U^-1"
    return f"{inverse} overflowed ({ILL_CONDITIONED.format(ratio=ratio)})"


def apply_upper(r: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil,
                cross: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``U r``: ``(U r)_p = exp(log_diag_p) r_p + sum_i off_diag_{p,i} r_{p+delta_i}``; (B, C, H, W).
    With ``cross`` (B, C(C-1)/2, H, W), ``M r``: channel c also gathers
    ``sum_{j>c} cross_{kappa(c,j),p} r_{j,p}`` (docs/contract.md §1)."""
    return image_op(apply_upper_op, "apply_upper", r, log_diag, off_diag, stencil, cross=cross)


def apply_upper_t(y: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil,
                  cross: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``U^T y`` (``M^T y`` with ``cross``), the transposed stencil; (B, C, H, W)."""
    return image_op(apply_upper_t_op, "apply_upper_t", y, log_diag, off_diag, stencil, cross=cross)
