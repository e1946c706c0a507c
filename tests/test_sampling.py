"""Samples have the right mean and covariance (Sigma = (U^T U)^-1), within sampling error."""
import pytest
import torch
from hypothesis import given

from helpers import gradcheck, gradcheck_problems, make_params
from structlik import Stencil, StructuredNormal, ops

N_SAMPLES = 20_000
# A z-score of 5 is exceeded by one Gaussian estimate with probability 5.7e-7;
# over the 210 distinct covariance entries of a 20-pixel image, by any of them
# with probability < 1.2e-4. The seed is fixed, so the test is deterministic,
# and a wrong convention (U vs U^T, a misplaced offset) shifts entries by many
# standard errors.
Z_MAX = 5.0


@pytest.mark.not_interpreted     # 20,000 planes = 20,000 interpreted programs; the solves are checked elsewhere
@pytest.mark.parametrize("stencil", [Stencil(1), Stencil(1, (1, 2))], ids=["r1", "r1-d12"])
def test_sample_mean_and_covariance_match_dense(stencil, backend):
    shape = (1, 1, 4, 5)
    loc, log_diag, off_diag = make_params(shape, stencil, scale=0.5)
    U = ops.to_dense_upper(log_diag, off_diag, stencil)[0, 0]
    sigma = torch.linalg.inv(U.mT @ U)

    x = StructuredNormal(loc, log_diag, off_diag, stencil).sample((N_SAMPLES,))
    assert x.shape == (N_SAMPLES, *shape)
    r = (x - loc).reshape(N_SAMPLES, 20)

    mean_se = (sigma.diagonal() / N_SAMPLES).sqrt()
    assert (r.mean(0).abs() / mean_se).max() < Z_MAX

    # E[r r^T] = Sigma; for a Gaussian, Var[r_i r_j] = Sigma_ii Sigma_jj + Sigma_ij^2.
    empirical = r.T @ r / N_SAMPLES
    cov_se = ((sigma.diagonal()[:, None] * sigma.diagonal()[None, :] + sigma.square()) / N_SAMPLES).sqrt()
    z_scores = (empirical - sigma).abs() / cov_se
    assert z_scores.max() < Z_MAX, f"max z-score {z_scores.max():.2f}"


def test_samples_differ_and_sample_has_no_grad():
    stencil = Stencil(1)
    loc, log_diag, off_diag = make_params((2, 1, 3, 3), stencil, requires_grad=True)
    dist = StructuredNormal(loc, log_diag, off_diag, stencil)
    a, b = dist.sample(), dist.sample()
    assert not torch.equal(a, b)
    assert not a.requires_grad
    assert dist.rsample().requires_grad


@pytest.mark.not_interpreted
@given(problem=gradcheck_problems())
def test_gradcheck_rsample(problem, backend):
    """Reparameterised sampling: the gradient reaches loc, log_diag and off_diag."""
    stencil, shape = problem
    loc, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)

    def sample(m, s, w):
        torch.manual_seed(1234)     # the same z in every evaluation
        return StructuredNormal(m, s, w, stencil).rsample((2,))

    gradcheck(sample, loc, log_diag, off_diag, backend=backend)
    sample(loc, log_diag, off_diag).square().sum().backward()
    assert loc.grad.abs().sum() > 0 and log_diag.grad.abs().sum() > 0
    H, W = shape[2:]
    some_weight_used = any(dy < H and abs(dx) < W for dy, dx in stencil.offsets)
    assert (off_diag.grad.abs().sum() > 0) == some_weight_used
