"""The Triton backend: the kernels of structlik/kernels as torch.ops.structlik_triton.*.

``backend`` has the interface of ``structlik.reference``. Each op is a
``torch.library.custom_op`` (opaque to torch.compile, which
traces it through the fake kernels of ``structlik._autograd`` without a graph
break or a host sync) with the autograd formulas shared with the C++ backend.
The kernels run on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1
(how CI tests them). ``triton.language`` is imported here, never by
``import structlik``, so a machine without Triton or a GPU imports fine.

Why ``custom_op`` and not ``torch.library.triton_op`` (which would let inductor
see into the kernels): under ``TRITON_INTERPRET=1``, how CI runs these
kernels, a ``triton_op`` works eagerly, but ``torch.compile`` traces its body
with fake tensors and ``wrap_triton`` of an interpreted kernel reads their data
pointers ("Cannot access data pointer of Tensor (e.g. FakeTensor)"; triton
3.6.0, torch 2.13.0). Registering ``triton_op`` only on CUDA would leave that
path untested until a GPU session can run it.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from . import _autograd
from .kernels import apply_upper as _apply
from .kernels import nll as _nll
from .kernels import nll_basis as _nll_basis
from .kernels import precision_diagonal as _precision
from .kernels import solve_upper as _solve
from .kernels import weight_grad as _weight_grad

NAMESPACE = "structlik_triton"


def _op(name):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())


@_op("apply_upper")
def _apply_upper(r: Tensor, log_diag: Tensor, off_diag: Tensor, offsets: List[int]) -> Tensor:
    return _apply.launch(r, log_diag, off_diag, offsets, transposed=False)


@_op("apply_upper_t")
def _apply_upper_t(y: Tensor, log_diag: Tensor, off_diag: Tensor, offsets: List[int]) -> Tensor:
    return _apply.launch(y, log_diag, off_diag, offsets, transposed=True)


@_op("solve_upper")
def _solve_upper(z: Tensor, log_diag: Tensor, off_diag: Tensor, offsets: List[int]) -> Tensor:
    return _solve.launch(z, log_diag, off_diag, offsets, transposed=False)


@_op("solve_upper_t")
def _solve_upper_t(g: Tensor, log_diag: Tensor, off_diag: Tensor, offsets: List[int]) -> Tensor:
    return _solve.launch(g, log_diag, off_diag, offsets, transposed=True)


@_op("weight_grad")
def _weight_grad_op(a: Tensor, b: Tensor, offsets: List[int]) -> Tensor:
    return _weight_grad.launch(a, b, offsets)


@_op("precision_diagonal")
def _precision_diagonal(log_diag: Tensor, off_diag: Tensor, offsets: List[int]) -> Tensor:
    return _precision.launch(log_diag, off_diag, offsets)


@_op("nll")
def _nll_op(x: Tensor, loc: Tensor, log_diag: Tensor, off_diag: Tensor, offsets: List[int]) -> Tensor:
    return _nll.forward(x, loc, log_diag, off_diag, offsets)


@_op("nll_backward")
def _nll_backward(grad: Tensor, x: Tensor, loc: Tensor, log_diag: Tensor, off_diag: Tensor,
                  offsets: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    return _nll.backward(grad, x, loc, log_diag, off_diag, offsets)


# The training forward: the NLL and u = U (x - loc), which the one-pass backward reads
# (structlik/kernels/nll.py has the bytes this saves). ``OpsBackend`` calls these when a
# gradient will be taken; u is an auxiliary output, not differentiable.
@_op("nll_u")
def _nll_u(x: Tensor, loc: Tensor, log_diag: Tensor, off_diag: Tensor, offsets: List[int]) -> Tuple[Tensor, Tensor]:
    return _nll.forward(x, loc, log_diag, off_diag, offsets, with_u=True)


@_op("nll_u_backward")
def _nll_u_backward(grad: Tensor, x: Tensor, loc: Tensor, log_diag: Tensor, off_diag: Tensor, u: Tensor,
                    offsets: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    return _nll.backward(grad, x, loc, log_diag, off_diag, offsets, u=u)


@_op("nll_head_u")
def _nll_head_u(x: Tensor, head: Tensor, c0: int, offsets: List[int]) -> Tuple[Tensor, Tensor]:
    return _nll.forward(x, *_nll.head_slices(head, c0, x.shape[1], len(offsets) // 2), offsets, with_u=True)


@_op("nll_head_u_backward")
def _nll_head_u_backward(grad: Tensor, x: Tensor, head: Tensor, c0: int, u: Tensor, offsets: List[int]) -> Tensor:
    return _nll.head_backward(grad, x, head, c0, offsets, u=u)


@_op("nll_head")
def _nll_head(x: Tensor, head: Tensor, c0: int, offsets: List[int]) -> Tensor:
    return _nll.forward(x, *_nll.head_slices(head, c0, x.shape[1], len(offsets) // 2), offsets)


@_op("nll_head_backward")
def _nll_head_backward(grad: Tensor, x: Tensor, head: Tensor, c0: int, offsets: List[int]) -> Tensor:
    return _nll.head_backward(grad, x, head, c0, offsets)


@_op("nll_basis")
def _nll_basis_op(x: Tensor, loc: Tensor, log_diag: Tensor, coeffs: Tensor, basis: Tensor,
                  offsets: List[int]) -> Tensor:
    return _nll_basis.forward(x, loc, log_diag, coeffs, basis, offsets)


@_op("nll_basis_backward")
def _nll_basis_backward(grad: Tensor, x: Tensor, loc: Tensor, log_diag: Tensor, coeffs: Tensor, basis: Tensor,
                        offsets: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _nll_basis.backward(grad, x, loc, log_diag, coeffs, basis, offsets)


# The NLL kernels load float16/bfloat16 directly (half the bytes of an upcast copy) and accumulate in float32.
backend = _autograd.OpsBackend(NAMESPACE, half_nll=True)
