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
