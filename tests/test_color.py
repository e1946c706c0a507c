"""YCbCr colour (paper section 4.1)."""
import math

import pytest
import torch

from helpers import make_params
from structlik import Stencil, StructuredNormal, YCbCrStructuredNormal
from structlik.color import downsample_chroma, rgb_to_ycbcr, upsample_chroma, ycbcr_to_rgb


def test_known_colours():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64).view(3, 3, 1, 1)
    ycc = rgb_to_ycbcr(rgb).view(3, 3)
    torch.testing.assert_close(ycc[0], torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64))   # white: no chroma
    torch.testing.assert_close(ycc[1], torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))
    # JPEG's red: Y = 0.299, Cb = 0.5 - 0.168736, Cr = 1.0
    torch.testing.assert_close(ycc[2], torch.tensor([0.299, 0.331264, 1.0], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_round_trip(dtype, tol):
    rgb = torch.rand(4, 3, 8, 6, dtype=dtype)
    torch.testing.assert_close(ycbcr_to_rgb(rgb_to_ycbcr(rgb)), rgb, atol=tol, rtol=0)


def test_chroma_resampling():
    c = torch.rand(2, 2, 8, 12)
    low = downsample_chroma(c, 4)
    assert low.shape == (2, 2, 2, 3)
    torch.testing.assert_close(low[0, 0, 0, 0], c[0, 0, :4, :4].mean())
    torch.testing.assert_close(downsample_chroma(upsample_chroma(low, 4), 4), low)
    with pytest.raises(ValueError, match="divisible by factor=5"):
        downsample_chroma(c, 5)


def _dist(B=2, H=8, W=8, factor=4, stencil=Stencil(1)):
    y_loc, y_log_diag, y_off = make_params((B, 1, H, W), stencil)
    c_loc = 0.5 + 0.1 * torch.randn(B, 2, H // factor, W // factor, dtype=torch.float64)
    c_log_scale = -2 + 0.1 * torch.randn(B, 2, H // factor, W // factor, dtype=torch.float64)
    return YCbCrStructuredNormal(y_loc, y_log_diag, y_off, c_loc, c_log_scale, stencil, factor)


def test_log_prob_is_the_sum_of_its_three_parts():
    dist = _dist()
    rgb = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    ycc = rgb_to_ycbcr(rgb)
    y, cb, cr = ycc[:, :1], ycc[:, 1:2], ycc[:, 2:]
    luma = StructuredNormal(dist.luma.loc, dist.luma.log_diag, dist.luma.off_diag, dist.stencil).log_prob(y)
    expected = luma.clone()
    for ch, channel in enumerate((cb, cr)):
        low = torch.nn.functional.avg_pool2d(channel, 4)
        mu, sigma = dist.chroma.loc[:, ch:ch + 1], dist.chroma.scale[:, ch:ch + 1]
        by_hand = -0.5 * ((low - mu) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi)
        expected = expected + by_hand.sum((1, 2, 3))
    torch.testing.assert_close(dist.log_prob(rgb), expected)


def test_sampling_shapes_and_statistics():
    torch.manual_seed(0)
    dist = _dist(B=1, H=4, W=4, factor=2)
    samples = dist.rsample((4000,))
    assert samples.shape == (4000, 1, 3, 4, 4) and dist.mean.shape == (1, 3, 4, 4)
    torch.testing.assert_close(samples.mean(0), dist.mean, atol=0.15, rtol=0)   # luminance sd ~ 1, 4000 draws
    ycc = rgb_to_ycbcr(samples.reshape(-1, 3, 4, 4))
    chroma = downsample_chroma(ycc[:, 1:], 2)
    # nearest up-sampling then block averaging returns the low-resolution chroma sample exactly
    sd = chroma.std(0)
    torch.testing.assert_close(sd, dist.chroma.scale[0], rtol=0.1, atol=0)


def test_heads_and_errors():
    stencil = Stencil(2)
    full, low = YCbCrStructuredNormal.head_channels(stencil)
    assert (full, low) == (2 + stencil.S, 4)
    dist = YCbCrStructuredNormal.from_heads(torch.zeros(2, full, 16, 16), torch.zeros(2, low, 4, 4), stencil)
    assert dist.rsample().shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"chroma_loc: expected shape \(B, 2, H/f, W/f\)"):
        YCbCrStructuredNormal.from_heads(torch.zeros(2, full, 16, 16), torch.zeros(2, low, 8, 8), stencil)
    with pytest.raises(ValueError, match=r"rgb: expected shape \(\*sample, B, 3, H, W\)"):
        dist.log_prob(torch.zeros(2, 1, 16, 16))


def test_log_prob_of_many_samples_is_sample_by_batch():
    """torch's convention: log_prob(rsample((3,))) is (3, B), each the log_prob of one sample."""
    dist = _dist()
    samples = dist.rsample((3,))
    got = dist.log_prob(samples)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, torch.stack([dist.log_prob(s) for s in samples]))
    assert dist.log_prob(samples[:, :1]).shape == (3, 2)         # one image broadcast over the batch


def test_rgb_is_named_and_numpy_factors_are_integers():
    """NaN in rgb names rgb (not the internal luminance value), a wrong shape names rgb with the
    RGB shape; a numpy integer factor is an integer."""
    import numpy as np
    dist = _dist()
    with pytest.raises(ValueError, match="^rgb: contains NaN"):
        dist.log_prob(torch.full((2, 3, 8, 8), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^rgb: expected shape \(\*sample, B, 3, H, W\) = \(\*, 2, 3, 8, 8\), "
                                         r"got \(2, 3, 8, 9\)"):
        dist.log_prob(torch.rand(2, 3, 8, 9, dtype=torch.float64))
    assert dist.log_prob(torch.rand(2, 3, 8, 8, dtype=torch.float64)).shape == (2,)
    B, H, S = 2, 8, Stencil(1).S
    numpy_factor = YCbCrStructuredNormal(torch.zeros(B, 1, H, H), torch.zeros(B, 1, H, H), torch.zeros(B, S, H, H),
                                         torch.zeros(B, 2, 2, 2), torch.zeros(B, 2, 2, 2), Stencil(1),
                                         factor=np.int64(4))
    assert numpy_factor.factor == 4 and type(numpy_factor.factor) is int
    assert downsample_chroma(torch.rand(1, 2, 8, 8), np.int64(4)).shape == (1, 2, 2, 2)
