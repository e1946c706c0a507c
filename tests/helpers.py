"""Shared test helpers: random well-conditioned parameters and the backends to cross."""
from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

import structlik
from structlik import backends

# Offsets of every kind: plain, wide, dilated, dilated with overlap between dilations.
STENCILS = [
    pytest.param(structlik.Stencil(1), id="r1"),
    pytest.param(structlik.Stencil(2), id="r2"),
    pytest.param(structlik.Stencil(3), id="r3"),
    pytest.param(structlik.Stencil(1, (1, 2)), id="r1-d12"),
    pytest.param(structlik.Stencil(1, (1, 2, 4)), id="r1-d124"),
    pytest.param(structlik.Stencil(2, (1, 3)), id="r2-d13"),
    pytest.param(structlik.Stencil(2, (2, 1)), id="r2-d21"),
]

# (B, C, H, W): tiny, single-row, single-column, non-square, smaller than the stencil.
SHAPES = [
    pytest.param((1, 1, 1, 1), id="B1-C1-1x1"),
    pytest.param((2, 1, 1, 7), id="B2-C1-1x7"),
    pytest.param((1, 2, 6, 1), id="B1-C2-6x1"),
    pytest.param((2, 3, 5, 3), id="B2-C3-5x3"),
    pytest.param((1, 1, 9, 13), id="B1-C1-9x13"),
    pytest.param((3, 2, 4, 5), id="B3-C2-4x5"),
]


def make_params(shape, stencil, dtype=torch.float64, scale=0.3, device=None, requires_grad=False):
    """(loc, log_diag, off_diag) with U well conditioned: d ~ exp(N(0, scale^2)),
    off-diagonal weights ~ N(0, (scale / sqrt(S))^2), so the solves stay accurate."""
    B, C, H, W = shape
    loc = torch.randn(shape, dtype=dtype, device=device)
    log_diag = scale * torch.randn(shape, dtype=dtype, device=device)
    off_diag = (scale / stencil.S ** 0.5) * torch.randn(B, C * stencil.S, H, W, dtype=dtype, device=device)
    out = (loc, log_diag, off_diag)
    if requires_grad:
        out = tuple(t.requires_grad_() for t in out)
    return out


def available_backends(device="cpu"):
    """The backends that run on ``device`` tensors here."""
    names = []
    for name in backends.NAMES:
        if backends.available(name) and device in backends.devices(name):
            names.append(name)
    return names


def assert_half_nll_matches_float32(fused_nll, reference_nll, values, dtype):
    """An NLL on float16/bfloat16 ``values`` (x first, then parameters) against the reference on
    their float32 copies: a float32 NLL, and gradients in ``dtype`` that equal the float32
    gradients rounded once (float32 accumulation: within a unit of the dtype's last place)."""
    half = [t.to(dtype).requires_grad_(i > 0) for i, t in enumerate(values)]
    full = [t.to(dtype).float().requires_grad_(i > 0) for i, t in enumerate(values)]
    got, expected = fused_nll(*half), reference_nll(*full)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    for g, e in zip(torch.autograd.grad(got.sum(), half[1:]), torch.autograd.grad(expected.sum(), full[1:])):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e.to(dtype).float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-4)


@st.composite
def gradcheck_problems(draw):
    """A random stencil (radius 1-2, dilations) and a small (B, C, H, W) for a float64 gradcheck."""
    radius = draw(st.integers(1, 2))
    dilations = draw(st.sampled_from([(1,), (1, 2), (2,), (1, 3)]))
    stencil = structlik.Stencil(radius, dilations)
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return stencil, shape


def gradcheck(fn, *inputs, backend="reference"):
    """float64 gradcheck of ``fn``. Under Triton's interpreter every call costs tens of milliseconds:
    a random projection of the Jacobian (fast_mode) there instead of every column of it."""
    fast = backend == "triton"
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


OPCHECK_STENCIL = structlik.Stencil(1, (1, 2))


def opcheck_inputs(grad):
    """x, loc, log_diag, off_diag (2, 2, 5, 4) for opcheck, float64, needing gradients or not."""
    loc, log_diag, off_diag = make_params((2, 2, 5, 4), OPCHECK_STENCIL, requires_grad=grad)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=grad)
    return x, loc, log_diag, off_diag


def opcheck(backend_name, op_name, make, differentiable):
    """torch.library.opcheck of torch.ops.structlik.<op_name> on ``make(grad)`` with backend_name's
    kernel (the reference: what MPS, XPU and a CPU without the extension run)."""
    op = getattr(torch.ops.structlik, op_name)
    with backends.using(backend_name):
        for grad in ((False, True) if differentiable else (False,)):
            torch.library.opcheck(op, make(grad))


# Backends run by an interpreter (Triton on a CPU, ~16 ms per program) skip the hypothesis search
# (not_interpreted) and gradcheck these explicit cases instead.
INTERPRETED_CASES = [
    pytest.param(structlik.Stencil(1, (1, 2)), (1, 2, 3, 4), id="r1-d12-B1-C2-3x4"),
    pytest.param(structlik.Stencil(2), (2, 1, 4, 3), id="r2-B2-C1-4x3"),
]


def triton_if_available(device):
    """["triton"] where it runs on the tests' device, else [] (pytest reports the empty set as a skip)."""
    return [n for n in ("triton",) if n in available_backends(device)]


def gradcheck_image_op(name, stencil, shape, backend):
    """gradcheck of the public image op ``name`` (apply_upper ... solve_upper_t) in all three tensors."""
    image, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    op = getattr(structlik.ops, name)
    gradcheck(lambda a, s, w: op(a, s, w, stencil), image, log_diag, off_diag, backend=backend)


def opcheck_image_op(backend_name, name):
    """opcheck of torch.ops.structlik.<name>, an image op (r, log_diag, off_diag, offsets)."""
    opcheck(backend_name, name, lambda g: (opcheck_inputs(g)[0], *opcheck_inputs(g)[2:],
                                           OPCHECK_STENCIL.flat_offsets), True)


def check_func_and_compile(x, loc, ld, od, xi, stencil, argnum=3):
    """Per-sample gradients of the NLL (vmap(grad) in argument ``argnum`` of (loc, log_diag, off_diag,
    cross)) equal autograd's over the batch, and a torch.compile(fullgraph) of the NLL and a solve
    matches eager: for images and volumes, coupled channels or not."""
    from structlik import ops
    per_sample = torch.func.vmap(torch.func.grad(
        lambda m, s, w, c, v: ops.nll(v[None], m[None], s[None], w[None], stencil, c[None]).sum(), argnums=argnum))(
        loc, ld, od, xi, x)
    leaves = [loc, ld, od, xi]
    leaves[argnum] = leaves[argnum].clone().requires_grad_()
    full, = torch.autograd.grad(ops.nll(x, *leaves[:3], stencil, leaves[3]).sum(), leaves[argnum])
    torch.testing.assert_close(per_sample, full)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(m, s, w, c):
        return ops.nll(x, m, s, w, stencil, c).sum(), ops.solve_upper(x, s, w, stencil, c)
    value, sol = step(loc, ld, od, xi)
    torch.testing.assert_close(value, ops.nll(x, loc, ld, od, stencil, xi).sum())
    torch.testing.assert_close(sol, ops.solve_upper(x, ld, od, stencil, xi))


def check_shapes_everywhere(x, loc, ld, od, xi, stencil):
    """The shapes of every op, the loss and the distribution (validation on): for meta and fake tensors."""
    from structlik import ops, StructuredNormal, structured_gaussian_nll
    shape, n = x.shape, x[0].numel()
    assert structured_gaussian_nll(x, loc, ld, od, stencil, reduction="none", cross=xi).shape == (shape[0],)
    for op in (ops.apply_upper, ops.apply_upper_t, ops.solve_upper, ops.solve_upper_t):
        assert op(x, ld, od, stencil, xi).shape == shape
    assert ops.precision_diagonal(ld, od, stencil, xi).shape == shape
    assert ops.variance(ld, od, stencil).shape == shape
    assert ops.to_dense_upper(ld, od, stencil, xi).shape == (shape[0], n, n)
    dist = StructuredNormal(loc, ld, od, stencil, cross=xi)
    assert dist.log_prob(x).shape == (shape[0],) and dist.entropy().shape == (shape[0],)
    assert dist.rsample((3,)).shape == (3, *shape)


def assert_ops_match_dense(M, x, loc, ld, od, xi, stencil, tol=dict(rtol=1e-10, atol=1e-10)):
    """M r, M^T y, both solves, diag(M^T M) and the NLL of images or volumes against the dense M
    (B, C*n, C*n) built by the test from the formula."""
    from structlik import ops
    shape, B = x.shape, x.shape[0]

    def matvec(A, v):
        return torch.einsum("bij,bj->bi", A, v.reshape(B, -1)).reshape(v.shape)
    r = x - loc
    torch.testing.assert_close(ops.apply_upper(r, ld, od, stencil, xi), matvec(M, r), **tol)
    torch.testing.assert_close(ops.apply_upper_t(r, ld, od, stencil, xi), matvec(M.mT, r), **tol)
    z = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ops.solve_upper(z, ld, od, stencil, xi),
                               torch.linalg.solve_triangular(M, z.reshape(B, -1, 1), upper=True).reshape(shape), **tol)
    torch.testing.assert_close(ops.solve_upper_t(z, ld, od, stencil, xi),
                               torch.linalg.solve_triangular(M.mT, z.reshape(B, -1, 1), upper=False).reshape(shape),
                               **tol)
    precision = M.mT @ M
    torch.testing.assert_close(ops.precision_diagonal(ld, od, stencil, xi),
                               precision.diagonal(dim1=1, dim2=2).reshape(shape), **tol)
    expected = -torch.distributions.MultivariateNormal(loc.reshape(B, -1), precision_matrix=precision).log_prob(
        x.reshape(B, -1))
    torch.testing.assert_close(ops.nll(x, loc, ld, od, stencil, xi), expected, **tol)
