"""Section 4.2 of the paper: a Gamma prior on the precision diagonal and the variance minimiser."""
from __future__ import annotations

import math
import numbers

import torch

from . import _checks, ops
from .ops import _library
from ._dtypes import compute_dtype
from .stencil import Stencil

__all__ = ["gamma_prior_log_prob", "variance_minimiser", "variance_weight"]


def gamma_prior_log_prob(log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil,
                         concentration: float, rate: float) -> torch.Tensor:
    """Eq. 13: ``sum_p log Gamma(Lambda_pp; concentration, rate)`` per image, (B,).

    ``Lambda_pp = exp(2 log_diag_p) + sum_i off_diag_{p-delta_i,i}^2`` is the
    diagonal of the precision. Add its negative, scaled as you like, to the loss.
    Float32 for float32, float16 and bfloat16 inputs (float64 for float64), as the NLL.

    The weights' part ``sum_i w^2`` is one fused pass (the ``precision_diagonal`` op with
    d = 0, an exact limit of contract §1); the density is formed per pixel in float64, where
    ``exp(2 log_diag)`` and its logarithm cannot overflow or underflow for any float32 log_diag: float16 holds d^2 only
    up to log_diag = 5.55, float32 up to 44.4 (past it the prior was NaN and the gradient at
    log_diag = -45 infinite; the exact values are -inf in float32 and 2 (concentration - 1)).
    """
    for name, v in (("concentration", concentration), ("rate", rate)):
        if not (_is_real(v) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: expected a positive finite number, got {v!r}")
    _checks.check_params(log_diag, off_diag, stencil)
    ops.prepare(log_diag.device)       # a forced backend installed, or its error raised
    log_diag, off_diag = _checks.promote(log_diag, off_diag)
    dtype = compute_dtype(log_diag)
    no_diagonal = torch.full_like(log_diag, -math.inf, dtype=dtype)
    fold = _library.fold
    weights = _library.unfold(ops.precision_diagonal_op(fold(no_diagonal), fold(off_diag.to(dtype)),
                                                        _library.op_offsets(stencil, log_diag)), log_diag)
    two_s = 2 * log_diag.to(torch.float64)
    lam = two_s.exp() + weights.to(torch.float64)
    # lam is 0 only where d^2 underflows float64 (log_diag < -372) and no weight reaches the pixel:
    # then log(lam) = 2 log_diag exactly (a where on the safe argument keeps its gradient finite)
    positive = lam > 0
    log_lam = torch.where(positive, torch.where(positive, lam, 1.0).log(), two_s)
    a, b = float(concentration), float(rate)
    per_pixel = (a - 1) * log_lam - b * lam + (a * math.log(b) - math.lgamma(a))
    out = per_pixel.flatten(1).sum(1).to(dtype)
    _checks.check_result(out, {"log_diag": log_diag, "off_diag": off_diag}, op="gamma_prior_log_prob")
    return out


def variance_minimiser(x: torch.Tensor, loc: torch.Tensor, weight: float, reduction: str = "mean") -> torch.Tensor:
    """Eq. 14's extra term ``weight * ||x - loc||^2`` per image, reduced as the NLL losses.

    It pushes the mean to explain the image, so the covariance cannot absorb
    the signal early in training (the paper's "poor local minima"). Float32 for float32,
    float16 and bfloat16 inputs (float64 for float64).
    """
    _checks.check_reduction(reduction)
    if not (_is_real(weight) and math.isfinite(weight)):
        raise ValueError(f"weight: expected a finite number, got {weight!r}")
    layout = "(B, C, D, H, W)" if isinstance(x, torch.Tensor) and x.dim() == 5 else "(B, C, H, W)"   # volumes too
    _checks.check_float_tensor("x", x, layout)
    _checks.check_float_tensor("loc", loc, layout)
    _checks.check_same("loc", loc, "x", x, x.shape, layout)
    # float16/bfloat16 in float32, as every loss (alpha = 5e3 at 64x64 overflowed float16)
    x, loc = ops.upcast(*_checks.promote(x, loc))
    per_image = weight * (x - loc).square().flatten(1).sum(1)
    _checks.check_result(per_image, {"x": x, "loc": loc}, op="variance_minimiser")
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def variance_weight(epoch: int, warmup_epochs: int = 10, warmup_weight: float = 5e3,
                    weight: float = 10.0) -> float:
    """The paper's schedule for the variance minimiser's weight alpha: 5e3 for the
    first 10 epochs, then 10 (section 5, CelebA). Epochs count from 0."""
    if not (isinstance(epoch, numbers.Integral) and not isinstance(epoch, bool) and epoch >= 0):
        raise ValueError(f"epoch: expected an integer >= 0, got {epoch!r}")
    return warmup_weight if epoch < warmup_epochs else weight
