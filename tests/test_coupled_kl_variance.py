"""Coupled channels (cross weights) where they meet the KL and the variances (issue #38 item 0,
#40): kl_divergence for every pair (StructuredNormal both ways, with and without cross weights on
either side, against Independent(Normal) both ways), ops.variance, .variance, .stddev and
.correlation, crossed with images and volumes, dilations, the learned basis, an image narrower than
the stencil, against torch's MultivariateNormal on the dense float64 M of tests/oracle.py."""
import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from oracle import dense_diagonal, dense_m, dense_normal
from structlik import Stencil, StructuredNormal, ops

TOL = dict(rtol=1e-10, atol=1e-10)

# (stencil, shape): images and volumes, dilations, C = 2..3, a row narrower than the stencil
CASES = [
    pytest.param(Stencil(1), (2, 2, 4, 3), id="r1-C2-4x3"),
    pytest.param(Stencil(2, (1, 2)), (1, 3, 3, 5), id="r2-d12-C3-3x5"),
    pytest.param(Stencil(2), (1, 2, 5, 1), id="r2-C2-5x1"),
    pytest.param(Stencil(1, ndim=3), (1, 2, 2, 3, 3), id="vol-r1-C2-2x3x3"),
]


def make(stencil, shape, cross=True, scale=0.3, requires_grad=False, basis=None):
    B, C = shape[:2]
    per = stencil.S if basis is None else basis.shape[1]
    loc = torch.randn(shape, dtype=torch.float64)
    ld = scale * torch.randn(shape, dtype=torch.float64)
    od = (scale / per ** 0.5) * torch.randn(B, C * per, *shape[2:], dtype=torch.float64)
    xi = scale * torch.randn(B, C * (C - 1) // 2, *shape[2:], dtype=torch.float64) if cross else None
    params = [t.requires_grad_() if requires_grad and t is not None else t for t in (loc, ld, od, xi)]
    return StructuredNormal(*params[:3], stencil, cross=params[3], basis=basis)


def diagonal(shape):
    return Independent(Normal(torch.randn(shape, dtype=torch.float64),
                              0.5 + torch.rand(shape, dtype=torch.float64)), len(shape) - 1)


@pytest.mark.parametrize("stencil, shape", CASES)
@pytest.mark.backends("reference", "cpu")
def test_kl_every_pair_matches_dense(stencil, shape, backend):
    wider = Stencil(2, ndim=stencil.ndim)
    coupled, other, plain = make(stencil, shape), make(wider, shape), make(stencil, shape, cross=False)
    for p, q in ((coupled, plain), (plain, coupled), (coupled, other), (other, coupled)):
        torch.testing.assert_close(kl_divergence(p, q), kl_divergence(dense_normal(p), dense_normal(q)), **TOL)
    # the silent number of issue #38: q is p without its cross weights
    same = StructuredNormal(coupled.loc, coupled.log_diag, coupled.off_diag, stencil)
    kl = kl_divergence(coupled, same)
    assert (kl > 1e-3).all()
    torch.testing.assert_close(kl, kl_divergence(dense_normal(coupled), dense_normal(same)), **TOL)
    torch.testing.assert_close(kl_divergence(coupled, coupled), torch.zeros(shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-10)
    diag = diagonal(shape)
    dd = dense_diagonal(diag.base_dist.loc, diag.base_dist.scale)
    torch.testing.assert_close(kl_divergence(coupled, diag), kl_divergence(dense_normal(coupled), dd), **TOL)
    torch.testing.assert_close(kl_divergence(diag, coupled), kl_divergence(dd, dense_normal(coupled)), **TOL)


@pytest.mark.backends("triton")
def test_kl_and_variance_on_triton():
    """The interpreted Triton kernels on one small coupled case (the ops are tested on it by op)."""
    stencil, shape = Stencil(1), (1, 2, 3, 2)
    p, q = make(stencil, shape), make(stencil, shape, cross=False)
    torch.testing.assert_close(kl_divergence(p, q), kl_divergence(dense_normal(p), dense_normal(q)), **TOL)
    sigma = torch.linalg.inv(dense_normal(p).precision_matrix)
    torch.testing.assert_close(p.variance.reshape(1, -1), sigma.diagonal(dim1=-2, dim2=-1), **TOL)


def test_kl_with_a_basis_and_broadcast_batches(backend):
    stencil, shape = Stencil(2), (1, 2, 4, 4)
    basis = 0.3 * torch.randn(stencil.S, 3, dtype=torch.float64)
    p = make(stencil, shape, basis=basis)
    q = make(stencil, (3, *shape[1:]))
    kl = kl_divergence(p, q)
    assert kl.shape == (3,)
    want = kl_divergence(dense_normal(p.expand((3,))), dense_normal(q))
    torch.testing.assert_close(kl, want, **TOL)


@pytest.mark.parametrize("stencil, shape", CASES)
@pytest.mark.backends("reference", "cpu")
def test_variance_stddev_correlation_match_dense(stencil, shape, backend):
    p = make(stencil, shape)
    B, C = shape[:2]
    sigma = torch.linalg.inv(dense_normal(p).precision_matrix)           # (B, C*n, C*n), channel-major
    var = sigma.diagonal(dim1=-2, dim2=-1).reshape(shape)
    torch.testing.assert_close(p.variance, var, **TOL)
    torch.testing.assert_close(p.stddev, var.sqrt(), **TOL)
    torch.testing.assert_close(ops.variance(p.log_diag, p.off_diag, stencil, p.cross), var, **TOL)
    index = tuple(s // 2 for s in shape[2:])
    n = torch.Size(shape[2:]).numel()
    at = torch.tensor(index) @ torch.tensor([torch.Size(shape[2 + k + 1:]).numel() for k in range(len(index))])
    # channel c of .correlation(index): Corr(x_{c,q}, x_{c,index})
    want = torch.stack([sigma[:, c * n + at, c * n:(c + 1) * n] for c in range(C)], 1).reshape(shape)
    want = want / (var.sqrt() * var.sqrt()[(..., *(slice(i, i + 1) for i in index))])
    torch.testing.assert_close(p.correlation(index), want, **TOL)
    # (c, *index): the whole column over every channel, cross-channel covariances included (#40)
    for c in range(C):
        column = sigma[:, c * n + at].reshape(shape)
        torch.testing.assert_close(p.covariance((c, *index)), column, **TOL)
        std = var.sqrt()
        ref = std[(..., slice(c, c + 1), *(slice(i, i + 1) for i in index))]
        torch.testing.assert_close(p.correlation((c, *index)), column / (std * ref), **TOL)
        assert C == 1 or bool(column[:, [j for j in range(C) if j != c]].abs().amax() > 1e-6)   # coupled: not zero


def test_covariance_column_of_uncoupled_channels_and_index_errors():
    """(c, y, x) of uncoupled channels: channel c's column, zero elsewhere; an index of the wrong
    length or outside the event names the index."""
    p = make(Stencil(1), (2, 2, 4, 3), cross=False)
    col = p.covariance((1, 2, 1))
    torch.testing.assert_close(col[:, 1], p.covariance((2, 1))[:, 1], **TOL)
    assert bool((col[:, 0] == 0).all())
    with pytest.raises(IndexError, match="index"):
        p.covariance((2, 0, 0))
    with pytest.raises(TypeError, match="index"):
        p.covariance((0, 0, 0, 0))


def test_gradients_through_cross_weights():
    """gradcheck of the KL and the variance in the cross weights (and log_diag), both sides."""
    stencil, shape = Stencil(1), (1, 2, 3, 2)
    p, q = make(stencil, shape, requires_grad=True), make(stencil, shape, requires_grad=True)

    def kl(p_ld, p_xi, q_xi):
        a = StructuredNormal(p.loc, p_ld, p.off_diag, stencil, cross=p_xi)
        b = StructuredNormal(q.loc, q.log_diag, q.off_diag, stencil, cross=q_xi)
        return kl_divergence(a, b), kl_divergence(b, a)
    torch.autograd.gradcheck(kl, (p.log_diag, p.cross, q.cross))
    torch.autograd.gradcheck(lambda ld, xi: ops.variance(ld, p.off_diag, stencil, xi), (p.log_diag, p.cross))
    # against autograd of the dense KL
    got = torch.autograd.grad(kl_divergence(p, q).sum(), (p.cross, q.cross, p.off_diag))
    Mp = dense_m(p.log_diag, p.off_diag, p.cross, stencil)
    Mq = dense_m(q.log_diag, q.off_diag, q.cross, stencil)
    mvn = torch.distributions.MultivariateNormal
    want_kl = kl_divergence(mvn(p.loc.reshape(1, -1), precision_matrix=Mp.mT @ Mp),
                            mvn(q.loc.reshape(1, -1), precision_matrix=Mq.mT @ Mq))
    want = torch.autograd.grad(want_kl.sum(), (p.cross, q.cross, p.off_diag))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_value_checks_name_the_cross_weights():
    stencil, shape = Stencil(1), (1, 2, 3, 3)
    p = make(stencil, shape)
    bad = p.cross.clone()
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="cross: contains NaN"):
        ops.variance(p.log_diag, p.off_diag, stencil, bad)
    with pytest.raises(ValueError, match="cross"):
        ops.variance(p.log_diag, p.off_diag, stencil, bad[:, :, :2])
    q = StructuredNormal(p.loc, p.log_diag, p.off_diag, stencil, cross=bad)
    with pytest.raises(ValueError, match="cross: contains NaN"):
        q.variance


def test_band_names_the_combination():
    p = make(Stencil(1), (1, 2, 3, 3))
    with pytest.raises(NotImplementedError, match="covariance_band: not implemented with cross weights"):
        p.covariance_band()


def _check_condition(p, mask, value):
    """The conditional of p (cross weights or not) against dense float64: mean, variance (0 where
    observed), entropy, log_prob, observed_log_prob, samples equal to value where observed."""
    c = p.condition(value, mask, tol=1e-13)
    mean, var, ent, observed = c.mean, c.variance, c.entropy(), c.observed_log_prob()
    x = torch.where(mask, value, value + 0.3)
    log_prob, sample = c.log_prob(x), c.sample((2,))
    lam = dense_normal(p).precision_matrix
    for b in range(p.batch_shape[0]):
        m, o = ~mask[b].reshape(-1), mask[b].reshape(-1)
        mu, v = p.loc[b].reshape(-1), value[b].reshape(-1)
        L = lam[b][m][:, m]
        want = mu[m] - torch.linalg.solve(L, lam[b][m][:, o] @ (v[o] - mu[o]))
        mvn = torch.distributions.MultivariateNormal(want, precision_matrix=L)
        torch.testing.assert_close(mean[b].reshape(-1)[m], want, **TOL)
        torch.testing.assert_close(var[b].reshape(-1)[m], mvn.covariance_matrix.diagonal(), **TOL)
        assert torch.equal(var[b].reshape(-1)[o], torch.zeros_like(v[o]))
        torch.testing.assert_close(ent[b], mvn.entropy(), **TOL)
        torch.testing.assert_close(log_prob[b], mvn.log_prob(x[b].reshape(-1)[m]), **TOL)
        marginal = torch.distributions.MultivariateNormal(mu[o], torch.linalg.inv(lam[b])[o][:, o])
        torch.testing.assert_close(observed[b], marginal.log_prob(v[o]), **TOL)
        assert torch.equal(sample[:, b].reshape(2, -1)[:, o], v[o].expand(2, -1))
    torch.testing.assert_close(c.stddev, var.sqrt())


@pytest.mark.parametrize("stencil, shape", CASES)
@pytest.mark.backends("reference", "cpu")
def test_condition_coupled_matches_dense(stencil, shape, backend):
    """Issue #40: condition() with cross weights, a mask per channel and pixel (one channel of a
    pixel observed, another missing)."""
    p = make(stencil, shape)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.5
    _check_condition(p, mask, torch.randn(shape, dtype=torch.float64))


@pytest.mark.backends("triton")
def test_condition_coupled_triton(backend):
    p = make(Stencil(1), (1, 2, 3, 3))
    mask = torch.rand(p.loc.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    _check_condition(p, mask, torch.randn(p.loc.shape, dtype=torch.float64))


@pytest.mark.backends("reference", "cpu")
def test_condition_coupled_gradients(backend):
    """The coupled conditional's mean, variance and log_prob differentiate in every parameter, cross
    weights included (gradcheck; second order of the variance)."""
    stencil, shape = Stencil(1), (1, 2, 3, 3)
    p = make(stencil, shape, requires_grad=True)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.5
    value = torch.randn(shape, dtype=torch.float64)

    def f(loc, ld, od, xi):
        c = StructuredNormal(loc, ld, od, stencil, cross=xi).condition(value, mask, tol=1e-13)
        return c.mean, c.variance, c.log_prob(value + 0.1)
    params = (p.loc, p.log_diag, p.off_diag, p.cross)
    assert torch.autograd.gradcheck(f, params)
    assert torch.autograd.gradgradcheck(lambda *a: f(*a)[1], params)
