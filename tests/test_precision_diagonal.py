import pytest
import torch
from hypothesis import given

from conftest import TEST_DEVICE
from helpers import (INTERPRETED_CASES, OPCHECK_STENCIL, available_backends, gradcheck, gradcheck_problems,
                     make_params, opcheck, opcheck_inputs, triton_if_available)
from structlik import ops


def test_precision_diagonal_matches_dense(shape, stencil, backend):
    _, log_diag, off_diag = make_params(shape, stencil)
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    expected = torch.diagonal(U.mT @ U, dim1=-2, dim2=-1).reshape(shape)
    torch.testing.assert_close(ops.precision_diagonal(log_diag, off_diag, stencil), expected, rtol=1e-13, atol=0)


@pytest.mark.not_interpreted
@given(problem=gradcheck_problems())
def test_gradcheck(problem, backend):
    stencil, shape = problem
    _, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    gradcheck(lambda s, w: ops.precision_diagonal(s, w, stencil), log_diag, off_diag, backend=backend)


@pytest.mark.parametrize("backend_name", available_backends(TEST_DEVICE))
def test_opcheck(backend_name):
    opcheck(backend_name, "precision_diagonal", lambda g: (*opcheck_inputs(g)[2:], OPCHECK_STENCIL.flat_offsets), True)


@pytest.mark.parametrize("backend", triton_if_available(TEST_DEVICE), indirect=True)
@pytest.mark.parametrize("stencil,shape", INTERPRETED_CASES)
def test_gradcheck_interpreted_triton(stencil, shape, backend):
    """The registered backward on the Triton kernels (interpreted without a GPU), fast_mode gradcheck."""
    _, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    gradcheck(lambda s, w: ops.precision_diagonal(s, w, stencil), log_diag, off_diag, backend=backend)
