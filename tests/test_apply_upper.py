"""U r and U^T y against dense matrix products, every backend against the reference."""
import pytest
import torch

from helpers import STENCILS, make_params
from structlik import ops, reference


def test_apply_upper_matches_dense(shape, stencil, backend):
    _, log_diag, off_diag = make_params(shape, stencil)
    B, C, H, W = shape
    r = torch.randn(shape, dtype=torch.float64)
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    col = r.reshape(B, C, H * W, 1)
    torch.testing.assert_close(ops.apply_upper(r, log_diag, off_diag, stencil), (U @ col).reshape(shape))
    torch.testing.assert_close(ops.apply_upper_t(r, log_diag, off_diag, stencil), (U.mT @ col).reshape(shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_upper_matches_reference(shape, stencil, dtype, backend):
    _, log_diag, off_diag = make_params(shape, stencil, dtype=dtype)
    r = torch.randn(shape, dtype=dtype)
    for name in ("apply_upper", "apply_upper_t"):
        got = getattr(ops, name)(r, log_diag, off_diag, stencil)
        torch.testing.assert_close(got, getattr(reference, name)(r, log_diag, off_diag, stencil))


@pytest.mark.parametrize("value", [-100.0, -87.5, -20.0, 0.0, 50.0, 88.6])
def test_extreme_log_diag_float32(value, backend):
    """Rows whose log_diag leaves the range of the kernels' vectorised float32 exp still match exp()."""
    stencil = STENCILS[0].values[0]
    _, log_diag, off_diag = make_params((1, 1, 3, 17), stencil, dtype=torch.float32)
    log_diag[0, 0, 1, 5] = value                       # one pixel in the middle row
    r = 1e-3 * torch.randn(1, 1, 3, 17)
    got = ops.apply_upper(r, log_diag, off_diag, stencil)
    expected = reference.apply_upper(r, log_diag, off_diag, stencil)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)
    torch.testing.assert_close(ops.precision_diagonal(log_diag, off_diag, stencil),
                               reference.precision_diagonal(log_diag, off_diag, stencil), rtol=4e-6, atol=0)
