"""Volumes (issue #27, docs/contract.md §1, §3): (B, C, D, H, W) tensors and ``Stencil(k, ndim=3)``
in every op and entry point, against a dense float64 M built here from the formula, voxel by voxel:

  (M r)_{c,p} = d_{c,p} r_{c,p} + sum_i w_{c*S+i,p} r_{c,p+delta_i} + sum_{j>c} xi_{kappa(c,j),p} r_{j,p}

with p = (z, y, x) in raster order z*H*W + y*W + x and p + delta_i = (z+dz, y+dy, x+dx) taken only
inside the volume (never across a slice boundary, where the tall view's flat neighbour is another
voxel). Nothing of structlik builds the matrix; ``reference.to_dense_upper`` is checked against it."""
import math

import pytest
import torch

from oracle import dense_m
from helpers import assert_ops_match_dense, check_func_and_compile, check_shapes_everywhere, gradcheck
import structlik
from structlik import Stencil, StructuredNormal, backends, ops, reference, structured_gaussian_nll

LOG_2PI = math.log(2 * math.pi)


def make_volume(shape, stencil, scale=0.3, requires_grad=False, cross=True):
    """(x, loc, log_diag, off_diag, cross or None), well conditioned, float64."""
    B, C = shape[:2]
    loc = torch.randn(shape, dtype=torch.float64)
    log_diag = scale * torch.randn(shape, dtype=torch.float64)
    off_diag = (scale / stencil.S ** 0.5) * torch.randn(B, C * stencil.S, *shape[2:], dtype=torch.float64)
    xi = scale * torch.randn(B, C * (C - 1) // 2, *shape[2:], dtype=torch.float64) if cross and C > 1 else None
    x = loc + torch.randn(shape, dtype=torch.float64)
    out = (x, loc, log_diag, off_diag, xi)
    return tuple(t.requires_grad_() if t is not None and requires_grad else t for t in out)


def matvec(M, v):
    return torch.einsum("bij,bj->bi", M, v.reshape(v.shape[0], -1)).reshape(v.shape)


def dense_nll(x, loc, M, log_diag):
    u = matvec(M, x - loc)
    n = x[0].numel()
    return 0.5 * u.flatten(1).square().sum(1) - log_diag.flatten(1).sum(1) + 0.5 * n * LOG_2PI


def test_stencil_order_is_supn_bases():
    """(0, 0, 1..k), then (0, dy, dx) dy = 1..k, dx = -k..k, then (dz, dy, dx) dz = 1..k, dy, dx = -k..k."""
    st = Stencil(1, ndim=3)
    assert st.S == 13 and Stencil(2, ndim=3).S == 62 and Stencil(3, ndim=3).S == 171
    assert st.offsets[:4] == ((0, 0, 1), (0, 1, -1), (0, 1, 0), (0, 1, 1))
    assert st.offsets[4:] == tuple((1, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    k = 2
    expected = [(0, 0, j) for j in range(1, k + 1)]
    expected += [(0, dy, dx) for dy in range(1, k + 1) for dx in range(-k, k + 1)]
    expected += [(dz, dy, dx) for dz in range(1, k + 1) for dy in range(-k, k + 1) for dx in range(-k, k + 1)]
    assert Stencil(k, ndim=3).offsets == tuple(expected)
    dilated = Stencil(1, (1, 2), ndim=3)
    assert dilated.S == 26 and dilated.offsets[13:16] == ((0, 0, 2), (0, 2, -2), (0, 2, 0))
    assert (st.wavefront_slope, st.depth_slope) == (2, 4)        # 4*(D-1) + 2*(H-1) + W steps
    assert Stencil(1) != st and "ndim=3" in repr(st)
    with pytest.raises(ValueError, match="ndim must be 2"):
        Stencil(1, ndim=4)
    with pytest.raises(ValueError, match="op_offsets"):
        st.flat_offsets


def test_reference_dense_is_the_formula():
    st = Stencil(2, ndim=3)
    _, _, ld, od, xi = make_volume((2, 2, 3, 2, 4), st)
    torch.testing.assert_close(ops.to_dense_upper(ld, od, st, xi), dense_m(ld, od, xi, st), rtol=0, atol=0)


# odd shapes, D, H or W of 1, C = 1..3 (coupled), radius 1-2 and a dilation; the interpreter gets two
CASES = [
    pytest.param(Stencil(1, ndim=3), (2, 2, 3, 4, 5), id="r1-C2-3x4x5"),
    pytest.param(Stencil(2, ndim=3), (1, 1, 3, 2, 4), id="r2-C1-3x2x4"),
    pytest.param(Stencil(1, ndim=3), (1, 3, 4, 1, 3), id="r1-C3-4x1x3"),
    pytest.param(Stencil(1, ndim=3), (2, 1, 1, 3, 3), id="r1-C1-1x3x3"),
    pytest.param(Stencil(2, ndim=3), (1, 2, 2, 3, 1), id="r2-C2-2x3x1"),
    pytest.param(Stencil(1, (1, 2), ndim=3), (1, 1, 5, 3, 4), id="r1-d12-C1-5x3x4"),
    pytest.param(Stencil(1, ndim=3), (1, 1, 1, 1, 1), id="r1-C1-1x1x1"),
]
INTERPRETED = {"r1-C2-3x4x5", "r2-C1-3x2x4"}


def _skip_interpreted(request, backend):
    if backend == "triton" and request.node.callspec.id.split("-", 1)[1] not in INTERPRETED:
        pytest.skip("one of the interpreted cases")


@pytest.mark.parametrize("stencil, shape", CASES)
def test_every_op_matches_the_dense_formula(request, stencil, shape, backend):
    _skip_interpreted(request, backend)
    x, loc, ld, od, xi = make_volume(shape, stencil)
    M = dense_m(ld, od, xi, stencil)
    B = shape[0]
    tol = dict(rtol=1e-10, atol=1e-10)
    assert_ops_match_dense(M, x, loc, ld, od, xi, stencil, tol)
    coeffs = torch.randn(B, shape[1] * 2, *shape[2:], dtype=torch.float64) * 0.2
    basis = torch.randn(stencil.S, 2, dtype=torch.float64) * 0.3
    Mb = dense_m(ld, reference.expand_basis(coeffs, basis), xi, stencil)
    expected_b = -torch.distributions.MultivariateNormal(loc.reshape(B, -1), precision_matrix=Mb.mT @ Mb).log_prob(
        x.reshape(B, -1))
    torch.testing.assert_close(ops.nll_basis(x, loc, ld, coeffs, basis, stencil, xi), expected_b, **tol)
    # the variances and the band, k = 0..b with b = the largest flat offset dz*H*W + dy*W + dx
    Mu = dense_m(ld, od, None, stencil)
    sigma = torch.linalg.inv(Mu.mT @ Mu)
    C, n = shape[1], math.prod(shape[2:])
    D, H, W = shape[2:]
    L = max(dz * H * W + dy * W + dx for dz, dy, dx in stencil.offsets) + 1
    band = ops.covariance_band(ld, od, stencil)
    assert band.shape == (B, C * L, *shape[2:])
    want = torch.zeros(B, C, L, n, dtype=torch.float64)
    for c in range(C):
        blk = sigma[:, c * n:(c + 1) * n, c * n:(c + 1) * n]
        for k in range(min(L, n)):
            want[:, c, k, :n - k] = blk.diagonal(offset=k, dim1=1, dim2=2)
    torch.testing.assert_close(band.reshape(B, C, L, n), want, **tol)
    torch.testing.assert_close(ops.variance(ld, od, stencil), want[:, :, 0].reshape(shape), **tol)


@pytest.mark.parametrize("stencil, shape", CASES)
def test_nll_gradients_match_the_dense_formula(request, stencil, shape, backend):
    _skip_interpreted(request, backend)
    x, loc, ld, od, xi = make_volume(shape, stencil, requires_grad=True)
    args = (x, loc, ld, od) + ((xi,) if xi is not None else ())
    got = torch.autograd.grad(ops.nll(x, loc, ld, od, stencil, xi).sum(), args)
    want = torch.autograd.grad(dense_nll(x, loc, dense_m(ld, od, xi, stencil), ld).sum(), args)
    for name, g, e in zip(("x", "loc", "log_diag", "off_diag", "cross"), got, want):
        # weights pointing outside the volume (across a slice boundary too) are not part of M: 0 both ways
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


def test_band_gradient_matches_the_dense_formula(backend):
    stencil, shape = Stencil(1, ndim=3), (1, 1, 2, 3, 3)
    _, _, ld, od, _ = make_volume(shape, stencil, requires_grad=True, cross=False)
    band = ops.covariance_band(ld, od, stencil)
    G = torch.randn_like(band)
    got = torch.autograd.grad((band * G).sum(), (ld, od))
    M = dense_m(ld, od, None, stencil)[0]
    sigma = torch.linalg.inv(M.mT @ M)
    L = band.shape[1]
    flat = torch.stack([torch.nn.functional.pad(sigma.diagonal(offset=k), (0, k)) for k in range(L)])
    want = torch.autograd.grad((flat.reshape(band.shape) * G).sum(), (ld, od))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


GRADCHECK_CASES = [pytest.param(Stencil(1, ndim=3), (1, 2, 2, 2, 2), id="r1-C2-2x2x2"),
                   pytest.param(Stencil(1, ndim=3), (2, 1, 3, 1, 2), id="r1-C1-3x1x2")]
IMAGE_OPS = ["apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t"]


@pytest.mark.parametrize("stencil, shape", GRADCHECK_CASES)
def test_gradcheck_every_op_in_every_argument(stencil, shape, backend):
    if backend == "triton" and shape[1] == 1:
        pytest.skip("the interpreted Triton run takes the coupled case")
    x, loc, ld, od, xi = make_volume(shape, stencil, requires_grad=True)
    for name in IMAGE_OPS:
        op = getattr(ops, name)
        gradcheck(lambda a, s, w, *c: op(a, s, w, stencil, *c), x, ld, od, *([xi] if xi is not None else []),
                  backend=backend)
    gradcheck(lambda *a: ops.nll(*a[:4], stencil, *a[4:]), x, loc, ld, od, *([xi] if xi is not None else []),
              backend=backend)
    if backend != "triton":       # interpreted: their kernels' gradients are checked on images (and above, dense)
        gradcheck(lambda s, w: ops.precision_diagonal(s, w, stencil), ld, od, backend=backend)
        gradcheck(lambda s, w: ops.variance(s, w, stencil), ld, od, backend=backend)


def test_gradgradcheck(backend):
    stencil, shape = Stencil(1, ndim=3), (1, 2, 2, 2, 1)
    x, loc, ld, od, xi = make_volume(shape, stencil, requires_grad=True)
    check = dict(eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=backend == "triton")
    assert torch.autograd.gradgradcheck(lambda *a: ops.nll(*a[:4], stencil, a[4]), (x, loc, ld, od, xi), **check)
    if backend != "triton":       # interpreted, the solve's second order takes 90 s; it is checked on images there
        assert torch.autograd.gradgradcheck(lambda *a: ops.solve_upper(*a[:3], stencil, a[3]), (x, ld, od, xi),
                                            **check)


def _op_args(name, x, loc, ld, od, xi, offsets):
    fold = (lambda t: t if t is None else t.flatten(2, 3))
    x, loc, ld, od, xi = (fold(t) for t in (x, loc, ld, od, xi))
    if name in IMAGE_OPS:
        return (x, ld, od, offsets, xi)
    if name == "precision_diagonal":
        return (ld, od, offsets, xi)
    if name == "weight_grad":
        return (x, loc, offsets, x.shape[0])
    if name == "covariance_band":
        return (ld, od, offsets, False)
    return (x, loc, ld, od, None, offsets, True, xi)         # nll


@pytest.mark.parametrize("name", IMAGE_OPS + ["precision_diagonal", "nll", "weight_grad", "covariance_band"])
def test_opcheck(name, backend):
    """The ops see a volume as its (B, K, D*H, W) view with offsets [-H, dz, dy, dx, ...]."""
    stencil = Stencil(1, ndim=3)
    shape = (1, 2, 2, 2, 3) if backend == "triton" else (2, 2, 3, 2, 3)
    if backend == "triton" and name == "covariance_band":
        shape = (1, 1, 2, 2, 2)           # interpreted: one plane
    for grad in (False, True):
        values = make_volume(shape, stencil, requires_grad=grad)
        args = _op_args(name, *values, stencil.op_offsets(shape[3]))
        with backends.using(backend):
            torch.library.opcheck(getattr(torch.ops.structlik, name), args)


def test_torch_func_and_compile(backend):
    stencil, shape = Stencil(1, ndim=3), (3, 2, 2, 3, 2)
    check_func_and_compile(*make_volume(shape, stencil), stencil, argnum=2)     # off_diag's gradient


def test_meta_tensors():
    assert torch.distributions.Distribution._validate_args
    stencil = Stencil(1, ndim=3)
    check_shapes_everywhere(*(t.to("meta") for t in make_volume((2, 2, 3, 4, 2), stencil)), stencil)


def test_fake_tensors(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode
    stencil = Stencil(1, ndim=3)
    real = make_volume((2, 2, 3, 4, 2), stencil)
    with FakeTensorMode() as mode:
        check_shapes_everywhere(*(mode.from_tensor(t) for t in real), stencil)


@pytest.mark.backends("reference", "cpu")      # the ops it calls are checked on Triton above
def test_distribution_api(backend):
    stencil, shape = Stencil(1, ndim=3), (2, 2, 2, 3, 2)
    x, loc, ld, od, xi = make_volume(shape, stencil)
    dist = StructuredNormal(loc, ld, od, stencil, cross=xi)
    assert dist.event_shape == shape[1:]
    M = dense_m(ld, od, xi, stencil)
    mvn = torch.distributions.MultivariateNormal(loc.reshape(2, -1), precision_matrix=M.mT @ M)
    torch.testing.assert_close(dist.log_prob(x), mvn.log_prob(x.reshape(2, -1)))
    torch.testing.assert_close(dist.log_prob(x[None].expand(3, *shape)), mvn.log_prob(x.reshape(2, -1)).expand(3, 2))
    torch.testing.assert_close(dist.entropy(), mvn.entropy())
    sigma = torch.linalg.inv(M.mT @ M)
    n, p = 12, (1 * 3 + 2) * 2 + 1
    col = dist.covariance((1, 2, 1))
    torch.testing.assert_close(col, torch.stack([sigma[:, c * n + p].reshape(shape)[:, c] for c in range(2)], 1))
    big = dist.expand((4, 2))
    assert big.log_prob(x).shape == (4, 2)
    torch.testing.assert_close(big.log_prob(x)[3], dist.log_prob(x))
    # rsample is loc + M^-1 z, reparameterised
    torch.manual_seed(5)
    sample = dist.rsample((3,))
    torch.manual_seed(5)
    z = structlik.distribution.standard_normal((3, *shape), torch.float64, "cpu")
    torch.testing.assert_close(sample, loc + ops.solve_upper(z.reshape(6, *shape[1:]), ld.repeat(3, 1, 1, 1, 1),
                                                             od.repeat(3, 1, 1, 1, 1), stencil,
                                                             xi.repeat(3, 1, 1, 1, 1)).reshape(3, *shape))
    plain = StructuredNormal(loc, ld, od, stencil)
    Mu = dense_m(ld, od, None, stencil)
    su = torch.linalg.inv(Mu.mT @ Mu)
    torch.testing.assert_close(plain.variance, su.diagonal(dim1=1, dim2=2).reshape(shape))
    torch.testing.assert_close(plain.correlation((0, 0, 0))[:, :, 0, 0, 0], torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(IndexError, match="outside"):
        plain.covariance((2, 0, 0))
    with pytest.raises(TypeError, match=r"\(z, y, x\)"):
        plain.covariance((0, 0))


@pytest.mark.not_interpreted
def test_sample_covariance_matches_dense(backend):
    """Samples mu + M^-1 z have covariance (M^T M)^-1 within sampling error (z-score < 5 per entry)."""
    stencil, shape, N = Stencil(1, ndim=3), (1, 2, 2, 2, 2), 20_000
    _, loc, ld, od, xi = make_volume(shape, stencil, scale=0.5)
    M = dense_m(ld, od, xi, stencil)[0]
    sigma = torch.linalg.inv(M.mT @ M)
    torch.manual_seed(0)
    samples = StructuredNormal(loc, ld, od, stencil, cross=xi).sample((N,))
    r = (samples - loc).reshape(N, -1)
    empirical = r.T @ r / N
    se = ((sigma.diagonal()[:, None] * sigma.diagonal()[None, :] + sigma.square()) / N).sqrt()
    assert ((empirical - sigma).abs() / se).max() < 5.0


def test_from_head_loss_and_module(backend):
    stencil, C = Stencil(1, ndim=3), 2
    K = structlik.head_channels(stencil, C, cross=True)
    head = (0.5 * torch.randn(2, K, 2, 3, 4, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, C, 2, 3, 4, dtype=torch.float64)
    dist = StructuredNormal.from_head(head, stencil, cross=True)
    loc, ld, od, xi = structlik.split_head(head, stencil, cross=True)
    per_image = structured_gaussian_nll(x, loc, ld, od, stencil, "none", cross=xi)
    torch.testing.assert_close(-dist.log_prob(x), per_image)
    module = structlik.StructuredGaussianNLLLoss(stencil)
    torch.testing.assert_close(module(x, loc, ld, od, cross=xi), per_image.mean())
    torch.testing.assert_close(structured_gaussian_nll(x[1], loc[1], ld[1], od[1], stencil, cross=xi[1]),
                               per_image[1])
    grad, = torch.autograd.grad(per_image.sum(), head)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # a head split without a bound is read in place (nll_head on its tall view: one gradient for the
    # whole head), equal to separate tensors
    raw = structlik.split_head(head, stencil, cross=True, weight_bound=None)
    assert ops.head_of(*raw) is not None
    loss = structured_gaussian_nll(x, *raw[:3], stencil, cross=raw[3], reduction="sum")
    grad, = torch.autograd.grad(loss, head)
    loose = [t.detach().clone().requires_grad_() for t in raw]
    loss_loose = structured_gaussian_nll(x, *loose[:3], stencil, cross=loose[3], reduction="sum")
    torch.testing.assert_close(loss, loss_loose)
    torch.testing.assert_close(grad, torch.cat(torch.autograd.grad(loss_loose, loose), 1), rtol=1e-12, atol=1e-12)


def test_value_checks_name_the_argument(backend):
    stencil, shape = Stencil(1, ndim=3), (2, 2, 2, 3, 4)
    x, loc, ld, od, xi = make_volume(shape, stencil)
    with pytest.raises(ValueError, match=r"off_diag: expected shape \(B, C\*S, D, H, W\) with S=13 = "
                                         r"\(2, 26, 2, 3, 4\), got \(2, 25, 2, 3, 4\)"):
        ops.nll(x, loc, ld, od[:, 1:], stencil)
    with pytest.raises(ValueError, match=r"log_diag: expected shape \(B, C, D, H, W\)"):
        ops.nll(x, loc, ld[:, :, 0], od, stencil)
    with pytest.raises(ValueError, match=r"z: expected shape \(B, C, D, H, W\), got \(2, 2, 3, 4\); for one volume"):
        ops.solve_upper(x[:, :, 0], ld, od, stencil)
    with pytest.raises(ValueError, match=r"cross: expected shape \(B, C\(C-1\)/2, D, H, W\) with C=2"):
        ops.nll(x, loc, ld, od, stencil, xi[:, :, :1])
    with pytest.raises(ValueError, match=r"loc: expected shape \(B, C, D, H, W\) = \(2, 2, 2, 3, 4\)"):
        ops.nll(x, loc[:, :, :, :2], ld, od, stencil)
    with pytest.raises(ValueError, match=r"off_diag: expected shape \(\*batch, C\*S, D, H, W\)"):
        StructuredNormal(loc, ld, od[:, :-1], stencil)
    bad = od.clone()
    bad[1, 0, 1, 2, 0] = float("nan")          # offset (0, 0, 1) at (1, 2, 0): inside
    for call in (lambda: ops.nll(x, loc, ld, bad, stencil), lambda: ops.solve_upper(x, ld, bad, stencil),
                 lambda: ops.variance(ld, bad, stencil), lambda: ops.precision_diagonal(ld, bad, stencil)):
        with pytest.raises(ValueError, match="off_diag: contains NaN"):
            call()
    # a weight that points outside the volume is not part of U: a NaN there is never read. Offset 4 is
    # (1, -1, -1): from the last slice it leaves the volume, as it does from row 0 of every slice
    # (where the tall view's flat neighbour is the last row of the slice before: another voxel)
    outside, clean = od.clone(), od.clone()
    outside[0, 4, 1], clean[0, 4, 1] = float("nan"), 0.0
    outside[0, 4, 0, 0], clean[0, 4, 0, 0] = float("nan"), 0.0
    torch.testing.assert_close(ops.nll(x, loc, ld, outside, stencil), ops.nll(x, loc, ld, clean, stencil))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, backend):
    stencil, shape = Stencil(1, ndim=3), (2, 2, 2, 3, 4)
    values = make_volume(shape, stencil)
    half = [t.to(dtype).requires_grad_(i > 0) for i, t in enumerate(values)]
    full = [t.to(dtype).float().requires_grad_(i > 0) for i, t in enumerate(values)]
    got, expected = ops.nll(*half[:4], stencil, half[4]), ops.nll(*full[:4], stencil, full[4])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    for g, e in zip(torch.autograd.grad(got.sum(), half[1:]), torch.autograd.grad(expected.sum(), full[1:])):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e.to(dtype).float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-4)


def test_volume_ops_keep_the_tall_view_a_view():
    """The ops read a volume's memory as its tall image: a contiguous volume, and channel slices of
    one decoder head, reach them as views (no copy: the same data pointer)."""
    from structlik.ops import _library
    head = torch.randn(2, 30, 3, 4, 5, dtype=torch.float64)
    part = head[:, 2:28]
    assert _library.fold(part).data_ptr() == part.data_ptr()
    assert _library.fold(part)._base is head


@pytest.mark.backends("reference", "cpu")
def test_kl_condition_and_prior(backend):
    """kl_divergence (both kinds), condition (mean, log_prob) and the Gamma prior on volumes, against
    the dense formulas."""
    from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence
    shape = (2, 1, 3, 2, 4)

    def make(stencil):
        _, loc, ld, od, _ = make_volume(shape, stencil, cross=False)
        return StructuredNormal(loc, ld, od, stencil)

    def mvn(d):
        M = dense_m(d.log_diag, d.off_diag, None, d.stencil)
        return MultivariateNormal(d.loc.reshape(2, -1), precision_matrix=M.mT @ M)
    p, q = make(Stencil(1, ndim=3)), make(Stencil(2, ndim=3))
    torch.testing.assert_close(kl_divergence(p, q), kl_divergence(mvn(p), mvn(q)))
    torch.testing.assert_close(kl_divergence(q, p), kl_divergence(mvn(q), mvn(p)))
    diag = Independent(Normal(torch.randn(shape, dtype=torch.float64), 0.5 + torch.rand(shape, dtype=torch.float64)),
                       4)
    dense_diag = MultivariateNormal(diag.base_dist.loc.reshape(2, -1),
                                    scale_tril=torch.diag_embed(diag.base_dist.scale.reshape(2, -1)))
    torch.testing.assert_close(kl_divergence(p, diag), kl_divergence(mvn(p), dense_diag))
    torch.testing.assert_close(kl_divergence(diag, p), kl_divergence(dense_diag, mvn(p)))

    value, mask = torch.randn(shape, dtype=torch.float64), torch.rand(shape) < 0.5
    cond = p.condition(value, mask)
    precision = mvn(p).precision_matrix
    x = torch.randn(shape, dtype=torch.float64)
    for b in range(2):
        m, o = ~mask[b].reshape(-1), mask[b].reshape(-1)
        mu, v = p.loc[b].reshape(-1), value[b].reshape(-1)
        lmm = precision[b][m][:, m]
        mean_m = mu[m] - torch.linalg.solve(lmm, precision[b][m][:, o] @ (v[o] - mu[o]))
        torch.testing.assert_close(cond.mean[b].reshape(-1)[m], mean_m, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(cond.mean[b].reshape(-1)[o], v[o], rtol=0, atol=0)
        want = MultivariateNormal(mean_m, precision_matrix=lmm).log_prob(x[b].reshape(-1)[m])
        torch.testing.assert_close(cond.log_prob(x)[b], want, rtol=1e-8, atol=1e-8)
    assert cond.rsample((3,)).shape == (3, *shape)

    lam = precision.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(structlik.gamma_prior_log_prob(p.log_diag, p.off_diag, p.stencil, 2.0, 3.0),
                               torch.distributions.Gamma(torch.tensor(2.0, dtype=torch.float64), 3.0).log_prob(lam).sum(1))


@pytest.mark.slow
def test_volume_example_runs(capsys):
    """examples/volume.py (the README's volume example): the raw-weight fit beats the diagonal one."""
    from examples import volume
    volume.main()
    out = capsys.readouterr().out
    nll = [float(line.split("held-out NLL")[1].split()[0]) for line in out.splitlines() if "structured" in line]
    diagonal = float(out.split("diagonal Gaussian")[1].split()[0])
    assert len(nll) == 2 and max(nll) < diagonal and nll[1] < nll[0]
