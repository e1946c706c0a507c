"""Section 4.2 of the paper: a Gamma prior on the precision diagonal and the variance minimiser."""
from __future__ import annotations

import math
import numbers

import torch

from . import _checks, ops
from .stencil import Stencil

__all__ = ["gamma_prior_log_prob", "variance_minimiser", "variance_weight"]


def gamma_prior_log_prob(log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil,
                         concentration: float, rate: float) -> torch.Tensor:
    """Eq. 13: ``sum_p log Gamma(Lambda_pp; concentration, rate)`` per image, (B,).

    ``Lambda_pp = exp(2 log_diag_p) + sum_i off_diag_{p-delta_i,i}^2`` is the
    diagonal of the precision (``ops.precision_diagonal``, fused on every
    backend). Add its negative, scaled as you like, to the loss.
    """
    for name, v in (("concentration", concentration), ("rate", rate)):
        if not (_is_real(v) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: expected a positive finite number, got {v!r}")
    lam = ops.precision_diagonal(log_diag, off_diag, stencil)
    prior = torch.distributions.Gamma(torch.tensor(float(concentration), dtype=lam.dtype, device=lam.device),
                                      torch.tensor(float(rate), dtype=lam.dtype, device=lam.device),
                                      validate_args=False)
    return prior.log_prob(lam).sum((1, 2, 3))


def variance_minimiser(x: torch.Tensor, loc: torch.Tensor, weight: float, reduction: str = "mean") -> torch.Tensor:
    """Eq. 14's extra term ``weight * ||x - loc||^2`` per image, reduced as the NLL losses.

    It pushes the mean to explain the image, so the covariance cannot absorb
    the signal early in training (the paper's "poor local minima").
    """
    _checks.check_reduction(reduction)
    if not (_is_real(weight) and math.isfinite(weight)):
        raise ValueError(f"weight: expected a finite number, got {weight!r}")
    _checks.check_float_tensor("x", x, "(B, C, H, W)")
    _checks.check_float_tensor("loc", loc, "(B, C, H, W)")
    _checks.check_same("loc", loc, "x", x, x.shape, "(B, C, H, W)")
    x, loc = _checks.promote(x, loc)
    per_image = weight * (x - loc).square().sum((1, 2, 3))
    _checks.check_result(per_image, x=x, loc=loc)
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
