"""YCbCr colour (paper section 4.1): Y structured at full resolution, Cb and Cr
diagonal at a reduced resolution.

The transform is JPEG's full-range BT.601 on float images in [0, 1], chroma
centred on 0.5; ``ycbcr_to_rgb`` applies the exact inverse matrix.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Normal, constraints

from . import _checks
from .distribution import StructuredNormal
from .head import DEFAULT_WEIGHT_BOUND, bound_weights, check_bound
from .stencil import Stencil

__all__ = ["rgb_to_ycbcr", "ycbcr_to_rgb", "downsample_chroma", "upsample_chroma", "YCbCrStructuredNormal"]

# Rows give Y, Cb, Cr from R, G, B (JPEG / ITU-T T.871).
_RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114],
                              [-0.168735891647856, -0.331264108352144, 0.5],
                              [0.5, -0.418687589158345, -0.081312410841655]], dtype=torch.float64)
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR)
_OFFSET = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)


def _check_rgb_like(name: str, t) -> None:
    _checks.check_float_tensor(name, t, "(B, 3, H, W)")
    if t.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (B, 3, H, W), got {tuple(t.shape)}")


def _apply(matrix, image, offset_before, offset_after):
    m = matrix.to(image)
    out = torch.einsum("ij,bjhw->bihw", m, image - offset_before.to(image).view(1, 3, 1, 1))
    return out + offset_after.to(image).view(1, 3, 1, 1)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W) Y, Cb, Cr (chroma centred on 0.5)."""
    _check_rgb_like("rgb", rgb)
    return _apply(_RGB_TO_YCBCR, rgb, torch.zeros(3, dtype=torch.float64), _OFFSET)


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`rgb_to_ycbcr`."""
    _check_rgb_like("ycbcr", ycbcr)
    return _apply(_YCBCR_TO_RGB, ycbcr, _OFFSET, torch.zeros(3, dtype=torch.float64))


def _check_factor(name: str, t: torch.Tensor, factor: int) -> int:
    """``factor`` as an int (any integer type: numpy's too, as Stencil takes them; not bool)."""
    if not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor: expected a positive integer, got {factor!r}")
    factor = int(factor)
    if t.shape[-2] % factor or t.shape[-1] % factor:
        raise ValueError(f"{name}: expected H and W divisible by factor={factor}, got {tuple(t.shape)}")
    return factor


def downsample_chroma(chroma: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """(B, 2, H, W) -> (B, 2, H/f, W/f) by averaging f x f blocks (the paper: 64x64 -> 16x16)."""
    _checks.check_float_tensor("chroma", chroma, "(B, 2, H, W)")
    factor = _check_factor("chroma", chroma, factor)
    return F.avg_pool2d(chroma, factor) if factor > 1 else chroma


def upsample_chroma(chroma: torch.Tensor, factor: int = 4, mode: str = "nearest") -> torch.Tensor:
    """(B, 2, h, w) -> (B, 2, h*f, w*f), for display; ``mode`` as ``F.interpolate``."""
    _checks.check_float_tensor("chroma", chroma, "(B, 2, h, w)")
    if factor == 1:
        return chroma
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(chroma, scale_factor=factor, mode=mode, **kwargs)


class YCbCrStructuredNormal(Distribution):
    r"""The paper's colour likelihood (eqs. 8-12) for RGB images in [0, 1].

    ``p(x) = N(x_Y; y_loc, (U^T U)^-1) N(x_Cb; mu_Cb, sigma_Cb^2 I) N(x_Cr; mu_Cr, sigma_Cr^2 I)``,
    with the luminance structured at full resolution (H, W) and the two chroma
    channels diagonal at (H/f, W/f). ``log_prob(rgb)`` converts the image to
    YCbCr, averages its chroma over f x f blocks, and sums the three terms: it is
    the density of (Y, downsampled Cb, downsampled Cr), the quantity the paper
    trains and evaluates, not a density over RGB itself.

    Decoder heads: a full-resolution head with ``2 + S`` channels
    (``y_loc``, ``y_log_diag``, ``y_off_diag``) and a reduced-resolution head with
    4 channels (``chroma_loc`` (Cb, Cr), ``chroma_log_scale`` (Cb, Cr)); see
    :meth:`head_channels` and :meth:`from_heads`.

    Args:
        y_loc, y_log_diag: (B, 1, H, W).  y_off_diag: (B, S, H, W).
        chroma_loc, chroma_log_scale: (B, 2, H/f, W/f), log of the standard deviation.
        stencil: the luminance stencil.  factor: chroma down-sampling factor f (default 4).
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 3)
    has_rsample = True

    def __init__(self, y_loc, y_log_diag, y_off_diag, chroma_loc, chroma_log_scale, stencil: Stencil,
                 factor: int = 4, validate_args=None):
        self.luma = StructuredNormal(y_loc, y_log_diag, y_off_diag, stencil, validate_args=validate_args)
        if y_loc.dim() != 4 or y_loc.shape[1] != 1:
            raise ValueError(f"y_loc: expected shape (B, 1, H, W), got {tuple(y_loc.shape)}")
        factor = _check_factor("y_loc", y_loc, factor)
        B, _, H, W = y_loc.shape
        low = (B, 2, H // factor, W // factor)
        for name, t in (("chroma_loc", chroma_loc), ("chroma_log_scale", chroma_log_scale)):
            _checks.check_float_tensor(name, t, "(B, 2, H/f, W/f)")
            _checks.check_same(name, t, "y_loc", y_loc, low, f"(B, 2, H/f, W/f) with f={factor}")
        self.chroma = Normal(chroma_loc, chroma_log_scale.exp(), validate_args=validate_args)
        self.stencil, self.factor = stencil, factor
        super().__init__(batch_shape=torch.Size([B]), event_shape=torch.Size([3, H, W]), validate_args=False)

    @staticmethod
    def head_channels(stencil: Stencil) -> tuple:
        """(full-resolution channels, reduced-resolution channels) the decoder must output."""
        return 2 + stencil.S, 4

    @classmethod
    def from_heads(cls, full_res: torch.Tensor, low_res: torch.Tensor, stencil: Stencil, factor: int = 4, *,
                   weight_bound=DEFAULT_WEIGHT_BOUND, validate_args=None):
        """Split decoder outputs (B, 2+S, H, W) (``y_loc``, ``y_log_diag``, raw ``y_off_diag``) and
        (B, 4, H/f, W/f) into the distribution. ``weight_bound`` (default 0.9) bounds the luminance
        weights as :meth:`StructuredNormal.from_head` does (:func:`structlik.bound_weights`);
        ``None`` takes them raw."""
        if weight_bound is not None:
            weight_bound = check_bound(weight_bound, "weight_bound")
        _checks.check_stencil(stencil)
        full, low = cls.head_channels(stencil)
        for name, t, channels, layout, size in (("full_res", full_res, full, "(B, 2+S, H, W)", "H, W"),
                                                ("low_res", low_res, low, "(B, 4, H/f, W/f)", "H/f, W/f")):
            _checks.check_float_tensor(name, t, layout)
            if t.shape[1] != channels:
                raise ValueError(f"{name}: expected shape {layout} = (B, {channels}, {size}) with S={stencil.S}, "
                                 f"got {tuple(t.shape)}")
        y_loc, y_log_diag, y_off_diag = full_res.split([1, 1, stencil.S], dim=1)
        chroma_loc, chroma_log_scale = low_res.split([2, 2], dim=1)
        if weight_bound is not None:
            y_off_diag = bound_weights(y_log_diag, y_off_diag, weight_bound)
        return cls(y_loc, y_log_diag, y_off_diag, chroma_loc, chroma_log_scale, stencil, factor,
                   validate_args=validate_args)

    def split(self, rgb: torch.Tensor):
        """RGB (*sample, B, 3, H, W) -> (Y (*sample, B, 1, H, W), downsampled CbCr
        (*sample, B, 2, H/f, W/f)); B may be 1 (broadcast over the batch)."""
        B, H, W = self.batch_shape[0], *self.event_shape[1:]
        layout = f"(*sample, B, 3, H, W) = (*, {B}, 3, {H}, {W})"
        _checks.check_float_tensor("rgb", rgb, layout, min_dim=4)
        if tuple(rgb.shape[-3:]) != (3, H, W) or rgb.shape[-4] not in (1, B):
            raise ValueError(f"rgb: expected shape {layout}, got {tuple(rgb.shape)}")
        lead = rgb.shape[:-3]
        ycbcr = rgb_to_ycbcr(rgb.reshape(-1, 3, H, W))
        chroma = downsample_chroma(ycbcr[:, 1:], self.factor)
        return ycbcr[:, :1].reshape(*lead, 1, H, W), chroma.reshape(*lead, *chroma.shape[-3:])

    def log_prob(self, rgb: torch.Tensor) -> torch.Tensor:
        """(*sample, B): the sum of the structured Y term and the two diagonal chroma terms
        (``log_prob(rsample((3,)))`` is (3, B), as torch.distributions)."""
        y, chroma = self.split(rgb)
        # NaN in rgb is named rgb (the luminance is computed from it); a luma replaced by another
        # distribution (the reference VAE's diagonal ablation) is asked as it is
        luma = (self.luma._log_prob(y, "rgb") if isinstance(self.luma, StructuredNormal)
                else self.luma.log_prob(y))
        return luma + self.chroma.log_prob(chroma).sum((-3, -2, -1))

    def _to_rgb(self, y, chroma):
        return ycbcr_to_rgb(torch.cat([y, upsample_chroma(chroma, self.factor)], dim=1))

    @property
    def mean(self) -> torch.Tensor:
        """RGB of the mean luminance and the mean chroma up-sampled (nearest)."""
        return self._to_rgb(self.luma.mean, self.chroma.mean)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """RGB samples, (*sample_shape, B, 3, H, W); chroma noise is up-sampled (nearest)."""
        sample_shape = torch.Size(sample_shape)
        y = self.luma.rsample(sample_shape)
        chroma = self.chroma.rsample(sample_shape)
        lead = sample_shape + self.batch_shape
        H, W = y.shape[-2:]
        rgb = self._to_rgb(y.reshape(-1, 1, H, W), chroma.reshape(-1, *chroma.shape[-3:]))
        return rgb.reshape(lead + (3, H, W))

    def expand(self, batch_shape, _instance=None):
        raise NotImplementedError("YCbCrStructuredNormal.expand: not supported (its batch is the images of the "
                                  "decoder's heads); build the distribution from expanded heads instead")

    def entropy(self) -> torch.Tensor:
        """(B,): entropy of (Y, downsampled Cb, Cr)."""
        return self.luma.entropy() + self.chroma.entropy().sum((1, 2, 3))

    def __repr__(self):
        return (f"YCbCrStructuredNormal(stencil={self.stencil!r}, factor={self.factor}, "
                f"batch_shape={tuple(self.batch_shape)})")

