import pytest
import torch

from helpers import make_params
from structlik import ops


def test_precision_diagonal_matches_dense(shape, stencil, backend):
    _, log_diag, off_diag = make_params(shape, stencil)
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    expected = torch.diagonal(U.mT @ U, dim1=-2, dim2=-1).reshape(shape)
    torch.testing.assert_close(ops.precision_diagonal(log_diag, off_diag, stencil), expected, rtol=1e-13, atol=0)
