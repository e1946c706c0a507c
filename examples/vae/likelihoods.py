"""The decoder's likelihood p(x|z): diagonal or structured, grayscale or YCbCr.

Every likelihood maps the decoder's heads to a distribution over the image x
in [0, 1] with ``log_prob(x)`` (per image), ``mean`` and ``rsample()`` in image
space. The colour ones model (Y, Cb, Cr) with Cb, Cr at 1/factor resolution
(the paper's eqs. 8-12) whether the luminance is structured or diagonal, so
all colour models are scored on the same variables and their NLLs compare.
"""
from __future__ import annotations

import torch
from torch.distributions import Independent, Normal

import structlik
from structlik.color import YCbCrStructuredNormal
from structlik.head import check_bound


class YCbCrDiagonalNormal(YCbCrStructuredNormal):
    """The diagonal baseline in the same colour space: luminance N(mu_Y, sigma_Y^2 I)."""

    def __init__(self, y_loc, y_log_scale, chroma_loc, chroma_log_scale, factor: int = 4):
        B, _, H, W = y_loc.shape
        self.luma = Independent(Normal(y_loc, y_log_scale.exp()), 3)
        self.chroma = Normal(chroma_loc, chroma_log_scale.exp())
        self.stencil, self.factor = None, factor
        torch.distributions.Distribution.__init__(self, batch_shape=torch.Size([B]),
                                                  event_shape=torch.Size([3, H, W]), validate_args=False)


class Likelihood:
    """Head sizes and the distribution they parameterise.

    Args:
        color: False for 1-channel images, True for RGB modelled in YCbCr.
        stencil: a :class:`structlik.Stencil` for a structured (luminance)
            precision, or None for the diagonal baseline.
        factor: chroma down-sampling factor (colour only).
    """

    def __init__(self, color: bool, stencil: structlik.Stencil | None, factor: int = 4,
                 weight_bound: float | None = None):
        if weight_bound is not None:
            weight_bound = check_bound(weight_bound, "weight_bound")
        self.color, self.stencil, self.factor = color, stencil, factor
        self.structured = stencil is not None
        self.weight_bound = weight_bound

    @property
    def image_channels(self) -> int:
        return 3 if self.color else 1

    @property
    def full_res_channels(self) -> tuple[int, int]:
        """(mean channels, covariance channels) of the full-resolution heads."""
        return 1, 1 + (self.stencil.S if self.structured else 0)

    @property
    def low_res_channels(self) -> tuple[int, int]:
        """(mean, covariance) channels at 1/factor resolution: Cb, Cr and their log-scales."""
        return (2, 2) if self.color else (0, 0)

    def dims(self, H: int, W: int) -> int:
        """Number of modelled variables per image (the denominator of bits/dim)."""
        return H * W + (2 * (H // self.factor) * (W // self.factor) if self.color else 0)

    def __call__(self, mean, cov, low_mean=None, low_cov=None):
        if self.structured:
            log_diag, off_diag = cov.split([1, self.stencil.S], dim=1)
            if self.weight_bound is not None:
                off_diag = structlik.bound_weights(log_diag, off_diag, self.weight_bound)
            if self.color:
                return YCbCrStructuredNormal(mean, log_diag, off_diag, low_mean, low_cov, self.stencil,
                                             self.factor, validate_args=False)
            return structlik.StructuredNormal(mean, log_diag, off_diag, self.stencil, validate_args=False)
        if self.color:
            return YCbCrDiagonalNormal(mean, cov, low_mean, low_cov, self.factor)
        return Independent(Normal(mean, cov.exp()), 3)

    def squared_error(self, dist, x: torch.Tensor) -> torch.Tensor:
        """Per image ||x - mu||^2 over the modelled variables: eq. 14's variance minimiser."""
        if self.color:
            y, chroma = dist.split(x)
            return (structlik.variance_minimiser(y, dist.luma.mean, 1.0, reduction="none")
                    + structlik.variance_minimiser(chroma, dist.chroma.mean, 1.0, reduction="none"))
        return structlik.variance_minimiser(x, dist.mean, 1.0, reduction="none")

    def gamma_prior(self, dist, concentration: float, rate: float) -> torch.Tensor:
        """Per image log Gamma(Lambda_pp) of the structured (luminance) precision diagonal, eq. 13."""
        if not self.structured:
            raise ValueError("gamma prior: only defined for a structured likelihood (stencil is None)")
        luma = dist.luma if self.color else dist
        return structlik.gamma_prior_log_prob(luma.log_diag, luma.off_diag, self.stencil, concentration, rate)

    def describe(self) -> str:
        space = "YCbCr (Cb, Cr at 1/%d)" % self.factor if self.color else "grayscale"
        cov = f"structured {self.stencil}" if self.structured else "diagonal"
        if self.structured and self.weight_bound is not None:
            cov += f" with sum|w| < {self.weight_bound:g} d"
        return f"{cov}, {space}"
