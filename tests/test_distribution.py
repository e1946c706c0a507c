"""StructuredNormal behaves as a torch.distributions.Distribution."""
import math

import pytest
import torch
from torch.distributions import Distribution

from helpers import make_params
from structlik import Stencil, StructuredNormal, ops

ST = Stencil(1, (1, 2))


def dist(shape=(3, 2, 5, 4), **kw):
    return StructuredNormal(*make_params(shape, ST), ST, **kw)


def test_shapes_and_properties():
    d = dist()
    assert isinstance(d, Distribution)
    assert d.batch_shape == (3,) and d.event_shape == (2, 5, 4)
    assert d.has_rsample
    assert torch.equal(d.mean, d.loc) and torch.equal(d.mode, d.loc)
    assert d.sample().shape == (3, 2, 5, 4)
    assert d.rsample((7,)).shape == (7, 3, 2, 5, 4)
    assert d.sample(torch.Size([2, 4])).shape == (2, 4, 3, 2, 5, 4)
    assert d.log_prob(d.sample((6,))).shape == (6, 3)
    assert d.entropy().shape == (3,)


def test_entropy_matches_dense_mvn():
    d = dist()
    U = ops.to_dense_upper(d.log_diag, d.off_diag, ST)
    mvn = torch.distributions.MultivariateNormal(d.loc.reshape(3, 2, 20), precision_matrix=U.mT @ U)
    torch.testing.assert_close(d.entropy(), mvn.entropy().sum(-1), rtol=1e-12, atol=0)


def test_batch_dims_broadcast_and_expand():
    loc, log_diag, off_diag = make_params((1, 1, 3, 3), ST)
    shared_loc = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    d = StructuredNormal(shared_loc, log_diag[0], off_diag[0], ST)   # params without a batch dim
    assert d.batch_shape == (4,)
    x = d.sample()
    per_image = StructuredNormal(shared_loc, log_diag.expand(4, -1, -1, -1), off_diag.expand(4, -1, -1, -1), ST)
    torch.testing.assert_close(d.log_prob(x), per_image.log_prob(x))

    e = StructuredNormal(loc, log_diag, off_diag, ST).expand((2, 5))
    assert e.batch_shape == (2, 5) and e.sample().shape == (2, 5, 1, 3, 3)
    torch.testing.assert_close(e.log_prob(loc), StructuredNormal(loc, log_diag, off_diag, ST).log_prob(loc)
                               .expand(2, 5))


def test_log_prob_broadcasts_value_over_batch():
    d = dist()
    one_image = d.loc[0]
    assert d.log_prob(one_image).shape == (3,)


def test_validate_args_checks_support_and_can_be_switched_off():
    d = dist(validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.full((3, 2, 5, 4), float("nan"), dtype=torch.float64))
    quiet = dist(validate_args=False)
    assert torch.isnan(quiet.log_prob(torch.full((3, 2, 5, 4), float("nan"), dtype=torch.float64))).all()


def test_rsample_gradients_reach_every_parameter():
    loc, log_diag, off_diag = make_params((2, 1, 4, 4), ST, requires_grad=True)
    StructuredNormal(loc, log_diag, off_diag, ST).rsample((3,)).pow(2).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (loc, log_diag, off_diag))


def test_log_prob_of_mean_is_normaliser():
    d = dist()
    n = 2 * 5 * 4
    torch.testing.assert_close(d.log_prob(d.loc), d.log_diag.sum((1, 2, 3)) - 0.5 * n * math.log(2 * math.pi))


def test_precision_diagonal_method():
    d = dist()
    torch.testing.assert_close(d.precision_diagonal(), ops.precision_diagonal(d.log_diag, d.off_diag, ST))


def test_empty_batches_give_empty_results(backend):
    """B = 0 and sample_shape (0,) give empty tensors of the right shape, with gradients (zeros),
    as Normal.rsample((0,)) and F.gaussian_nll_loss do; the C++ solve divided by the empty batch."""
    from structlik import gamma_prior_log_prob, structured_gaussian_nll
    stencil = Stencil(1)
    loc, log_diag, off_diag = make_params((0, 2, 4, 5), stencil, requires_grad=True)
    x = torch.randn(0, 2, 4, 5, dtype=torch.float64)
    params = (loc, log_diag, off_diag)
    image_ops = [getattr(ops, n)(x, log_diag, off_diag, stencil)
                 for n in ("apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t")]
    dist = StructuredNormal(loc, log_diag, off_diag, stencil)
    results = {
        "nll": (ops.nll(x, loc, log_diag, off_diag, stencil), (0,)),
        "precision_diagonal": (ops.precision_diagonal(log_diag, off_diag, stencil), (0, 2, 4, 5)),
        "gamma_prior": (gamma_prior_log_prob(log_diag, off_diag, stencil, 2.0, 1.0), (0,)),
        "rsample": (dist.rsample((3,)), (3, 0, 2, 4, 5)),
        "log_prob": (dist.log_prob(x), (0,)),
        "entropy": (dist.entropy(), (0,)),
        "loss none": (structured_gaussian_nll(x, loc, log_diag, off_diag, stencil, reduction="none"), (0,)),
        "loss sum": (structured_gaussian_nll(x, loc, log_diag, off_diag, stencil, reduction="sum"), ()),
        **{f"image op {i}": (out, (0, 2, 4, 5)) for i, out in enumerate(image_ops)},
    }
    for name, (out, shape) in results.items():
        assert out.shape == shape, name
        for g in torch.autograd.grad(out.sum(), params, allow_unused=True):
            assert g is None or (g.shape[0] == 0), name
    assert structured_gaussian_nll(x, loc, log_diag, off_diag, stencil).isnan()     # the mean of nothing
    full = StructuredNormal(*make_params((2, 2, 4, 5), stencil, requires_grad=True), stencil)
    for sample_shape in ((0,), (0, 4)):
        sample = full.rsample(sample_shape)
        assert sample.shape == (*sample_shape, 2, 2, 4, 5)
        assert full.log_prob(sample).shape == (*sample_shape, 2)


def dense_sigma(d):
    U = ops.to_dense_upper(d.log_diag.reshape(-1, *d.event_shape), d.off_diag.reshape(-1, *d.off_diag.shape[-3:]),
                           d.stencil)
    return torch.linalg.inv(U.mT @ U).reshape(*d.batch_shape, d.event_shape[0], *U.shape[-2:])


@pytest.mark.backends("reference", "cpu")       # interpreted Triton: 78 s; its ops are tested by op
def test_variance_stddev_covariance_and_correlation_match_dense(backend):
    """Exact marginal variances, covariance columns and correlations against a dense float64 inverse,
    with a batch that broadcasts (two batch dims, a shared log_diag)."""
    loc, log_diag, off_diag = make_params((6, 2, 5, 4), ST)
    d = StructuredNormal(loc.reshape(2, 3, 2, 5, 4), log_diag[:1], off_diag.reshape(2, 3, -1, 5, 4), ST)
    sigma = dense_sigma(d)
    variance = torch.diagonal(sigma, dim1=-2, dim2=-1).reshape(d.batch_shape + d.event_shape)
    torch.testing.assert_close(d.variance, variance, rtol=1e-10, atol=0)
    torch.testing.assert_close(d.stddev, variance.sqrt(), rtol=1e-10, atol=0)
    for y, x in ((0, 0), (2, 3), (-1, -1)):
        p = (y % 5) * 4 + x % 4
        column = sigma[..., p].reshape(d.batch_shape + d.event_shape)
        torch.testing.assert_close(d.covariance((y, x)), column, rtol=1e-10, atol=1e-14)
        corr = column / (variance.sqrt() * variance.sqrt()[..., y % 5:y % 5 + 1, x % 4:x % 4 + 1])
        torch.testing.assert_close(d.correlation((y, x)), corr, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(d.correlation((1, 1))[..., 1, 1], torch.ones(2, 3, 2, dtype=torch.float64))


def test_variance_is_not_the_inverse_precision_diagonal():
    """1 / Lambda_pp is the variance of a pixel given all others: never above the marginal one."""
    d = dist()
    assert (1 / d.precision_diagonal() <= d.variance * (1 + 1e-12)).all()
    assert (1 / d.precision_diagonal() < 0.99 * d.variance).any()


def test_covariance_band_method_and_its_gradient():
    loc, log_diag, off_diag = make_params((2, 1, 4, 4), ST, requires_grad=True)
    d = StructuredNormal(loc, log_diag, off_diag, ST)
    band = d.covariance_band()
    torch.testing.assert_close(band, ops.covariance_band(log_diag, off_diag, ST))
    band.sum().backward()
    assert log_diag.grad.abs().sum() > 0 and off_diag.grad.abs().sum() > 0
    torch.autograd.gradcheck(lambda s: StructuredNormal(loc, s, off_diag, ST).stddev, (log_diag,))


def test_covariance_index_is_checked():
    d = dist()
    with pytest.raises(TypeError, match=r"index: expected a pixel \(y, x\)"):
        d.covariance(3)
    with pytest.raises(TypeError, match="index"):
        d.correlation((1.0, 2))
    with pytest.raises(IndexError, match=r"index: pixel \(5, 0\) is outside the \(H, W\) = \(5, 4\) image"):
        d.covariance((5, 0))
