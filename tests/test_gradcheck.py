"""float64 gradcheck of the image ops, the precision diagonal and rsample, over random stencils and
shapes (hypothesis); the NLL family's is in test_nll.py.

Backends run by an interpreter (Triton on a CPU, ~16 ms per program) get the
explicit cases at the end instead of the hypothesis search.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import TEST_DEVICE
from helpers import available_backends, gradcheck, gradcheck_problems, make_params
from structlik import Stencil, StructuredNormal, ops


PRIMITIVES = ("apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t")


@pytest.mark.not_interpreted
@given(problem=gradcheck_problems(), name=st.sampled_from(PRIMITIVES))
def test_gradcheck_primitives(problem, name, backend):
    stencil, shape = problem
    image, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    op = getattr(ops, name)
    gradcheck(lambda a, s, w: op(a, s, w, stencil), image, log_diag, off_diag, backend=backend)


@pytest.mark.not_interpreted
@given(problem=gradcheck_problems())
def test_gradcheck_precision_diagonal(problem, backend):
    stencil, shape = problem
    _, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    gradcheck(lambda s, w: ops.precision_diagonal(s, w, stencil), log_diag, off_diag, backend=backend)


@pytest.mark.not_interpreted
@given(problem=gradcheck_problems())
def test_gradcheck_rsample(problem, backend):
    """Reparameterised sampling: the gradient reaches loc, log_diag and off_diag."""
    stencil, shape = problem
    loc, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)

    def sample(m, s, w):
        torch.manual_seed(1234)     # the same z in every evaluation
        return StructuredNormal(m, s, w, stencil).rsample((2,))

    gradcheck(sample, loc, log_diag, off_diag, backend=backend)
    sample(loc, log_diag, off_diag).square().sum().backward()
    assert loc.grad.abs().sum() > 0 and log_diag.grad.abs().sum() > 0
    H, W = shape[2:]
    some_weight_used = any(dy < H and abs(dx) < W for dy, dx in stencil.offsets)
    assert (off_diag.grad.abs().sum() > 0) == some_weight_used


INTERPRETED_CASES = [
    pytest.param(Stencil(1, (1, 2)), (1, 2, 3, 4), id="r1-d12-B1-C2-3x4"),
    pytest.param(Stencil(2), (2, 1, 4, 3), id="r2-B2-C1-4x3"),
]


# (an empty parameter set, reported as a skip, where Triton does not run on the tests' device)
@pytest.mark.parametrize("backend", [n for n in ("triton",) if n in available_backends(TEST_DEVICE)], indirect=True)
@pytest.mark.parametrize("stencil,shape", INTERPRETED_CASES)
def test_gradcheck_interpreted_backend(stencil, shape, backend):
    """Every op's registered backward on the interpreted Triton kernels, fast_mode gradcheck."""
    loc, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    x = (loc.detach() + torch.randn(shape, dtype=torch.float64)).requires_grad_()
    for name in PRIMITIVES:
        op = getattr(ops, name)
        gradcheck(lambda a, s, w: op(a, s, w, stencil), x, log_diag, off_diag, backend=backend)
    gradcheck(lambda *a: ops.nll(*a, stencil), x, loc, log_diag, off_diag, backend=backend)
    gradcheck(lambda s, w: ops.precision_diagonal(s, w, stencil), log_diag, off_diag, backend=backend)
