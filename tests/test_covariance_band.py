"""ops.variance and ops.covariance_band (the band of Sigma = Lambda^-1) on every backend against a
dense float64 inverse, their gradients (first and second order), opcheck, limits and checks."""
import pytest
import torch
from hypothesis import given

from conftest import TEST_DEVICE
from helpers import (INTERPRETED_CASES, OPCHECK_STENCIL, available_backends, gradcheck, gradcheck_problems,
                     make_params, opcheck, triton_if_available)
import structlik
from structlik import ops, reference


def dense_covariance(log_diag, off_diag, stencil):
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    return torch.linalg.inv(U.mT @ U)


def band_of(sigma, stencil, H, W):
    """(B, C, n, n) -> the band layout (B, C*L, H, W)."""
    B, C, n, _ = sigma.shape
    L = reference.band_width(stencil, W) + 1
    out = sigma.new_zeros(B, C, L, n)
    for k in range(min(L, n)):          # (the band may be wider than a small image)
        out[:, :, k, :n - k] = torch.diagonal(sigma, offset=k, dim1=-2, dim2=-1)
    return out.reshape(B, C * L, H, W)


def test_variance_and_band_match_dense(shape, stencil, backend):
    _, log_diag, off_diag = make_params(shape, stencil)
    sigma = dense_covariance(log_diag, off_diag, stencil)
    torch.testing.assert_close(ops.variance(log_diag, off_diag, stencil),
                               torch.diagonal(sigma, dim1=-2, dim2=-1).reshape(shape), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ops.covariance_band(log_diag, off_diag, stencil), band_of(sigma, stencil, *shape[2:]),
                               rtol=1e-10, atol=1e-13)


@pytest.mark.not_interpreted
@given(problem=gradcheck_problems())
def test_gradcheck(problem, backend):
    stencil, shape = problem
    _, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    gradcheck(lambda s, w: ops.variance(s, w, stencil), log_diag, off_diag, backend=backend)
    gradcheck(lambda s, w: ops.covariance_band(s, w, stencil), log_diag, off_diag, backend=backend)


@pytest.mark.parametrize("backend", triton_if_available(TEST_DEVICE), indirect=True)
@pytest.mark.parametrize("stencil,shape", INTERPRETED_CASES)
def test_gradcheck_interpreted_triton(stencil, shape, backend):
    """The Triton adjoint sweep and gradient kernels (interpreted without a GPU), fast_mode gradcheck
    of the band (variance's backward runs the same kernels on a gradient of the band's first plane;
    its forward is checked against dense above)."""
    _, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    gradcheck(lambda s, w: ops.covariance_band(s, w, stencil), log_diag, off_diag, backend=backend)


@pytest.mark.not_interpreted
def test_gradgradcheck(backend):
    """Second order (create_graph) goes through autograd of the reference's block recurrence."""
    stencil = structlik.Stencil(1, (1, 2))
    _, log_diag, off_diag = make_params((1, 2, 4, 3), stencil, requires_grad=True)
    for op in (ops.variance, ops.covariance_band):
        assert torch.autograd.gradgradcheck(lambda s, w: op(s, w, stencil), (log_diag, off_diag), eps=1e-6,
                                            atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend_name", [pytest.param(n, marks=pytest.mark.slow) if n == "triton" else n
                                          for n in available_backends(TEST_DEVICE)])
def test_opcheck(backend_name):
    def make(grad):
        _, log_diag, off_diag = make_params((1, 2, 3, 4), OPCHECK_STENCIL, requires_grad=grad)
        return log_diag, off_diag, OPCHECK_STENCIL.flat_offsets, False
    opcheck(backend_name, "covariance_band", make, True)
    if backend_name != "triton":        # interpreted: the same kernel with the flag, 10 s more
        opcheck(backend_name, "covariance_band", lambda g: (*make(g)[:3], True), True)

    def make_backward(grad):
        log_diag, off_diag, offsets, _ = make(False)
        band = torch.ops.structlik.covariance_band(log_diag, off_diag, offsets, False)
        return torch.randn_like(band), log_diag, off_diag, band, offsets
    opcheck(backend_name, "covariance_band_backward", make_backward, False)


def test_split_head_views_read_in_place(backend):
    """log_diag and off_diag as channel slices of one head (strided planes) give the contiguous
    tensors' results and gradients (tests/test_split_views.py does the other ops, at larger sizes)."""
    stencil = structlik.Stencil(1)
    head = torch.randn(2, 1 + 2 * (1 + stencil.S), 3, 4, dtype=torch.float64) * 0.2
    views = head.split([1, 2, 2 * stencil.S], dim=1)[1:]
    assert not views[1].is_contiguous()
    for op in (ops.variance, ops.covariance_band):
        torch.testing.assert_close(op(*views, stencil), op(*(v.contiguous() for v in views), stencil))
    h = head.clone().requires_grad_()
    ops.covariance_band(*h.split([1, 2, 2 * stencil.S], dim=1)[1:], stencil).sum().backward()
    ld, od = (v.contiguous().requires_grad_() for v in views)
    ops.covariance_band(ld, od, stencil).sum().backward()
    torch.testing.assert_close(h.grad[:, 1:], torch.cat([ld.grad, od.grad], 1))


def test_pinned_pixels_are_the_limit(backend):
    """log_diag = +inf pins a pixel (contract §1): its row and column of Sigma are 0 and the rest
    is the covariance of the other pixels with that pixel's row and column of U dropped."""
    stencil = structlik.Stencil(2)
    _, log_diag, off_diag = make_params((1, 1, 4, 5), stencil)
    log_diag[0, 0, 1, 2] = float("inf")
    keep = torch.ones(20, dtype=torch.bool)
    keep[1 * 5 + 2] = False
    U = ops.to_dense_upper(log_diag.nan_to_num(posinf=0.0), off_diag, stencil)[0, 0][keep][:, keep]
    sigma = torch.zeros(20, 20, dtype=torch.float64)
    sigma[keep.nonzero(), keep.nonzero().T] = torch.linalg.inv(U.T @ U)
    torch.testing.assert_close(ops.variance(log_diag, off_diag, stencil).flatten(), sigma.diagonal())
    ld, od = log_diag.clone().requires_grad_(), off_diag.clone().requires_grad_()
    gs, gw = torch.autograd.grad(ops.variance(ld, od, stencil).sum(), (ld, od))
    assert torch.isfinite(gs).all() and torch.isfinite(gw).all() and gs[0, 0, 1, 2] == 0


def test_half_inputs_compute_in_float32(backend):
    stencil = structlik.Stencil(1)
    _, log_diag, off_diag = make_params((2, 1, 4, 4), stencil, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        got = ops.variance(log_diag.to(dtype), off_diag.to(dtype), stencil)
        assert got.dtype == dtype
        expected = ops.variance(log_diag.to(dtype).float(), off_diag.to(dtype).float(), stencil)
        torch.testing.assert_close(got.float(), expected.to(dtype).float(), rtol=0, atol=0)


def test_empty_batch(backend):
    stencil = structlik.Stencil(1)
    log_diag = torch.zeros(0, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    off_diag = torch.zeros(0, 2 * stencil.S, 3, 4, dtype=torch.float64, requires_grad=True)
    assert ops.variance(log_diag, off_diag, stencil).shape == (0, 2, 3, 4)
    band = ops.covariance_band(log_diag, off_diag, stencil)
    assert band.shape == (0, 2 * (reference.band_width(stencil, 4) + 1), 3, 4)
    band.sum().backward()
    assert log_diag.grad.shape == log_diag.shape


def test_meta_tensors_give_shapes_with_validation_on():
    stencil = structlik.Stencil(2)
    log_diag = torch.empty(2, 1, 6, 5, device="meta")
    off_diag = torch.empty(2, stencil.S, 6, 5, device="meta")
    assert ops.variance(log_diag, off_diag, stencil).shape == (2, 1, 6, 5)
    assert ops.covariance_band(log_diag, off_diag, stencil).shape == (2, reference.band_width(stencil, 5) + 1, 6, 5)


def test_errors_name_the_argument():
    stencil = structlik.Stencil(1)
    _, log_diag, off_diag = make_params((1, 1, 3, 3), stencil)
    with pytest.raises(ValueError, match="off_diag: expected shape"):
        ops.variance(log_diag, off_diag[:, :2], stencil)
    with pytest.raises(ValueError, match="log_diag: expected shape"):
        ops.covariance_band(log_diag[0], off_diag, stencil)
    bad = log_diag.clone()
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="log_diag"):
        ops.variance(bad, off_diag, stencil)


@pytest.mark.not_interpreted
def test_func_transforms_and_compile(backend):
    """torch.func.grad, vmap (folded into the batch), and torch.compile with fullgraph."""
    stencil = structlik.Stencil(1)
    _, log_diag, off_diag = make_params((2, 1, 3, 4), stencil)
    expected = torch.autograd.grad(ops.variance(log_diag.requires_grad_(), off_diag, stencil).square().sum(),
                                   log_diag)[0]
    log_diag = log_diag.detach()
    got = torch.func.grad(lambda s: ops.variance(s, off_diag, stencil).square().sum())(log_diag)
    torch.testing.assert_close(got, expected)
    batched = torch.func.vmap(lambda s, w: ops.variance(s, w, stencil))(log_diag[None].expand(3, -1, -1, -1, -1),
                                                                        off_diag[None].expand(3, -1, -1, -1, -1))
    torch.testing.assert_close(batched, ops.variance(log_diag, off_diag, stencil).expand(3, -1, -1, -1, -1))
    op = torch.ops.structlik.covariance_band.default
    compiled = torch.compile(lambda s, w: op(s, w, stencil.flat_offsets, True), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(log_diag, off_diag), ops.variance(log_diag, off_diag, stencil))
