"""The triangular solves: round trips through apply_upper, dense solves, every backend vs reference,
gradcheck, opcheck."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import TEST_DEVICE
from helpers import (INTERPRETED_CASES, available_backends, gradcheck_image_op, gradcheck_problems, make_params,
                     opcheck_image_op, triton_if_available)
from structlik import ops, reference


def test_solve_upper_inverts_apply_upper(shape, stencil, backend):
    _, log_diag, off_diag = make_params(shape, stencil)
    z = torch.randn(shape, dtype=torch.float64)
    eps = ops.solve_upper(z, log_diag, off_diag, stencil)
    torch.testing.assert_close(ops.apply_upper(eps, log_diag, off_diag, stencil), z, rtol=0, atol=1e-13)
    v = ops.solve_upper_t(z, log_diag, off_diag, stencil)
    torch.testing.assert_close(ops.apply_upper_t(v, log_diag, off_diag, stencil), z, rtol=0, atol=1e-13)


def test_solves_match_dense_triangular_solve(shape, stencil, backend):
    _, log_diag, off_diag = make_params(shape, stencil)
    B, C, H, W = shape
    z = torch.randn(shape, dtype=torch.float64)
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    col = z.reshape(B, C, H * W, 1)
    dense = torch.linalg.solve_triangular(U, col, upper=True).reshape(shape)
    dense_t = torch.linalg.solve_triangular(U.mT, col, upper=False).reshape(shape)
    torch.testing.assert_close(ops.solve_upper(z, log_diag, off_diag, stencil), dense, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ops.solve_upper_t(z, log_diag, off_diag, stencil), dense_t, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solves_match_reference(shape, stencil, dtype, backend):
    _, log_diag, off_diag = make_params(shape, stencil, dtype=dtype)
    z = torch.randn(shape, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name in ("solve_upper", "solve_upper_t"):
        got = getattr(ops, name)(z, log_diag, off_diag, stencil)
        assert got.dtype == dtype
        torch.testing.assert_close(got, getattr(reference, name)(z, log_diag, off_diag, stencil), **tol)


@pytest.mark.parametrize("name", ["solve_upper", "solve_upper_t", "rsample"])
def test_a_pinned_pixel_has_the_gradients_of_the_limit(name, backend):
    """d = +inf pins a pixel (its value 0): every gradient is that of d -> inf, here d = e^300,
    where v_p sol_p d_p ~ 1/d_p (it was NaN: 0 * 0 * inf)."""
    from structlik import Stencil, StructuredNormal
    stencil, shape = Stencil(1), (2, 1, 4, 5)
    loc, log_diag, off_diag = make_params(shape, stencil)
    z = torch.randn(shape, dtype=torch.float64)
    weights = torch.randn(shape, dtype=torch.float64)

    def grads(pin):
        s = log_diag.clone()
        s[:, 0, 1, 2] = pin
        leaves = [t.clone().requires_grad_() for t in (z, s, off_diag)]
        if name == "rsample":
            torch.manual_seed(5)
            out = StructuredNormal(loc, *leaves[1:], stencil).rsample()
        else:
            out = getattr(ops, name)(*leaves, stencil)
        return (out,) + torch.autograd.grad((out * weights).sum(), leaves[1:] if name == "rsample" else leaves)

    for got, limit in zip(grads(float("inf")), grads(300.0)):
        torch.testing.assert_close(got, limit, rtol=1e-12, atol=1e-12)


@pytest.mark.not_interpreted
@given(problem=gradcheck_problems(), name=st.sampled_from(["solve_upper", "solve_upper_t"]))
def test_gradcheck(problem, name, backend):
    gradcheck_image_op(name, *problem, backend)


@pytest.mark.parametrize("backend_name", available_backends(TEST_DEVICE))
@pytest.mark.parametrize("name", ["solve_upper", "solve_upper_t"])
def test_opcheck(backend_name, name):
    opcheck_image_op(backend_name, name)


@pytest.mark.parametrize("backend", triton_if_available(TEST_DEVICE), indirect=True)
@pytest.mark.parametrize("stencil,shape", INTERPRETED_CASES)
def test_gradcheck_interpreted_triton(stencil, shape, backend):
    """The registered backward on the Triton kernels (interpreted without a GPU), fast_mode gradcheck."""
    for name in ("solve_upper", "solve_upper_t"):
        gradcheck_image_op(name, stencil, shape, backend)
