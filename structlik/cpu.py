"""The CPU backend: fused C++ kernels from csrc/, registered as torch.ops.structlik_cpu.*.

Importing this module loads the compiled extension (ImportError if it was not
built) and registers the fake kernels and autograd formulas of
``structlik._autograd``. The functions below have the backend interface of
``structlik.reference``: the stencil is passed as an object and flattened here.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: registers the ops' schemas and CPU kernels)
from . import _autograd

__all__ = ["apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t", "nll", "nll_basis", "precision_diagonal"]

NAMESPACE = "structlik_cpu"
_autograd.register(NAMESPACE)
_ops = torch.ops.structlik_cpu


def apply_upper(r, log_diag, off_diag, stencil):
    return _ops.apply_upper(r, log_diag, off_diag, stencil.flat_offsets)


def apply_upper_t(y, log_diag, off_diag, stencil):
    return _ops.apply_upper_t(y, log_diag, off_diag, stencil.flat_offsets)


def solve_upper(z, log_diag, off_diag, stencil):
    return _ops.solve_upper(z, log_diag, off_diag, stencil.flat_offsets)


def solve_upper_t(g, log_diag, off_diag, stencil):
    return _ops.solve_upper_t(g, log_diag, off_diag, stencil.flat_offsets)


def nll(x, loc, log_diag, off_diag, stencil):
    return _ops.nll(x, loc, log_diag, off_diag, stencil.flat_offsets)


def nll_basis(x, loc, log_diag, coeffs, basis, stencil):
    return _ops.nll_basis(x, loc, log_diag, coeffs, basis, stencil.flat_offsets)


def precision_diagonal(log_diag, off_diag, stencil):
    return _ops.precision_diagonal(log_diag, off_diag, stencil.flat_offsets)
