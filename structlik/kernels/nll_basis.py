"""The fused NLL with a learned basis: the sweep of structlik/kernels/nll.py with ``BASIS`` set,
w_{p,i} = sum_j basis[i, j] coeffs_j(p) formed in registers, never stored.

Training: the forward stores u (op ``nll_basis_u``), and the one-pass backward reads it and
writes d/dloc, d/ds, d/dcoeffs and each program's partial d/dbasis; without a stored u the
backward first runs the forward with u (op ``nll_basis_backward``).
"""
from . import nll


def forward(x, loc, log_diag, coeffs, basis, offsets, with_u=False):
    return nll.forward(x, loc, log_diag, coeffs, offsets, basis=basis, with_u=with_u)


def backward(grad, x, loc, log_diag, coeffs, basis, offsets, u=None):
    """(d/dloc, d/dlog_diag, d/dcoeffs, d/dbasis)."""
    return nll.backward(grad, x, loc, log_diag, coeffs, offsets, basis=basis, u=u)
