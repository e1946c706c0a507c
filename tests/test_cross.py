"""Coupled channels (issue #26, docs/contract.md §1): the cross weights in every op and entry point,
against a dense float64 M built here from the formula, pixel by pixel:

  (M r)_{c,p} = d_{c,p} r_{c,p} + sum_i w_{c*S+i,p} r_{c,p+delta_i} + sum_{j>c} xi_{kappa(c,j),p} r_{j,p}

over the C*n unknowns in channel-major order c*n + p (supn_base's layout), kappa(c, j) =
c(2C-c-1)/2 + j-c-1. Nothing of structlik builds the matrix (not reference.to_dense_upper, which
is itself checked against it)."""
import math

import pytest
import torch

from helpers import assert_ops_match_dense, check_func_and_compile, check_shapes_everywhere, gradcheck, make_params
import structlik
from structlik import Stencil, StructuredNormal, backends, ops, reference, split_head, structured_gaussian_nll

LOG_2PI = math.log(2 * math.pi)


def dense_m(log_diag, off_diag, cross, stencil):
    """M of image b from the formula: (C*n, C*n), float64."""
    C, H, W = log_diag.shape[1:]
    n, S = H * W, stencil.S
    pairs = [(c, j) for c in range(C) for j in range(c + 1, C)]
    Ms = []
    for b in range(log_diag.shape[0]):
        M = torch.zeros(C * n, C * n, dtype=torch.float64)
        for c in range(C):
            for y in range(H):
                for x in range(W):
                    row = c * n + y * W + x
                    M[row, row] = log_diag[b, c, y, x].double().exp()
                    for i, (dy, dx) in enumerate(stencil.offsets):
                        if y + dy < H and 0 <= x + dx < W:
                            M[row, c * n + (y + dy) * W + x + dx] = off_diag[b, c * S + i, y, x].double()
        for k, (c, j) in enumerate(pairs):
            for p in range(n):
                M[c * n + p, j * n + p] = cross[b, k].reshape(-1)[p].double()
        Ms.append(M)
    return torch.stack(Ms)


def make_coupled(shape, stencil, scale=0.3, requires_grad=False):
    """(x, loc, log_diag, off_diag, cross), well conditioned, float64."""
    B, C, H, W = shape
    loc, log_diag, off_diag = make_params(shape, stencil, scale=scale)
    cross = scale * torch.randn(B, C * (C - 1) // 2, H, W, dtype=torch.float64)
    x = loc + torch.randn(shape, dtype=torch.float64)
    out = (x, loc, log_diag, off_diag, cross)
    return tuple(t.requires_grad_() for t in out) if requires_grad else out


def matvec(M, v):
    return torch.einsum("bij,bj->bi", M, v.reshape(v.shape[0], -1)).reshape(v.shape)


# C = 1..4, radius 1..4, odd shapes, a row and a column; the Triton interpreter gets a few of them.
CASES = [
    pytest.param(Stencil(1), (2, 2, 5, 3), id="r1-C2-5x3"),
    pytest.param(Stencil(2), (1, 3, 4, 5), id="r2-C3-4x5"),
    pytest.param(Stencil(3), (1, 4, 3, 7), id="r3-C4-3x7"),
    pytest.param(Stencil(4), (1, 2, 1, 9), id="r4-C2-1x9"),
    pytest.param(Stencil(2, (1, 3)), (2, 3, 7, 1), id="r2-d13-C3-7x1"),
    pytest.param(Stencil(1), (2, 1, 3, 3), id="r1-C1-3x3"),
]
INTERPRETED = {"r1-C2-5x3", "r3-C4-3x7"}     # (~16 ms per interpreted program: CI's time)


def _skip_interpreted(request, backend):
    if backend == "triton" and request.node.callspec.id.split("-", 1)[1] not in INTERPRETED:
        pytest.skip("one of the interpreted cases")


def test_reference_dense_is_the_formula():
    st = Stencil(2)
    _, _, ld, od, xi = make_coupled((2, 3, 3, 4), st)
    torch.testing.assert_close(reference.to_dense_upper(ld, od, st, xi), dense_m(ld, od, xi, st), rtol=0, atol=0)
    torch.testing.assert_close(ops.to_dense_upper(ld, od, st, xi), dense_m(ld, od, xi, st), rtol=0, atol=0)


@pytest.mark.parametrize("stencil, shape", CASES)
def test_every_op_matches_the_dense_formula(request, stencil, shape, backend):
    _skip_interpreted(request, backend)
    x, loc, ld, od, xi = make_coupled(shape, stencil)
    M = dense_m(ld, od, xi, stencil)
    B = shape[0]
    tol = dict(rtol=1e-10, atol=1e-10)
    assert_ops_match_dense(M, x, loc, ld, od, xi, stencil, tol)
    # a learned basis: the same NLL with the weights formed inside the kernel
    coeffs = torch.randn(B, shape[1] * 2, *shape[2:], dtype=torch.float64) * 0.2
    basis = torch.randn(stencil.S, 2, dtype=torch.float64) * 0.3
    Mb = dense_m(ld, reference.expand_basis(coeffs, basis), xi, stencil)
    expected_b = -torch.distributions.MultivariateNormal(loc.reshape(B, -1), precision_matrix=Mb.mT @ Mb).log_prob(
        x.reshape(B, -1))
    torch.testing.assert_close(ops.nll_basis(x, loc, ld, coeffs, basis, stencil, xi), expected_b, **tol)


@pytest.mark.parametrize("stencil, shape", CASES)
def test_nll_gradients_match_the_dense_formula(request, stencil, shape, backend):
    """The fused backward (every argument, the cross weights too) against autograd of the dense NLL."""
    _skip_interpreted(request, backend)
    x, loc, ld, od, xi = make_coupled(shape, stencil, requires_grad=True)
    got = torch.autograd.grad(ops.nll(x, loc, ld, od, stencil, xi).sum(), (x, loc, ld, od, xi), allow_unused=True)
    # the dense NLL, differentiable in every parameter
    B, C, H, W = shape
    Md = _dense_differentiable(ld, od, xi, stencil)
    u = matvec(Md, x - loc)
    expected_nll = 0.5 * u.square().sum((1, 2, 3)) - ld.sum((1, 2, 3)) + 0.5 * C * H * W * LOG_2PI
    want = torch.autograd.grad(expected_nll.sum(), (x, loc, ld, od, xi), allow_unused=True)
    for name, g, e in zip(("x", "loc", "log_diag", "off_diag", "cross"), got, want):
        if e is None:           # one channel: no cross weights to differentiate
            continue
        # off_diag entries pointing outside the image are not part of M: their gradient is 0 both ways
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


def _dense_differentiable(ld, od, xi, stencil):
    """dense_m as a differentiable function of the parameters (the same formula, as masks)."""
    fixed = [t.detach() for t in (ld, od, xi)]
    base = dense_m(*fixed, stencil)
    # M is linear in (exp(ld), od, xi): M = sum over parameters of parameter * dM/dparameter
    B, C, H, W = ld.shape
    n, S = H * W, stencil.S
    out = torch.diag_embed(ld.exp().reshape(B, -1))
    pattern_w = torch.zeros(C * S * n, C * n, C * n, dtype=torch.float64)
    for c in range(C):
        for y in range(H):
            for x in range(W):
                for i, (dy, dx) in enumerate(stencil.offsets):
                    if y + dy < H and 0 <= x + dx < W:
                        pattern_w[(c * S + i) * n + y * W + x, c * n + y * W + x, c * n + (y + dy) * W + x + dx] = 1
    out = out + torch.einsum("bk,kij->bij", od.reshape(B, -1), pattern_w)
    pairs = [(c, j) for c in range(C) for j in range(c + 1, C)]
    if pairs:
        pattern_x = torch.zeros(len(pairs) * n, C * n, C * n, dtype=torch.float64)
        for k, (c, j) in enumerate(pairs):
            for p in range(n):
                pattern_x[k * n + p, c * n + p, j * n + p] = 1
        out = out + torch.einsum("bk,kij->bij", xi.reshape(B, -1), pattern_x)
    torch.testing.assert_close(out.detach(), base, rtol=0, atol=0)
    return out


GRADCHECK_CASES = [pytest.param(Stencil(1), (1, 2, 3, 2), id="r1-C2-3x2"),
                   pytest.param(Stencil(1, (1, 2)), (2, 3, 2, 3), id="r1-d12-C3-2x3")]

IMAGE_OPS = ["apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t"]


@pytest.mark.parametrize("stencil, shape", GRADCHECK_CASES)
def test_gradcheck_every_op_in_every_argument(stencil, shape, backend):
    if backend == "triton" and shape[1] == 3:
        pytest.skip("the interpreted Triton run takes the two-channel case (27 s for this one)")
    x, loc, ld, od, xi = make_coupled(shape, stencil, requires_grad=True)
    for name in IMAGE_OPS:
        op = getattr(ops, name)
        gradcheck(lambda a, s, w, c: op(a, s, w, stencil, c), x, ld, od, xi, backend=backend)
    gradcheck(lambda s, w, c: ops.precision_diagonal(s, w, stencil, c), ld, od, xi, backend=backend)
    gradcheck(lambda *a: ops.nll(*a[:4], stencil, a[4]), x, loc, ld, od, xi, backend=backend)
    coeffs = (0.2 * torch.randn(shape[0], shape[1] * 2, *shape[2:], dtype=torch.float64)).requires_grad_()
    basis = (0.3 * torch.randn(stencil.S, 2, dtype=torch.float64)).requires_grad_()
    gradcheck(lambda m, s, c, bs, k: ops.nll_basis(x, m, s, c, bs, stencil, k), loc, ld, coeffs, basis, xi,
              backend=backend)


def test_gradgradcheck(backend):
    stencil, shape = Stencil(1), (1, 2, 3, 2)
    x, loc, ld, od, xi = make_coupled(shape, stencil, requires_grad=True)
    fast = backend == "triton"
    check = dict(eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)
    assert torch.autograd.gradgradcheck(lambda *a: ops.nll(*a[:4], stencil, a[4]), (x, loc, ld, od, xi), **check)
    assert torch.autograd.gradgradcheck(lambda *a: ops.solve_upper(*a[:3], stencil, a[3]), (x, ld, od, xi), **check)
    assert torch.autograd.gradgradcheck(lambda *a: ops.precision_diagonal(*a[:2], stencil, a[2]), (ld, od, xi),
                                        **check)


def test_head_read_in_place_matches_the_slices(backend):
    """A head [C, C, C*S, C(C-1)/2] split without a bound is read in place (nll_head, one gradient
    for the whole head); its gradient equals that of separate tensors."""
    stencil, C = Stencil(2), 3
    K = structlik.head_channels(stencil, C, cross=True)
    head = (0.2 * torch.randn(2, K + 2, 4, 5, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, C, 4, 5, dtype=torch.float64)
    parts = split_head(head[:, 1:K + 1], stencil, weight_bound=None, cross=True)
    assert ops.head_of(*parts[1:3], parts[2], parts[3]) is None            # (a wrong slice order is refused)
    assert ops.head_of(*parts) is not None
    loss = structured_gaussian_nll(x, *parts[:3], stencil, cross=parts[3], reduction="sum")
    grad, = torch.autograd.grad(loss, head)
    loose = [p.detach().clone().requires_grad_() for p in parts]
    loss_loose = structured_gaussian_nll(x, *loose[:3], stencil, cross=loose[3], reduction="sum")
    torch.testing.assert_close(loss, loss_loose)
    expected = torch.cat([torch.zeros_like(head[:, :1]), *torch.autograd.grad(loss_loose, loose),
                          torch.zeros_like(head[:, :1])], dim=1)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_from_head_bounds_every_row_of_m():
    """from_head(cross=True): sum_i |w| + sum_{j>c} |xi| < 0.9 d at every row, the cross weights
    last in the head (supn_base's order), and samples finite from a wild head."""
    stencil, C = Stencil(2), 3
    head = 10 * torch.randn(2, structlik.head_channels(stencil, C, cross=True), 6, 5, dtype=torch.float64)
    dist = StructuredNormal.from_head(head, stencil, cross=True)
    assert dist.cross.shape == (2, 3, 6, 5)
    row = dist.off_diag.unflatten(1, (C, stencil.S)).abs().sum(2)
    row = row.index_add(1, reference.cross_pairs(C)[0], dist.cross.abs())
    assert bool((row < 0.9 * dist.log_diag.exp()).all())
    torch.testing.assert_close(dist.loc, head[:, :C])
    assert torch.isfinite(dist.sample((8,))).all()
    with pytest.raises(ValueError, match=r"head: expected shape \(B, C\*\(2\+S\) \+ C\(C-1\)/2, H, W\)"):
        StructuredNormal.from_head(head[:, :-1], stencil, cross=True)


@pytest.mark.not_interpreted
def test_sample_covariance_matches_dense(backend):
    """Samples mu + M^-1 z have covariance (M^T M)^-1 within sampling error (z-score < 5 per entry)."""
    stencil, shape, N = Stencil(1), (1, 2, 3, 3), 20_000
    _, loc, ld, od, xi = make_coupled(shape, stencil, scale=0.5)
    M = dense_m(ld, od, xi, stencil)[0]
    sigma = torch.linalg.inv(M.mT @ M)
    torch.manual_seed(0)
    samples = StructuredNormal(loc, ld, od, stencil, cross=xi).sample((N,))
    r = (samples - loc).reshape(N, -1)
    empirical = r.T @ r / N
    se = ((sigma.diagonal()[:, None] * sigma.diagonal()[None, :] + sigma.square()) / N).sqrt()
    assert ((empirical - sigma).abs() / se).max() < 5.0
    # the coupling shows: the cross-channel block is not zero
    n = 9
    assert sigma[:n, n:].abs().max() > 10 * se[:n, n:].max()


@pytest.mark.backends("reference", "cpu")      # the ops it calls are checked on Triton above
def test_distribution_api(backend):
    stencil, shape = Stencil(1), (2, 3, 4, 3)
    x, loc, ld, od, xi = make_coupled(shape, stencil)
    dist = StructuredNormal(loc, ld, od, stencil, cross=xi)
    M = dense_m(ld, od, xi, stencil)
    mvn = torch.distributions.MultivariateNormal(loc.reshape(2, -1), precision_matrix=M.mT @ M)
    torch.testing.assert_close(dist.log_prob(x), mvn.log_prob(x.reshape(2, -1)))
    torch.testing.assert_close(dist.entropy(), mvn.entropy())
    torch.testing.assert_close(dist.precision_diagonal(), (M.mT @ M).diagonal(dim1=1, dim2=2).reshape(shape))
    sigma = torch.linalg.inv(M.mT @ M)
    col = dist.covariance((1, 2))
    n, p = 12, 1 * 3 + 2
    torch.testing.assert_close(col, torch.stack([sigma[:, c * n + p].reshape(2, 3, 4, 3)[:, c] for c in range(3)], 1))
    torch.manual_seed(3)
    z_dist = dist.rsample((2,))
    assert z_dist.shape == (2, *shape)
    big = dist.expand((4, 2))
    assert big.cross.shape == (4, 2, 3, 4, 3) and big.log_prob(x).shape == (4, 2)
    torch.testing.assert_close(big.log_prob(x)[3], dist.log_prob(x))
    torch.testing.assert_close(dist.variance, sigma.diagonal(dim1=1, dim2=2).reshape(shape))
    with pytest.raises(NotImplementedError, match="cross weights"):
        dist.covariance_band()


def test_rsample_is_reparameterised_through_the_cross_weights(backend):
    stencil, shape = Stencil(1), (1, 2, 2, 3)
    _, loc, ld, od, xi = make_coupled(shape, stencil, requires_grad=True)

    def sample(m, s, w, c):
        torch.manual_seed(7)
        return StructuredNormal(m, s, w, stencil, cross=c).rsample((2,))
    gradcheck(sample, loc, ld, od, xi, backend=backend)


def test_loss_module_and_unbatched(backend):
    stencil, shape = Stencil(1), (2, 2, 3, 4)
    x, loc, ld, od, xi = make_coupled(shape, stencil)
    per_image = structured_gaussian_nll(x, loc, ld, od, stencil, "none", cross=xi)
    torch.testing.assert_close(per_image, ops.nll(x, loc, ld, od, stencil, xi))
    module = structlik.StructuredGaussianNLLLoss(stencil)
    torch.testing.assert_close(module(x, loc, ld, od, cross=xi), per_image.mean())
    torch.testing.assert_close(structured_gaussian_nll(x[1], loc[1], ld[1], od[1], stencil, cross=xi[1]), per_image[1])


def test_value_checks_name_cross(backend):
    stencil, shape = Stencil(1), (2, 3, 3, 4)
    x, loc, ld, od, xi = make_coupled(shape, stencil)
    with pytest.raises(ValueError, match=r"cross: expected shape \(B, C\(C-1\)/2, H, W\) with C=3 = \(2, 3, 3, 4\)"):
        ops.nll(x, loc, ld, od, stencil, xi[:, :2])
    with pytest.raises(ValueError, match=r"cross: expected shape"):
        ops.solve_upper(x, ld, od, stencil, xi[:1, :, :2])
    with pytest.raises(TypeError, match="cross: expected a floating-point tensor"):
        ops.apply_upper(x, ld, od, stencil, xi.long())
    bad = xi.clone()
    bad[1, 2, 0, 3] = float("nan")
    for call in (lambda: ops.nll(x, loc, ld, od, stencil, bad), lambda: ops.apply_upper(x, ld, od, stencil, bad),
                 lambda: ops.solve_upper_t(x, ld, od, stencil, bad),
                 lambda: ops.precision_diagonal(ld, od, stencil, bad),
                 lambda: StructuredNormal(loc, ld, od, stencil, cross=bad).log_prob(x)):
        with pytest.raises(ValueError, match="cross: contains NaN"):
            call()
    with pytest.raises(ValueError, match=r"cross: expected shape \(\*batch, C\(C-1\)/2, H, W\)"):
        StructuredNormal(loc, ld, od, stencil, cross=xi[:, :1])


def test_one_channel_takes_an_empty_cross(backend):
    stencil, shape = Stencil(1), (2, 1, 3, 4)
    x, loc, ld, od, xi = make_coupled(shape, stencil)
    assert xi.shape == (2, 0, 3, 4)
    torch.testing.assert_close(ops.nll(x, loc, ld, od, stencil, xi), ops.nll(x, loc, ld, od, stencil))
    assert ops.to_dense_upper(ld, od, stencil, xi).shape == (2, 12, 12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, backend):
    """float16/bfloat16 inputs compute in float32: the NLL float32, the gradients (cross too) in the
    input dtype, equal to the float32 ones rounded once; the solve as float32 then cast."""
    stencil, shape = Stencil(1), (2, 2, 4, 5)
    values = make_coupled(shape, stencil)
    half = [t.to(dtype).requires_grad_(i > 0) for i, t in enumerate(values)]
    full = [t.to(dtype).float().requires_grad_(i > 0) for i, t in enumerate(values)]
    got = ops.nll(*half[:4], stencil, half[4])
    expected = ops.nll(*full[:4], stencil, full[4])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    for g, e in zip(torch.autograd.grad(got.sum(), half[1:]), torch.autograd.grad(expected.sum(), full[1:])):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e.to(dtype).float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-4)
    z = values[0].to(dtype)
    out = ops.solve_upper(z, *half[2:4], stencil, half[4])
    assert out.dtype == dtype
    want = ops.solve_upper(z.float(), *(t.detach().float() for t in half[2:4]), stencil, half[4].detach().float())
    torch.testing.assert_close(out.float(), want.to(dtype).float(), rtol=0, atol=0)


def _op_args(name, x, loc, ld, od, xi, offsets):
    if name in IMAGE_OPS:
        return (x, ld, od, offsets, xi)
    if name == "precision_diagonal":
        return (ld, od, offsets, xi)
    return (x, loc, ld, od, None, offsets, True, xi)         # nll


@pytest.mark.parametrize("name", IMAGE_OPS + ["precision_diagonal", "nll"])
def test_opcheck(name, backend):
    stencil = Stencil(1, (1, 2))
    shape = (1, 3, 3, 2) if backend == "triton" else (2, 3, 4, 3)      # interpreted: fewer programs
    for grad in (False, True):
        args = _op_args(name, *make_coupled(shape, stencil, requires_grad=grad), stencil.flat_offsets)
        with backends.using(backend):
            torch.library.opcheck(getattr(torch.ops.structlik, name), args)


def test_nll_head_opcheck(backend):
    stencil, C = Stencil(1), 2
    K = structlik.head_channels(stencil, C, cross=True)
    for grad in (False, True):
        head = (0.2 * torch.randn(2, K + 1, 3, 4, dtype=torch.float64)).requires_grad_(grad)
        x = torch.randn(2, C, 3, 4, dtype=torch.float64)
        with backends.using(backend):
            torch.library.opcheck(torch.ops.structlik.nll_head, (x, head, 1, stencil.flat_offsets, grad, True))


def test_torch_func_and_compile(backend):
    stencil, shape = Stencil(1), (3, 2, 3, 4)
    check_func_and_compile(*make_coupled(shape, stencil), stencil, argnum=3)     # the cross weights' gradient


def test_meta_tensors_with_cross_weights():
    """Shapes through every op and the distribution, validation on, on meta tensors."""
    assert torch.distributions.Distribution._validate_args
    stencil = Stencil(2)
    check_shapes_everywhere(*(t.to("meta") for t in make_coupled((2, 3, 5, 4), stencil)), stencil)


def test_fake_tensors_with_cross_weights(backend):
    """The same under FakeTensorMode (what torch.compile and torch.export trace with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    stencil = Stencil(2)
    real = make_coupled((2, 3, 5, 4), stencil)
    with FakeTensorMode() as mode:
        check_shapes_everywhere(*(mode.from_tensor(t) for t in real), stencil)
