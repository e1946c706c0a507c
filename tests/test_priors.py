"""The Gamma prior on the precision diagonal (eq. 13) and the variance minimiser (eq. 14)."""
import pytest
import torch

from helpers import make_params
from structlik import Stencil, gamma_prior_log_prob, ops, variance_minimiser, variance_weight


def test_gamma_prior_matches_dense_precision(backend):
    stencil = Stencil(1, (1, 2))
    _, log_diag, off_diag = make_params((2, 2, 5, 4), stencil, requires_grad=True)
    got = gamma_prior_log_prob(log_diag, off_diag, stencil, concentration=2.0, rate=0.5)
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    lam = torch.diagonal(U.mT @ U, dim1=-2, dim2=-1)
    expected = torch.distributions.Gamma(torch.tensor(2.0, dtype=torch.float64),
                                         torch.tensor(0.5, dtype=torch.float64)).log_prob(lam).sum((1, 2))
    torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(lambda s, w: gamma_prior_log_prob(s, w, stencil, 2.0, 0.5), (log_diag, off_diag),
                                    fast_mode=backend == "triton")    # the interpreter is slow


def test_gamma_prior_bad_parameters():
    stencil = Stencil(1)
    _, log_diag, off_diag = make_params((1, 1, 3, 3), stencil)
    with pytest.raises(ValueError, match="rate"):
        gamma_prior_log_prob(log_diag, off_diag, stencil, 1.0, 0.0)


def test_variance_minimiser_and_schedule():
    x, loc = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    per_image = 10.0 * (x - loc).square().sum((1, 2, 3))
    torch.testing.assert_close(variance_minimiser(x, loc, 10.0, reduction="none"), per_image)
    torch.testing.assert_close(variance_minimiser(x, loc, 10.0), per_image.mean())
    assert [variance_weight(e) for e in (0, 9, 10, 100)] == [5e3, 5e3, 10.0, 10.0]
    with pytest.raises(ValueError, match="loc"):
        variance_minimiser(x, loc[:, :, :2], 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_priors_of_half_inputs_are_float32(dtype):
    """Computed and returned in float32 (the issue: float16 -inf and bfloat16 650 nats off at
    128x128, log_diag ~ 3; the variance minimiser at alpha = 5e3 and 64x64 inf in float16)."""
    stencil = Stencil(1)
    torch.manual_seed(1)
    log_diag = (3 + 0.1 * torch.randn(1, 1, 128, 128)).to(dtype).requires_grad_()
    off_diag = (0.01 * torch.randn(1, stencil.S, 128, 128)).to(dtype).requires_grad_()
    got = gamma_prior_log_prob(log_diag, off_diag, stencil, 1.5, 1e-4)
    expected = gamma_prior_log_prob(log_diag.double(), off_diag.double(), stencil, 1.5, 1e-4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    got.sum().backward()
    assert log_diag.grad.dtype == dtype and torch.isfinite(log_diag.grad).all()
    x, loc = torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64)
    got = variance_minimiser(x.to(dtype), loc.to(dtype), 5e3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), variance_minimiser(x.to(dtype).double(), loc.to(dtype).double(), 5e3),
                               rtol=1e-6, atol=0)


def test_gamma_prior_beyond_the_dtype_of_d_squared(backend):
    """float16 d^2 overflows past log_diag 5.55, float32 past 44.4: the prior stays exact
    (-inf where the true value does not fit float32, never NaN), its gradient too."""
    stencil = Stencil(1)
    zeros = torch.zeros(1, stencil.S, 3, 3)
    high = torch.full((1, 1, 3, 3), 6.0, dtype=torch.float16)
    torch.testing.assert_close(gamma_prior_log_prob(high, zeros.half(), stencil, 1.5, 1.0),
                               gamma_prior_log_prob(high.float(), zeros, stencil, 1.5, 1.0))
    assert gamma_prior_log_prob(torch.full((1, 1, 3, 3), 45.0), zeros, stencil, 2.0, 1.0).item() == -float("inf")
    low = torch.full((1, 1, 3, 3), -45.0, requires_grad=True)
    got = gamma_prior_log_prob(low, zeros, stencil, 2.0, 1.0)
    got.backward()      # d/ds [(a - 1) 2s - rate e^{2s}] = 2 (a - 1) - 2 rate e^{-90}
    torch.testing.assert_close(got, torch.tensor([9 * (-90.0 - 1e-39)]))
    torch.testing.assert_close(low.grad, torch.full_like(low, 2.0), rtol=0, atol=0)
