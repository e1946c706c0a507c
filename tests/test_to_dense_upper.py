"""to_dense_upper against a construction written here, pixel by pixel, from docs/contract.md §1."""
import pytest
import torch

from helpers import SHAPES, STENCILS, make_params
from structlik import ops


def dense_from_formula(log_diag, off_diag, stencil):
    B, C, H, W = log_diag.shape
    n, S = H * W, stencil.S
    U = torch.zeros(B, C, n, n, dtype=log_diag.dtype)
    for b in range(B):
        for c in range(C):
            for y in range(H):
                for x in range(W):
                    p = y * W + x
                    U[b, c, p, p] = log_diag[b, c, y, x].exp()
                    for i, (dy, dx) in enumerate(stencil.offsets):
                        if 0 <= y + dy < H and 0 <= x + dx < W:
                            U[b, c, p, (y + dy) * W + (x + dx)] = off_diag[b, c * S + i, y, x]
    return U


@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("shape", SHAPES)
def test_to_dense_upper_matches_formula(shape, stencil):
    _, log_diag, off_diag = make_params(shape, stencil)
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    torch.testing.assert_close(U, dense_from_formula(log_diag, off_diag, stencil), rtol=0, atol=0)
    # upper-triangular in raster order: what makes back-substitution possible
    assert torch.equal(U, U.triu())


def test_to_dense_upper_is_differentiable():
    stencil = STENCILS[0].values[0]
    _, log_diag, off_diag = make_params((1, 1, 3, 3), stencil, requires_grad=True)
    ops.to_dense_upper(log_diag, off_diag, stencil).sum().backward()
    torch.testing.assert_close(log_diag.grad, log_diag.detach().exp())
    # each weight lands in U once where its neighbour is inside, nowhere otherwise
    assert set(off_diag.grad.unique().tolist()) <= {0.0, 1.0}
