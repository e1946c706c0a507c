"""Issue #43: StructuredNormal with low-rank modes, Sigma = W W^T + (M^T M)^-1 (cov_factor W), against
the dense float64 Gaussian of tests/oracle.py (Sigma formed densely, no Woodbury), crossed with cross
weights, volumes, dilations, the basis, shapes narrower than the stencil, ranks 1..8, on every backend."""
import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from helpers import make_params
from oracle import dense_diagonal, dense_normal
from structlik import Stencil, StructuredNormal, head_channels, reference, split_head

TOL = dict(rtol=1e-10, atol=1e-10)

# (stencil, shape, rank, cross, basis columns): every kind of model, ranks 1..8
CASES = [
    pytest.param(Stencil(1), (2, 2, 4, 3), 3, False, 0, id="r1-C2-4x3-R3"),
    pytest.param(Stencil(2, (1, 2)), (1, 3, 3, 5), 1, True, 0, id="r2-d12-C3-3x5-R1-cross"),
    pytest.param(Stencil(2), (2, 1, 5, 1), 8, False, 0, id="r2-C1-5x1-R8"),
    pytest.param(Stencil(1, ndim=3), (1, 2, 2, 3, 3), 2, True, 0, id="vol-r1-C2-2x3x3-R2-cross"),
    pytest.param(Stencil(2), (1, 2, 3, 4), 4, False, 3, id="r2-C2-3x4-R4-basis"),
]
SMALL = [CASES[0], CASES[3]]          # the Triton interpreter's cases: an image and a coupled volume


def make(stencil, shape, rank, cross=False, n_basis=0, scale=0.3, requires_grad=False):
    B, C = shape[:2]
    g = lambda *s, k=1.0: k * torch.randn(*s, dtype=torch.float64)      # noqa: E731
    basis = g(stencil.S, n_basis, k=0.5) if n_basis else None
    per = n_basis or stencil.S
    params = [g(*shape), g(*shape, k=scale), g(B, C * per, *shape[2:], k=scale / per ** 0.5),
              g(B, C * (C - 1) // 2, *shape[2:], k=scale) if cross else None,
              g(B, rank, *shape[1:], k=0.5) if rank else None]
    if requires_grad:
        params = [p.requires_grad_() if p is not None else p for p in params]
    return StructuredNormal(*params[:3], stencil, cross=params[3], cov_factor=params[4], basis=basis)


def flat_index(shape, channel, at):
    n = math.prod(shape[2:])
    return channel * n + sum(i * math.prod(shape[3 + k:]) for k, i in enumerate(at))


@pytest.mark.parametrize("stencil, shape, rank, cross, n_basis", CASES)
@pytest.mark.backends("reference", "cpu")
def test_every_method_matches_dense(stencil, shape, rank, cross, n_basis, backend):
    check_every_method(stencil, shape, rank, cross, n_basis)


@pytest.mark.parametrize("stencil, shape, rank, cross, n_basis", SMALL)
@pytest.mark.backends("triton")
def test_every_method_matches_dense_triton(stencil, shape, rank, cross, n_basis, backend):
    check_every_method(stencil, shape, rank, cross, n_basis)


def check_every_method(stencil, shape, rank, cross, n_basis):
    p = make(stencil, shape, rank, cross, n_basis)
    dense = dense_normal(p)
    x = torch.randn(3, *shape, dtype=torch.float64)                 # (*sample, *batch, *event)
    torch.testing.assert_close(p.log_prob(x), dense.log_prob(x.flatten(-len(shape) + 1)), **TOL)
    torch.testing.assert_close(p.entropy(), dense.entropy(), **TOL)
    assert (p.entropy() > p._structured_part().entropy() + 1e-3).all()      # the modes add entropy
    torch.testing.assert_close(p.variance.flatten(1), dense.variance, **TOL)
    torch.testing.assert_close(p.stddev.flatten(1), dense.stddev, **TOL)
    torch.testing.assert_close(p.precision_diagonal().flatten(1),
                               dense.precision_matrix.diagonal(dim1=-2, dim2=-1), **TOL)
    at = tuple(s - 1 for s in shape[2:])
    C = shape[1]
    for channel in range(C):
        col = dense.covariance_matrix[:, :, flat_index(shape, channel, at)]
        torch.testing.assert_close(p.covariance((channel, *at)).flatten(1), col, **TOL)
        corr = col / (dense.stddev * dense.stddev[:, flat_index(shape, channel, at), None])
        torch.testing.assert_close(p.correlation((channel, *at)).flatten(1), corr, **TOL)
    # a pixel alone: channel c's own column at that pixel
    own = p.covariance(at).flatten(2)
    for channel in range(C):
        col = dense.covariance_matrix[:, :, flat_index(shape, channel, at)].unflatten(1, (C, -1))[:, channel]
        torch.testing.assert_close(own[:, channel], col, **TOL)
    if not cross:
        band = p.covariance_band()
        n = math.prod(shape[2:])
        L = band.shape[1] // C
        for c in range(C):
            cov = dense.covariance_matrix[:, c * n:(c + 1) * n, c * n:(c + 1) * n]
            for k in range(min(L, n)):
                torch.testing.assert_close(band[:, c * L + k].flatten(1)[:, :n - k], cov.diagonal(k, -2, -1), **TOL)


@pytest.mark.parametrize("stencil, shape, rank, cross, n_basis", CASES)
@pytest.mark.backends("reference", "cpu")
def test_kl_every_pair_matches_dense(stencil, shape, rank, cross, n_basis, backend):
    p, q = make(stencil, shape, rank, cross, n_basis), make(stencil, shape, max(1, rank // 2), cross, n_basis)
    base = make(Stencil(1, ndim=stencil.ndim), shape, 0, cross)        # another stencil, no modes
    diag = Independent(Normal(torch.randn(shape, dtype=torch.float64), 0.5 + torch.rand(shape, dtype=torch.float64)),
                       len(shape) - 1)
    dd = dense_diagonal(diag.base_dist.loc, diag.base_dist.scale)
    for a, b in ((p, q), (q, p), (p, base), (base, p), (p, diag), (diag, p)):
        da = dd if a is diag else dense_normal(a)
        db = dd if b is diag else dense_normal(b)
        torch.testing.assert_close(kl_divergence(a, b), kl_divergence(da, db), **TOL)
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(shape[0], dtype=torch.float64), rtol=0, atol=1e-10)
    # the modes count: q is p without them
    assert (kl_divergence(p, p._structured_part()) > 1e-3).all()


@pytest.mark.parametrize("stencil, shape, rank, cross, n_basis", CASES[:2] + CASES[3:4])
@pytest.mark.backends("reference", "cpu")
def test_rsample_has_the_covariance(stencil, shape, rank, cross, n_basis, backend):
    p = make(stencil, shape, rank, cross, n_basis)
    n = 40000
    s = p.rsample((n,))
    assert s.shape == (n, *shape)
    cov = torch.cov(s[:, 0].reshape(n, -1).T)
    want = dense_normal(p).covariance_matrix[0]
    # standard error of a sample covariance: sqrt((S_ii S_jj + S_ij^2) / n)
    se = ((want.diagonal()[:, None] * want.diagonal()[None] + want ** 2) / n).sqrt()
    assert ((cov - want).abs() < 5 * se + 1e-3).all()


@pytest.mark.parametrize("stencil, shape, rank, cross, n_basis", [CASES[1], CASES[3], CASES[4]])
@pytest.mark.backends("reference", "cpu")
def test_gradients_in_every_argument(stencil, shape, rank, cross, n_basis, backend):
    """log_prob, entropy, variance, covariance and KL differentiable in every argument, cov_factor too,
    and twice (log_prob)."""
    p = make(stencil, (1, *shape[1:]), rank, cross, n_basis, requires_grad=True)
    args = [t for t in (p.loc, p.log_diag, p._off_diag, p.cross, p.cov_factor) if t is not None]
    x = torch.randn(p.loc.shape, dtype=torch.float64)
    at = tuple(s - 1 for s in shape[2:])

    def rebuilt(*ts):
        t = iter(ts)
        loc, ld, od = next(t), next(t), next(t)
        xi = next(t) if p.cross is not None else None
        return StructuredNormal(loc, ld, od, stencil, cross=xi, cov_factor=next(t), basis=p.basis)

    q = rebuilt(*(t.detach() * 0.9 for t in args))             # fixed: gradcheck perturbs only d

    def every(*ts):
        d = rebuilt(*ts)
        torch.manual_seed(1)                       # the same draw on every call of gradcheck
        return (d.log_prob(x), d.entropy(), d.variance, d.covariance((0, *at)), kl_divergence(d, q),
                kl_divergence(q, d), d.precision_diagonal(), d.rsample())
    # fast mode: a random projection of each Jacobian (the full one took 122 s at C3 3x5)
    assert torch.autograd.gradcheck(every, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda *ts: rebuilt(*ts).log_prob(x), args, fast_mode=True)


@pytest.mark.backends("reference", "cpu", "triton")
def test_rsample_is_reparameterised(backend):
    """d sample / d cov_factor = eps_1: the sample's gradient reaches W."""
    p = make(Stencil(1), (1, 1, 2, 3), 2, requires_grad=True)
    torch.manual_seed(3)
    s = p.rsample((4,))
    (g,) = torch.autograd.grad(s.sum(), p.cov_factor)
    assert g.abs().sum() > 0
    torch.manual_seed(3)
    again = p.rsample((4,))
    assert torch.equal(s, again)


@pytest.mark.backends("reference", "cpu")
def test_func_and_compile(backend):
    p = make(Stencil(1), (2, 2, 3, 4), 2)
    x = torch.randn(p.loc.shape, dtype=torch.float64)

    def f(W):
        return StructuredNormal(p.loc, p.log_diag, p.off_diag, p.stencil, cov_factor=W).log_prob(x).sum()
    eager = torch.func.grad(f)(p.cov_factor)
    W = p.cov_factor.clone().requires_grad_()
    (want,) = torch.autograd.grad(f(W), W)
    torch.testing.assert_close(eager, want, **TOL)
    per_image = torch.func.vmap(lambda w, xx, l, ld, od: StructuredNormal(
        l[None], ld[None], od[None], p.stencil, cov_factor=w[None]).log_prob(xx[None])[0])(
        p.cov_factor, x, p.loc, p.log_diag, p.off_diag)
    torch.testing.assert_close(per_image, p.log_prob(x), **TOL)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(p.cov_factor), f(p.cov_factor), **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    p = make(Stencil(1), (2, 1, 4, 4), 2)
    x = torch.randn(p.loc.shape, dtype=torch.float64)
    half = StructuredNormal(*(t.to(dtype) for t in (p.loc, p.log_diag, p.off_diag)), p.stencil,
                            cov_factor=p.cov_factor.to(dtype))
    got = half.log_prob(x.to(dtype))
    assert got.dtype == torch.float32
    want = StructuredNormal(*(t.to(dtype).float() for t in (p.loc, p.log_diag, p.off_diag)), p.stencil,
                            cov_factor=p.cov_factor.to(dtype).float()).log_prob(x.to(dtype).float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_from_head_order_and_head_channels():
    stencil, C, R = Stencil(1), 2, 3
    K = head_channels(stencil, C, rank=R)
    assert K == C * (2 + stencil.S) + R * C
    head = torch.randn(2, K, 4, 5, dtype=torch.float64)
    d = StructuredNormal.from_head(head, stencil, rank=R)
    assert d.cov_factor.shape == (2, R, C, 4, 5)
    assert torch.equal(d.cov_factor[:, 1, 0], head[:, C * (2 + stencil.S) + 1 * C + 0])   # channel r*C + c
    assert d.cov_factor.data_ptr() == head[:, C * (2 + stencil.S)].data_ptr()               # a view
    plain = StructuredNormal.from_head(head[:, :C * (2 + stencil.S)], stencil)
    torch.testing.assert_close(d._structured_part().log_prob(head[:, :C]), plain.log_prob(head[:, :C]))
    coupled = StructuredNormal.from_head(torch.randn(1, head_channels(stencil, 3, cross=True, rank=2), 3, 3),
                                         stencil, cross=True, rank=2)
    assert coupled.cross.shape == (1, 3, 3, 3) and coupled.cov_factor.shape == (1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"head: expected .*head_channels\(stencil, C, cross=False, rank=3\)"):
        StructuredNormal.from_head(head[:, :-1], stencil, rank=R)
    # split_head gives the same parts, the modes last; one split (the head's gradient in one piece)
    leaf = head.clone().requires_grad_()
    loc, log_diag, off_diag, modes = split_head(leaf, stencil, weight_bound=None, rank=R)
    assert modes.shape == (2, R, C, 4, 5) and torch.equal(modes, d.cov_factor)
    assert torch.equal(off_diag, head[:, 2 * C:C * (2 + stencil.S)])
    split = loc.grad_fn
    assert type(split).__name__.startswith("SplitWithSizes") and split.next_functions[0][0].variable is leaf
    assert log_diag.grad_fn is split and off_diag.grad_fn is split
    with pytest.raises(ValueError, match="rank: expected an integer"):
        StructuredNormal.from_head(head, stencil, rank=-1)


def test_value_checks_name_cov_factor():
    p = make(Stencil(1), (2, 2, 3, 4), 2)
    args = (p.loc, p.log_diag, p.off_diag, p.stencil)
    with pytest.raises(ValueError, match=r"cov_factor: expected shape \(\*batch, R, C, H, W\)"):
        StructuredNormal(*args, cov_factor=torch.randn(2, 2, 3, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="cov_factor"):
        StructuredNormal(*args, cov_factor=torch.randn(2, 0, 2, 3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="cov_factor"):
        StructuredNormal(*args, cov_factor=[1.0])
    with pytest.raises(ValueError, match="cov_factor.*do not broadcast"):
        StructuredNormal(*args, cov_factor=torch.randn(3, 2, 2, 3, 4, dtype=torch.float64))
    bad = p.cov_factor.clone()
    bad[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="cov_factor"):
        StructuredNormal(*args, cov_factor=bad).log_prob(p.loc)
    half = torch.rand(p.loc.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    with pytest.raises(ValueError, match="cov_factor"):
        StructuredNormal(*args, cov_factor=bad).condition(p.loc, half).mean


def test_batch_broadcasting_and_expand():
    p = make(Stencil(1), (1, 1, 3, 3), 2)
    W = torch.randn(4, 2, 1, 3, 3, dtype=torch.float64)          # the modes carry the batch
    d = StructuredNormal(p.loc[0], p.log_diag[0], p.off_diag[0], p.stencil, cov_factor=W)
    assert d.batch_shape == (4,)
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    e = d.expand((2, 4))
    assert e.cov_factor.shape == (2, 4, 2, 1, 3, 3)
    torch.testing.assert_close(e.log_prob(x.expand(2, 4, 1, 3, 3))[1], d.log_prob(x))
    dense = [MultivariateNormal(torch.zeros(9, dtype=torch.float64), covariance_matrix=dense_normal(
        StructuredNormal(p.loc, p.log_diag, p.off_diag, p.stencil, cov_factor=W[b:b + 1])).covariance_matrix[0])
        for b in range(4)]
    torch.testing.assert_close(d.variance.flatten(1), torch.stack([m.variance for m in dense]), **TOL)


@pytest.mark.parametrize("name", ["apply_upper", "apply_upper_t"])
@pytest.mark.backends("reference", "cpu", "triton")
def test_opcheck_image_ops_with_repeated_parameters(name, backend):
    """The modes' columns go through the image ops as R*B images over B images' parameters: the ops
    (every backend's kernel, fake kernel and autograd formula) take that layout."""
    stencil = Stencil(1)
    image, log_diag, off_diag = make_params((2, 1, 3, 4), stencil)
    images = torch.randn(6, 1, 3, 4, dtype=torch.float64)
    want = torch.stack([getattr(reference, name)(images[k:k + 1], log_diag[k % 2:k % 2 + 1],
                                                 off_diag[k % 2:k % 2 + 1], stencil)[0] for k in range(6)])
    for grad in (False, True):
        args = [t.clone().requires_grad_(grad) for t in (images, log_diag, off_diag)]
        op = getattr(torch.ops.structlik, name)
        torch.library.opcheck(op, (*args, stencil.flat_offsets))
        torch.testing.assert_close(op(*args, stencil.flat_offsets), want, **TOL)


# --- condition(value, mask) with the modes: the latent coordinates conditioned too (conditional.py) ---

def dense_conditional(p, x, mask, b):
    """Image b's x_M | x_O from the dense Sigma: (M, O, mean, covariance, observed MultivariateNormal)."""
    d = dense_normal(p)
    S, mu, xv = d.covariance_matrix[b], d.loc[b], x[b].flatten()
    observed = mask[b].flatten()
    M, O = (~observed).nonzero().flatten(), observed.nonzero().flatten()
    gain = S[M][:, O] @ torch.linalg.inv(S[O][:, O]) if len(O) else S.new_zeros(len(M), 0)
    mean = mu[M] + gain @ (xv[O] - mu[O])
    cov = S[M][:, M] - gain @ S[O][:, M]
    return M, O, mean, cov, log_density(mu[O], S[O][:, O], xv[O])


def log_density(mean, cov, at):
    """log N(at; mean, cov), 0 over no pixels."""
    return MultivariateNormal(mean, cov).log_prob(at).item() if len(mean) else 0.0


def check_condition(stencil, shape, rank, cross, n_basis, tol=1e-8):
    p = make(stencil, shape, rank, cross, n_basis)
    g = torch.Generator().manual_seed(1)
    x = p.loc.detach() + torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) < 0.5               # a mask per channel and pixel
    c = p.condition(x, mask)
    point = torch.where(mask, x, x + 0.3)
    mean, variance, log_det = c.mean, c.variance, c.log_det_missing()
    lp, entropy, observed = c.log_prob(point), c.entropy(), c.observed_log_prob()
    for b in range(shape[0]):
        M, O, want_mean, cov, marginal = dense_conditional(p, x, mask, b)
        torch.testing.assert_close(mean[b].flatten()[M], want_mean, rtol=0, atol=tol)
        assert torch.equal(mean[b].flatten()[O], x[b].flatten()[O])
        torch.testing.assert_close(variance[b].flatten()[M], cov.diagonal(), rtol=0, atol=tol)
        assert torch.equal(variance[b].flatten()[O], torch.zeros(len(O), dtype=torch.float64))
        assert log_det[b].item() == pytest.approx(-torch.logdet(cov).item() if len(M) else 0.0, abs=tol)
        assert lp[b].item() == pytest.approx(log_density(want_mean, cov, point[b].flatten()[M]), abs=tol)
        want_entropy = MultivariateNormal(want_mean, cov).entropy().item() if len(M) else 0.0
        assert entropy[b].item() == pytest.approx(want_entropy, abs=tol)
        assert observed[b].item() == pytest.approx(marginal, abs=tol)
    # the modes change the answer: the structured conditional alone is another one
    plain = p._structured_part().condition(x, mask)
    assert (plain.variance - variance).abs().max() > 1e-3
    return p, x, mask, c


@pytest.mark.parametrize("stencil, shape, rank, cross, n_basis", CASES)
@pytest.mark.backends("reference", "cpu")
def test_condition_matches_dense(stencil, shape, rank, cross, n_basis, backend):
    check_condition(stencil, shape, rank, cross, n_basis)


@pytest.mark.backends("triton")
def test_condition_matches_dense_triton(backend):
    check_condition(Stencil(1), (1, 1, 3, 3), 2, False, 0)


@pytest.mark.backends("reference", "cpu")
def test_condition_samples_have_the_dense_covariance(backend):
    p, x, mask, c = check_condition(Stencil(1), (1, 2, 3, 3), 2, True, 0)
    n = 20000
    s = c.rsample((n,))
    assert torch.equal(s[:, mask], x[mask].expand(n, -1))       # observed pixels exactly
    M, _, mean, cov, _ = dense_conditional(p, x, mask, 0)
    plane = s[:, 0].flatten(1)[:, M]
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov ** 2) / n).sqrt()
    assert ((torch.cov(plane.T) - cov).abs() / se).max() < 5           # 5 standard errors
    assert ((plane.mean(0) - mean).abs() / (cov.diagonal() / n).sqrt()).max() < 5


@pytest.mark.backends("reference", "cpu")
def test_condition_gradients_and_torch_features(backend):
    """mean, a reparameterised sample and the likelihoods differentiable in every parameter, the
    modes included (gradcheck through the iterations); the mean twice (gradgradcheck), under
    torch.func.grad and torch.compile."""
    stencil, shape = Stencil(1), (1, 1, 3, 3)
    p = make(stencil, shape, 2, requires_grad=True)
    mask = torch.ones(shape, dtype=torch.bool)
    mask[..., 1, :2] = False
    x = (p.loc.detach() + torch.randn(shape, dtype=torch.float64)).requires_grad_()
    point = torch.where(mask, x.detach(), x.detach() + 0.3)

    def cond(loc, ld, od, W, value):
        return StructuredNormal(loc, ld, od, stencil, cov_factor=W).condition(value, mask, tol=1e-13)

    def sample(*a):
        torch.manual_seed(3)
        return cond(*a).rsample((2,))
    inputs = (p.loc, p.log_diag, p.off_diag, p.cov_factor, x)
    assert torch.autograd.gradcheck(lambda *a: cond(*a).mean, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(sample, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: cond(*a).log_prob(point), inputs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: cond(*a).observed_log_prob(), inputs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: cond(*a).variance, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda od, W: cond(p.loc, p.log_diag, od, W, x).mean,
                                        (p.off_diag, p.cov_factor), fast_mode=True)
    mean = lambda od, W: cond(p.loc, p.log_diag, od, W, x).mean.sum()     # noqa: E731
    expected = torch.autograd.grad(mean(p.off_diag, p.cov_factor), (p.off_diag, p.cov_factor))
    for got, e in zip(torch.func.grad(mean, argnums=(0, 1))(p.off_diag, p.cov_factor), expected):
        torch.testing.assert_close(got, e)
    compiled = torch.compile(mean, backend="aot_eager")
    torch.testing.assert_close(compiled(p.off_diag, p.cov_factor), mean(p.off_diag, p.cov_factor))


def test_condition_half_inputs_compute_in_float32():
    p = make(Stencil(1), (2, 1, 4, 4), 2)
    x = p.loc.detach() + torch.randn(p.loc.shape, dtype=torch.float64)
    mask = torch.rand(p.loc.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    half = [t.half() for t in (p.loc, p.log_diag, p.off_diag, p.cov_factor, x)]
    got = StructuredNormal(*half[:3], p.stencil, cov_factor=half[3]).condition(half[4], mask)
    want = StructuredNormal(*(t.float() for t in half[:3]), p.stencil, cov_factor=half[3].float()).condition(
        half[4].float(), mask)
    assert got.mean.dtype == torch.float16 and got.log_prob(half[4]).dtype == torch.float16
    torch.testing.assert_close(got.mean.float(), want.mean, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.variance.float(), want.variance, rtol=2e-3, atol=2e-3)


def test_condition_forms_the_modes_once_per_call(monkeypatch):
    """With gradients (nothing cached) log_prob and observed_log_prob form the conditioned modes (two
    conjugate-gradient solves) once, not once for the mean, once for the log-determinant and again."""
    from structlik import ConditionalStructuredNormal
    p = make(Stencil(1), (1, 1, 3, 4), 2, requires_grad=True)
    mask = torch.rand(p.loc.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    x = p.loc.detach() + 0.1
    calls = []
    original = ConditionalStructuredNormal._modes
    monkeypatch.setattr(ConditionalStructuredNormal, "_modes", lambda self: calls.append(1) or original(self))
    for method in (lambda c: c.log_prob(x), lambda c: c.observed_log_prob(), lambda c: c.entropy()):
        calls.clear()
        method(p.condition(x, mask)).sum().backward()
        assert len(calls) == 1
