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
