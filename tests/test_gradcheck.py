"""float64 gradcheck of every differentiable op, over random stencils and shapes (hypothesis).

Backends run by an interpreter (Triton on a CPU, ~16 ms per program) get the
explicit cases at the end instead of the hypothesis search.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import TEST_DEVICE
from helpers import available_backends, make_params
from structlik import Stencil, StructuredNormal, ops, structured_gaussian_nll


@st.composite
def problems(draw):
    radius = draw(st.integers(1, 2))
    dilations = draw(st.sampled_from([(1,), (1, 2), (2,), (1, 3)]))
    stencil = Stencil(radius, dilations)
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return stencil, shape


def _check(fn, *inputs, backend="reference"):
    # Under Triton's interpreter every call costs tens of milliseconds: check a random
    # projection of the Jacobian (fast_mode) there instead of every column of it.
    fast = backend == "triton"
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


PRIMITIVES = ("apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t")


@pytest.mark.not_interpreted
@given(problem=problems(), name=st.sampled_from(PRIMITIVES))
def test_gradcheck_primitives(problem, name, backend):
    stencil, shape = problem
    image, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    op = getattr(ops, name)
    _check(lambda a, s, w: op(a, s, w, stencil), image, log_diag, off_diag, backend=backend)


@pytest.mark.not_interpreted
@given(problem=problems())
def test_gradcheck_nll(problem, backend):
    stencil, shape = problem
    loc, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    x = (loc.detach() + torch.randn(shape, dtype=torch.float64)).requires_grad_()
    _check(lambda *a: ops.nll(*a, stencil), x, loc, log_diag, off_diag, backend=backend)
    _check(lambda *a: structured_gaussian_nll(*a, stencil, reduction="sum"), x, loc, log_diag, off_diag, backend=backend)


@pytest.mark.not_interpreted
@given(problem=problems())
def test_gradcheck_precision_diagonal(problem, backend):
    stencil, shape = problem
    _, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    _check(lambda s, w: ops.precision_diagonal(s, w, stencil), log_diag, off_diag, backend=backend)


@pytest.mark.not_interpreted
@given(problem=problems())
def test_gradcheck_rsample(problem, backend):
    """Reparameterised sampling: the gradient reaches loc, log_diag and off_diag."""
    stencil, shape = problem
    loc, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)

    def sample(m, s, w):
        torch.manual_seed(1234)     # the same z in every evaluation
        return StructuredNormal(m, s, w, stencil).rsample((2,))

    _check(sample, loc, log_diag, off_diag, backend=backend)
    sample(loc, log_diag, off_diag).square().sum().backward()
    assert loc.grad.abs().sum() > 0 and log_diag.grad.abs().sum() > 0
    H, W = shape[2:]
    some_weight_used = any(dy < H and abs(dx) < W for dy, dx in stencil.offsets)
    assert (off_diag.grad.abs().sum() > 0) == some_weight_used


INTERPRETED_CASES = [
    pytest.param(Stencil(1, (1, 2)), (1, 2, 3, 4), id="r1-d12-B1-C2-3x4"),
    pytest.param(Stencil(2), (2, 1, 4, 3), id="r2-B2-C1-4x3"),
]


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("stencil,shape", INTERPRETED_CASES)
def test_gradcheck_interpreted_backend(stencil, shape, backend):
    """Every op's registered backward on the interpreted Triton kernels, fast_mode gradcheck."""
    if backend not in available_backends(TEST_DEVICE):
        pytest.skip("Triton is not available")
    loc, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    x = (loc.detach() + torch.randn(shape, dtype=torch.float64)).requires_grad_()
    for name in PRIMITIVES:
        op = getattr(ops, name)
        _check(lambda a, s, w: op(a, s, w, stencil), x, log_diag, off_diag, backend=backend)
    _check(lambda *a: ops.nll(*a, stencil), x, loc, log_diag, off_diag, backend=backend)
    _check(lambda s, w: ops.precision_diagonal(s, w, stencil), log_diag, off_diag, backend=backend)
