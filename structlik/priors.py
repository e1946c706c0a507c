"""Section 4.2 of the paper: a Gamma prior on the precision diagonal and the variance minimiser."""
from __future__ import annotations

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
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{name}: expected a positive number, got {v!r}")
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
    _checks.check_float_tensor("x", x, "(B, C, H, W)")
    _checks.check_float_tensor("loc", loc, "(B, C, H, W)")
    if x.shape != loc.shape:
        raise ValueError(f"loc: expected shape (B, C, H, W) = {tuple(x.shape)}, got {tuple(loc.shape)}")
    per_image = weight * (x - loc).square().sum((1, 2, 3))
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image


def variance_weight(epoch: int, warmup_epochs: int = 10, warmup_weight: float = 5e3,
                    weight: float = 10.0) -> float:
    """The paper's schedule for the variance minimiser's weight alpha: 5e3 for the
    first 10 epochs, then 10 (section 5, CelebA). Epochs count from 0."""
    if epoch < 0:
        raise ValueError(f"epoch: expected >= 0, got {epoch}")
    return warmup_weight if epoch < warmup_epochs else weight
