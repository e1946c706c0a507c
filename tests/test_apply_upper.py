"""U r and U^T y against dense matrix products, every backend against the reference."""
import pytest
import torch

from helpers import SHAPES, STENCILS, make_params
from structlik import ops, reference


@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_upper_matches_dense(shape, stencil, backend):
    _, log_diag, off_diag = make_params(shape, stencil)
    B, C, H, W = shape
    r = torch.randn(shape, dtype=torch.float64)
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    col = r.reshape(B, C, H * W, 1)
    torch.testing.assert_close(ops.apply_upper(r, log_diag, off_diag, stencil), (U @ col).reshape(shape))
    torch.testing.assert_close(ops.apply_upper_t(r, log_diag, off_diag, stencil), (U.mT @ col).reshape(shape))


@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_upper_matches_reference(shape, stencil, dtype, backend):
    _, log_diag, off_diag = make_params(shape, stencil, dtype=dtype)
    r = torch.randn(shape, dtype=dtype)
    for name in ("apply_upper", "apply_upper_t"):
        got = getattr(ops, name)(r, log_diag, off_diag, stencil)
        torch.testing.assert_close(got, getattr(reference, name)(r, log_diag, off_diag, stencil))
