"""The structured Gaussian NLL as a functional loss and an nn.Module."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _checks, ops
from .head import check_bound
from .stencil import Stencil

__all__ = ["structured_gaussian_nll", "StructuredGaussianNLLLoss"]


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image


def structured_gaussian_nll(x: torch.Tensor, loc: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor,
                            stencil: Stencil, reduction: str = "mean", *,
                            basis: Optional[torch.Tensor] = None, cross: Optional[torch.Tensor] = None,
                            weight_bound: Optional[float] = None) -> torch.Tensor:
    """Negative log-likelihood of ``x`` under ``StructuredNormal(loc, log_diag, off_diag, stencil)``.

    Args:
        x, loc, log_diag: (B, C, H, W), or all four unbatched, (C, H, W) and (C*S, H, W); for
            volumes (``Stencil(k, ndim=3)``) (B, C, D, H, W), unbatched (C, D, H, W).
        off_diag: (B, C*S, H, W) with S = ``stencil.S``; the raw weights of a decoder head are
            bounded with ``weight_bound=0.9`` (inside the kernel), or go through
            :func:`structlik.bound_weights` first, so that samples stay finite.
        stencil: a :class:`structlik.Stencil`.
        reduction: ``"none"`` gives the per-image NLL (B,); ``"mean"`` (default)
            its mean over the batch; ``"sum"`` its sum, as ``nn.GaussianNLLLoss``.
        basis: optional learned basis (S, n_b) (paper section 4.3). Then
            ``off_diag`` holds the basis coefficients, (B, C*n_b, H, W), and the
            kernels form the S weights of each pixel on the fly.
        cross: optional cross weights (B, C(C-1)/2, H, W) (unbatched: (C(C-1)/2, H, W)) that couple
            the channels of each pixel (supn_base's ``cross_ch``; docs/contract.md §1); from a
            head, :func:`structlik.split_head` with ``cross=True`` bounds them with the weights.
        weight_bound: ``None`` (default) takes off_diag (and cross) as U's weights; a bound in
            (0, 1) takes them as raw weights and bounds them as :func:`structlik.bound_weights`
            does, inside the NLL kernel (what ``StructuredNormal.from_head`` does by default).

    Equivalent to ``-StructuredNormal(loc, log_diag, off_diag, stencil).log_prob(x)``
    reduced, computed without building U. Floating dtypes promote as in
    ``F.gaussian_nll_loss`` (``torch.result_type``): a bfloat16 head under ``torch.autocast``
    with a float32 target gives a float32 loss.
    """
    _checks.check_reduction(reduction)
    tensors = (x, loc, log_diag, off_diag) + (() if cross is None else (cross,))
    # One unbatched image (C, H, W), as StructuredNormal and torch's nn layers take it: the
    # per-image NLL is then a scalar.
    unbatched = all(isinstance(t, torch.Tensor) and t.dim() == getattr(stencil, "ndim", 2) + 1 for t in tensors)
    if unbatched:
        x, loc, log_diag, off_diag, *rest = (t.unsqueeze(0) for t in tensors)
        cross = rest[0] if rest else None
    if basis is not None:
        if weight_bound is not None:
            raise ValueError("weight_bound: bounds raw weights, not a basis's coefficients; pass weight_bound=None "
                             "with a basis")
        per_image = ops.nll_basis(x, loc, log_diag, off_diag, basis, stencil, cross)
    else:
        per_image = ops.nll(x, loc, log_diag, off_diag, stencil, cross, weight_bound=weight_bound)
    return _reduce(per_image[0] if unbatched else per_image, reduction)


class StructuredGaussianNLLLoss(nn.Module):
    """Module form of :func:`structured_gaussian_nll`.

    ``forward(x, loc, log_diag, off_diag, *, basis=None, cross=None)`` with shapes (B, C, H, W),
    (B, C, H, W), (B, C, H, W), (B, C*S, H, W) (and cross (B, C(C-1)/2, H, W)); ``basis`` and
    ``cross`` are keyword-only, as in :func:`structured_gaussian_nll`, so neither can be taken for
    the other. ``weight_bound`` (e.g. 0.9): off_diag are a head's raw weights, bounded inside the
    kernel. A decoder that
    ends in a convolution with ``C * (2 + S)`` output channels (``+ C(C-1)/2`` with cross
    weights) splits into them without reshaping.
    """

    def __init__(self, stencil: Stencil, reduction: str = "mean", *, weight_bound: Optional[float] = None):
        super().__init__()
        self.stencil = _checks.check_stencil(stencil)
        self.reduction = _checks.check_reduction(reduction)
        if weight_bound is not None:
            weight_bound = check_bound(weight_bound, "weight_bound")
        self.weight_bound = weight_bound

    def forward(self, x, loc, log_diag, off_diag, *, basis=None, cross=None):
        return structured_gaussian_nll(x, loc, log_diag, off_diag, self.stencil, self.reduction, basis=basis,
                                       cross=cross, weight_bound=self.weight_bound)

    def extra_repr(self) -> str:
        bound = "" if self.weight_bound is None else f", weight_bound={self.weight_bound}"
        return f"stencil={self.stencil!r}, reduction={self.reduction!r}{bound}"
