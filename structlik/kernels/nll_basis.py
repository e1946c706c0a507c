"""The fused NLL with a learned basis: the sweep of structlik/kernels/nll.py with ``BASIS`` set,
w_{p,i} = sum_j basis[i, j] coeffs_j(p) formed in registers, never stored.

Backward: the forward with u stored (one pass), then the one-pass backward, which writes
d/dloc, d/ds, d/dcoeffs and each program's partial d/dbasis.
"""
from . import nll


def forward(x, loc, log_diag, coeffs, basis, offsets):
    return nll.forward(x, loc, log_diag, coeffs, offsets, basis=basis)


def backward(grad, x, loc, log_diag, coeffs, basis, offsets):
    """(d/dloc, d/dlog_diag, d/dcoeffs, d/dbasis)."""
    return nll.backward(grad, x, loc, log_diag, coeffs, offsets, basis=basis)
