"""``U^-1 z`` and ``U^-T g`` (docs/contract.md §1): the ops ``structlik::solve_upper`` and
``structlik::solve_upper_t``, their formulas and the public, validated functions.

Kernels: the reference's wavefronts (``structlik.reference``), C++ ``csrc/solve_upper.cpp``
(CPU), Triton ``structlik/kernels/solve_upper.py`` (CUDA). The parameters may hold fewer
images than the right-hand side (image b uses parameters b % their batch: the samples of
one distribution), so every parameter gradient is summed over the images that share it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from ..reference import sum_repeats
from ..stencil import Stencil
from . import _library
from ._apply_upper import image_op
from ._weight_grad import weight_grad_op

def _save_output(ctx, inputs, output):
    cross = inputs[4] if len(inputs) > 4 else None
    ctx.save_for_backward(output, inputs[1], inputs[2], cross)
    ctx.offsets, ctx.inputs = inputs[3], len(inputs)


# After v = M^-T g (solve_upper) or a = M^-1 h (solve_upper_t): dL/dM_{pq} = -v_p sol_q,
# summed over the samples that share one set of parameters.
def _parameter_grads(ctx, v, sol, log_diag, cross):
    need = ctx.needs_input_grad
    batch = log_diag.shape[0]
    # d = +inf pins a pixel (contract §1): there v_p = sol_p = 0, and the derivative of the limit
    # is 0 (v_p sol_p d_p ~ 1/d_p), where 0 * 0 * inf is NaN. d capped at the dtype's largest
    # value gives 0 there and changes no finite d's product (past the cap, exp(s) overflows).
    d = log_diag.clamp(max=math.log(torch.finfo(log_diag.dtype).max)).exp()
    return (-sum_repeats(v * sol, batch) * d if need[1] else None,
            -weight_grad_op(v, sol, ctx.offsets, batch) if need[2] else None,
            None,
            -sum_repeats(reference.cross_grad(v, sol), batch) if cross is not None and need[4] else None)


def _solve_upper_backward(ctx, g):
    eps, log_diag, off_diag, cross = ctx.saved_tensors
    v = solve_upper_t_op(g, log_diag, off_diag, ctx.offsets, cross)
    return (v, *_parameter_grads(ctx, v, eps, log_diag, cross))[:ctx.inputs]


def _solve_upper_t_backward(ctx, h):
    v, log_diag, off_diag, cross = ctx.saved_tensors
    a = solve_upper_op(h, log_diag, off_diag, ctx.offsets, cross)
    return (a, *_parameter_grads(ctx, v, a, log_diag, cross))[:ctx.inputs]


_SCHEMA = _library.IMAGE_SCHEMA.replace("{image}", "{rhs}")
solve_upper_op = _library.define("solve_upper" + _SCHEMA.format(rhs="z"),
                                 **_library.image_kernels("solve_upper", reference.solve_upper, False),
                                 fake=_library.fake_image, backward=_solve_upper_backward, setup_context=_save_output)
solve_upper_t_op = _library.define("solve_upper_t" + _SCHEMA.format(rhs="g"),
                                   **_library.image_kernels("solve_upper", reference.solve_upper_t, True),
                                   fake=_library.fake_image, backward=_solve_upper_t_backward,
                                   setup_context=_save_output)


def solve_upper(z: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil,
                cross: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``U^-1 z`` (back-substitution in reverse raster order); (B, C, H, W). With ``cross``,
    ``M^-1 z`` (each pixel's channels last to first).

    With ``z ~ N(0, I)``, ``loc + solve_upper(z, ...)`` is a sample of the
    structured Gaussian. Differentiable in every tensor.
    """
    return image_op(solve_upper_op, "solve_upper", z, log_diag, off_diag, stencil, cross=cross)


def solve_upper_t(g: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil,
                  cross: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``U^-T g`` (``M^-T g`` with ``cross``; forward substitution in raster order); (B, C, H, W)."""
    return image_op(solve_upper_t_op, "solve_upper_t", g, log_diag, off_diag, stencil, cross=cross)
