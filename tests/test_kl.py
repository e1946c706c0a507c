"""kl_divergence for StructuredNormal against StructuredNormal and a diagonal Gaussian, both ways,
against torch's MultivariateNormal on the dense matrices; gradients; errors."""
import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from helpers import make_params
from structlik import Stencil, StructuredNormal, ops

SHAPE = (2, 2, 5, 4)


def structured(stencil, shape=SHAPE, requires_grad=False):
    return StructuredNormal(*make_params(shape, stencil, requires_grad=requires_grad), stencil)


def dense(d):
    U = ops.to_dense_upper(d.log_diag.reshape(-1, *d.event_shape), d.off_diag.reshape(-1, *d.off_diag.shape[-3:]),
                           d.stencil)
    C, n = d.event_shape[0], d.event_shape[1:].numel()
    return MultivariateNormal(d.loc.reshape(*d.batch_shape, C, n),
                              precision_matrix=(U.mT @ U).reshape(*d.batch_shape, C, n, n))


def diagonal(shape=SHAPE):
    return Independent(Normal(torch.randn(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64) + 0.5), 3)


def dense_diagonal(q):
    B, C = q.batch_shape[0], q.event_shape[0]
    return MultivariateNormal(q.base_dist.loc.reshape(B, C, -1),
                              scale_tril=torch.diag_embed(q.base_dist.scale.reshape(B, C, -1)))


@pytest.mark.parametrize("p_stencil,q_stencil", [
    (Stencil(1), Stencil(1)), (Stencil(2), Stencil(1)), (Stencil(1), Stencil(2)), (Stencil(1, (1, 2)), Stencil(2))],
    ids=["same", "wider-p", "wider-q", "dilated-p"])
@pytest.mark.backends("reference", "cpu")       # made of ops tested on Triton by op (interpreted: 24 s)
def test_structured_against_structured_matches_dense(p_stencil, q_stencil, backend):
    p, q = structured(p_stencil), structured(q_stencil)
    expected = kl_divergence(dense(p), dense(q)).sum(-1)
    torch.testing.assert_close(kl_divergence(p, q), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-10)


def test_structured_against_diagonal_both_ways_match_dense(backend):
    p, q = structured(Stencil(2)), diagonal()
    torch.testing.assert_close(kl_divergence(p, q), kl_divergence(dense(p), dense_diagonal(q)).sum(-1), rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(kl_divergence(q, p), kl_divergence(dense_diagonal(q), dense(p)).sum(-1), rtol=1e-10,
                               atol=1e-10)


def test_batches_broadcast():
    p = structured(Stencil(1), (1, 1, 4, 4))
    q = structured(Stencil(1), (3, 1, 4, 4))
    kl = kl_divergence(p, q)
    assert kl.shape == (3,)
    torch.testing.assert_close(kl, kl_divergence(p.expand((3,)), q))


def test_gradients_reach_both_distributions():
    p, q = structured(Stencil(1), requires_grad=True), structured(Stencil(1), requires_grad=True)
    params = (p.loc, p.log_diag, p.off_diag, q.loc, q.log_diag, q.off_diag)
    grads = torch.autograd.grad(kl_divergence(p, q).sum(), params)
    assert all(g.abs().sum() > 0 for g in grads)
    torch.autograd.gradcheck(lambda s, w: kl_divergence(StructuredNormal(p.loc, s, w, Stencil(1)), q),
                             (p.log_diag, p.off_diag))


def test_other_diagonal_shapes_are_refused():
    p = structured(Stencil(1))
    with pytest.raises(NotImplementedError, match=r"Independent\(Normal\(loc, scale\), 3\)"):
        kl_divergence(p, Independent(Normal(torch.zeros(2, 2, 5, 4), torch.ones(2, 2, 5, 4)), 2))
    with pytest.raises(ValueError, match="event shapes"):
        kl_divergence(p, structured(Stencil(1), (2, 2, 4, 4)))
