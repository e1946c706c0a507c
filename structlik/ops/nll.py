"""The per-image NLL (docs/contract.md §1): its ops, formulas and the public, validated ``nll``.

``0.5 ||U (x - loc)||^2 - sum(log_diag) + (C H W / 2) log(2 pi)`` per image. The ops of
``torch.ops.structlik``:

- ``nll`` and its fused gradient ``nll_backward`` (d/dloc, d/dlog_diag, d/doff_diag);
- ``nll_head`` / ``nll_head_backward``: loc, log_diag and off_diag as adjacent channel
  slices of one decoder head (what ``head.split`` gives), whose gradient is written in one
  piece (no copy of three gradients into one by split's backward);
- ``nll_u`` / ``nll_head_u`` (and ``nll_basis_u``, structlik/ops/nll_basis.py): the training forward, which also returns u = U (x - loc) for a
  one-pass backward (``nll_u_backward``, ``nll_head_u_backward``). Only the Triton kernels
  store u (docs/kernels.md §1); elsewhere the plain forward runs.

Kernels: the reference (below, from ``structlik.reference``), C++ ``csrc/nll.cpp`` (CPU;
nll, nll_head and their backwards), Triton ``structlik/kernels/nll.py`` (CUDA; all).
The Triton kernels read float16/bfloat16 themselves; the others get float32 copies.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
from torch import Tensor

from .. import _checks, reference
from ..basis import check_basis
from ..stencil import Stencil
from . import _library
from ._library import compute_dtype, offsets_count, save_inputs, save_inputs_and_u
from .apply_upper import apply_upper_op, apply_upper_t_op
from .weight_grad import weight_grad_op

_ARGS = "Tensor x, Tensor loc, Tensor log_diag, Tensor off_diag"
_HEAD_ARGS = "Tensor x, Tensor head, int c0"


# --- reference kernels: docs/contract.md §1 in plain PyTorch, in the compute dtype ----------

def _residual_u(x, loc, log_diag, off_diag, offsets):
    x, loc, log_diag, off_diag = (t.to(compute_dtype(x)) for t in (x, loc, log_diag, off_diag))
    r = x - loc
    return r, reference.apply_upper(r, log_diag, off_diag, Stencil.from_flat_offsets(offsets))


def _nll_of_u(u: Tensor, log_diag: Tensor) -> Tensor:
    n = math.prod(u.shape[1:])      # (not u[0]: B may be 0)
    return 0.5 * u.square().sum((1, 2, 3)) - log_diag.to(u.dtype).sum((1, 2, 3)) + 0.5 * n * reference.LOG_2PI


def _reference_nll_u(x: Tensor, loc: Tensor, log_diag: Tensor, off_diag: Tensor,
                     offsets: List[int]) -> Tuple[Tensor, Tensor]:
    _, u = _residual_u(x, loc, log_diag, off_diag, offsets)
    return _nll_of_u(u, log_diag), u.contiguous()


def _reference_nll(x: Tensor, loc: Tensor, log_diag: Tensor, off_diag: Tensor, offsets: List[int]) -> Tensor:
    return _reference_nll_u(x, loc, log_diag, off_diag, offsets)[0]


def _reference_grads(grad, x, loc, log_diag, off_diag, offsets):
    """(d/dloc, d/dlog_diag, d/doff_diag) for upstream ``grad`` (B,):
    d/dloc = -g U^T u,  d/ds = g (u r d - 1),  d/dw_{p,i} = g u_p r_{p+delta_i}."""
    stencil = Stencil.from_flat_offsets(offsets)
    r, u = _residual_u(x, loc, log_diag, off_diag, offsets)
    s, w = log_diag.to(u.dtype), off_diag.to(u.dtype)
    g = grad.to(u.dtype)[:, None, None, None]
    grads = (-g * reference.apply_upper_t(u, s, w, stencil), g * (u * r * s.exp() - 1),
             g * reference.weight_grad(u, r, stencil))
    return tuple(t.to(like.dtype).contiguous() for t, like in zip(grads, (loc, log_diag, off_diag)))


def _reference_nll_backward(grad: Tensor, x: Tensor, loc: Tensor, log_diag: Tensor, off_diag: Tensor,
                            offsets: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    return _reference_grads(grad, x, loc, log_diag, off_diag, offsets)


def _reference_nll_u_backward(grad: Tensor, x: Tensor, loc: Tensor, log_diag: Tensor, off_diag: Tensor, u: Tensor,
                              offsets: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    return _reference_grads(grad, x, loc, log_diag, off_diag, offsets)


def head_slices(head: Tensor, c0: int, C: int, S: int) -> Tuple[Tensor, Tensor, Tensor]:
    """loc, log_diag, off_diag as head.split gives them: channels from c0 of one decoder head."""
    return head.narrow(1, c0, C), head.narrow(1, c0 + C, C), head.narrow(1, c0 + 2 * C, S * C)


def head_gradient(head, c0, parts):
    """The head's gradient: ``parts`` (of loc, log_diag, off_diag) at their channels, zero elsewhere
    (a cat: differentiable, for the composed formula too)."""
    rest = head.shape[1] - c0 - sum(p.shape[1] for p in parts)
    return torch.cat([head.new_zeros(head.shape[0], c0, *head.shape[2:]), *parts,
                      head.new_zeros(head.shape[0], rest, *head.shape[2:])], dim=1)


def _reference_nll_head_u(x: Tensor, head: Tensor, c0: int, offsets: List[int]) -> Tuple[Tensor, Tensor]:
    return _reference_nll_u(x, *head_slices(head, c0, x.shape[1], offsets_count(offsets)), offsets)


def _reference_nll_head(x: Tensor, head: Tensor, c0: int, offsets: List[int]) -> Tensor:
    return _reference_nll_head_u(x, head, c0, offsets)[0]


def _reference_nll_head_backward(grad: Tensor, x: Tensor, head: Tensor, c0: int, offsets: List[int]) -> Tensor:
    parts = _reference_grads(grad, x, *head_slices(head, c0, x.shape[1], offsets_count(offsets)), offsets)
    return head_gradient(head, c0, parts)


def _reference_nll_head_u_backward(grad: Tensor, x: Tensor, head: Tensor, c0: int, u: Tensor,
                                   offsets: List[int]) -> Tensor:
    return _reference_nll_head_backward(grad, x, head, c0, offsets)


# --- Triton kernels (CUDA) -----------------------------------------------------------------

def _kernels():
    return _library.triton_kernels("nll")


def _triton_nll(x, loc, log_diag, off_diag, offsets):
    return _kernels().forward(x, loc, log_diag, off_diag, offsets)


def _triton_nll_backward(grad, x, loc, log_diag, off_diag, offsets):
    return _kernels().backward(grad, x, loc, log_diag, off_diag, offsets)


def _triton_nll_u(x, loc, log_diag, off_diag, offsets):
    return _kernels().forward(x, loc, log_diag, off_diag, offsets, with_u=True)


def _triton_nll_u_backward(grad, x, loc, log_diag, off_diag, u, offsets):
    return _kernels().backward(grad, x, loc, log_diag, off_diag, offsets, u=u)


def _triton_nll_head(x, head, c0, offsets):
    return _kernels().forward(x, *head_slices(head, c0, x.shape[1], offsets_count(offsets)), offsets)


def _triton_nll_head_backward(grad, x, head, c0, offsets):
    return _kernels().head_backward(grad, x, head, c0, offsets)


def _triton_nll_head_u(x, head, c0, offsets):
    return _kernels().forward(x, *head_slices(head, c0, x.shape[1], offsets_count(offsets)), offsets, with_u=True)


def _triton_nll_head_u_backward(grad, x, head, c0, u, offsets):
    return _kernels().head_backward(grad, x, head, c0, offsets, u=u)


# --- fake kernels ------------------------------------------------------------------------------

def _fake_nll(x, *rest):
    return x.new_empty(x.shape[0], dtype=compute_dtype(x))


def _fake_nll_u(x, *rest):
    return x.new_empty(x.shape[0], dtype=compute_dtype(x)), x.new_empty(x.shape, dtype=compute_dtype(x))


def _fake_grads(grad, x, loc, log_diag, off_diag, *rest):
    return loc.new_empty(loc.shape), log_diag.new_empty(log_diag.shape), off_diag.new_empty(off_diag.shape)


def _fake_head_grad(grad, x, head, *rest):
    return head.new_empty(head.shape)


# --- the fused backward kernels, and the formulas ------------------------------------------------

_nll_backward = _library.define(f"nll_backward(Tensor grad, {_ARGS}, int[] offsets) -> (Tensor, Tensor, Tensor)",
                                reference=_reference_nll_backward, fake=_fake_grads, triton=_triton_nll_backward)
_nll_u_backward = _library.define(
    f"nll_u_backward(Tensor grad, {_ARGS}, Tensor u, int[] offsets) -> (Tensor, Tensor, Tensor)",
    reference=_reference_nll_u_backward, fake=_fake_grads, triton=_triton_nll_u_backward)
_nll_head_backward = _library.define(f"nll_head_backward(Tensor grad, {_HEAD_ARGS}, int[] offsets) -> Tensor",
                                     reference=_reference_nll_head_backward, fake=_fake_head_grad,
                                     triton=_triton_nll_head_backward)
_nll_head_u_backward = _library.define(
    f"nll_head_u_backward(Tensor grad, {_HEAD_ARGS}, Tensor u, int[] offsets) -> Tensor",
    reference=_reference_nll_head_u_backward, fake=_fake_head_grad, triton=_triton_nll_head_u_backward)


def composed_grads(grad, x, loc, log_diag, off_diag, offsets):
    """The NLL's gradient (d/dloc, d/dlog_diag, d/doff_diag) composed of the library's differentiable
    ops, so that it can itself be differentiated (create_graph: Hessian-vector products, gradient
    penalties). Half inputs are computed in float32, as the fused kernels do."""
    dtype = loc.dtype
    x, loc, log_diag, off_diag = _library.upcast(x, loc, log_diag, off_diag)
    g = grad.to(x.dtype)[:, None, None, None]
    r = x - loc
    u = apply_upper_op(r, log_diag, off_diag, offsets)
    grads = (-g * apply_upper_t_op(u, log_diag, off_diag, offsets), g * (u * r * log_diag.exp() - 1),
             g * weight_grad_op(u, r, offsets))
    return tuple(t.to(dtype) for t in grads)


def fused() -> bool:
    """The fused backward kernels run unless a graph of the gradient is being built (create_graph)."""
    return not torch.is_grad_enabled()


def x_and_loc_grads(gloc, need):
    """d/dx is the negative of d/dloc, formed only when x needs a gradient (data never does)."""
    return (-gloc if need[0] else None), (gloc if need[1] else None)


def _grads(ctx, grad, x, loc, log_diag, off_diag, u=None):
    need = ctx.needs_input_grad
    if fused() and u is not None:        # u: what the training forward stored
        gloc, gs, gw = _nll_u_backward(grad, x, loc, log_diag, off_diag, u, ctx.offsets)
    elif fused():
        gloc, gs, gw = _nll_backward(grad, x, loc, log_diag, off_diag, ctx.offsets)
    else:
        gloc, gs, gw = composed_grads(grad, x, loc, log_diag, off_diag, ctx.offsets)
    return (*x_and_loc_grads(gloc, need), gs if need[2] else None, gw if need[3] else None, None)


def _nll_formula(ctx, grad):
    return _grads(ctx, grad, *ctx.saved_tensors)


def _head_grads(ctx, grad, x, head, u=None):
    need = ctx.needs_input_grad
    c0, C, S = ctx.c0, x.shape[1], offsets_count(ctx.offsets)
    if fused() and u is not None:
        grad_head = _nll_head_u_backward(grad, x, head, c0, u, ctx.offsets)
    elif fused():
        grad_head = _nll_head_backward(grad, x, head, c0, ctx.offsets)
    else:
        grad_head = head_gradient(head, c0, composed_grads(grad, x, *head_slices(head, c0, C, S), ctx.offsets))
    grad_x = -grad_head.narrow(1, c0, C) if need[0] else None
    return grad_x, grad_head if need[1] else None, None, None


def _save_head(ctx, inputs, output):
    x, head, c0, offsets = inputs
    ctx.save_for_backward(x, head)
    ctx.c0, ctx.offsets = c0, offsets


def _nll_head_formula(ctx, grad):
    return _head_grads(ctx, grad, *ctx.saved_tensors)


def _nll_u_formula(ctx, grad, _grad_u):
    if grad is None:        # not materialised: nothing flows back (gradcheck's undefined-grad check)
        return None, None, None, None, None
    return _grads(ctx, grad, *ctx.saved_tensors)


def _save_head_and_u(ctx, inputs, output):
    x, head, c0, offsets = inputs
    ctx.save_for_backward(x, head, output[1])
    ctx.c0, ctx.offsets = c0, offsets
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _nll_head_u_formula(ctx, grad, _grad_u):
    if grad is None:
        return None, None, None, None
    return _head_grads(ctx, grad, *ctx.saved_tensors)


_nll = _library.define(f"nll({_ARGS}, int[] offsets) -> Tensor", reference=_reference_nll, fake=_fake_nll,
                       triton=_triton_nll, backward=_nll_formula, setup_context=save_inputs)
_nll_u = _library.define(f"nll_u({_ARGS}, int[] offsets) -> (Tensor, Tensor)", reference=_reference_nll_u,
                         fake=_fake_nll_u, triton=_triton_nll_u, backward=_nll_u_formula,
                         setup_context=save_inputs_and_u)
_nll_head = _library.define(f"nll_head({_HEAD_ARGS}, int[] offsets) -> Tensor", reference=_reference_nll_head,
                            fake=_fake_nll, triton=_triton_nll_head, backward=_nll_head_formula,
                            setup_context=_save_head)
_nll_head_u = _library.define(f"nll_head_u({_HEAD_ARGS}, int[] offsets) -> (Tensor, Tensor)",
                              reference=_reference_nll_head_u, fake=_fake_nll_u, triton=_triton_nll_head_u,
                              backward=_nll_head_u_formula, setup_context=_save_head_and_u)


# --- what the public functions call ------------------------------------------------------------

def stores_u(backend: str, *tensors) -> bool:
    """Take the training forward: its kernels store u (Triton's), and a gradient will be taken.
    Not while tracing: torch.jit.trace's check run is under no_grad, and must record the same op."""
    return (backend == "triton" and torch.is_grad_enabled() and not torch.jit.is_tracing()
            and any(t.requires_grad for t in tensors))


def nll_op(x, loc, log_diag, off_diag, offsets, backend: str = "cpu"):
    """The differentiable NLL op, unvalidated (the training forward where ``backend`` stores u)."""
    if stores_u(backend, x, loc, log_diag, off_diag):
        return _nll_u(x, loc, log_diag, off_diag, offsets)[0]
    return _nll(x, loc, log_diag, off_diag, offsets)


def nll_head_op(x, head, c0, offsets, backend: str = "cpu"):
    if stores_u(backend, x, head):
        return _nll_head_u(x, head, c0, offsets)[0]
    return _nll_head(x, head, c0, offsets)


def reads_half(backend: str) -> bool:
    """The Triton NLL kernels read float16/bfloat16 (half the bytes of an upcast copy)."""
    return backend == "triton"


def head_of(loc, log_diag, off_diag):
    """(head, c0) when loc, log_diag and off_diag are channels [c0, c0 + C), [c0 + C, c0 + 2C)
    and [c0 + 2C, c0 + (2 + S)C) of one tensor that needs a gradient, each slice taken where
    autograd records it (what ``head.split`` gives), else None. The NLL then takes the head
    itself, and its backward writes the head's gradient in one piece instead of three
    gradients that autograd's backward of the split copies into one (a pass over all of
    them: 1.6 ms of 4.1 at B64 64x64 radius 3 on a 2-core CPU, benchmarks/RESULTS.md)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._functorch.is_functorch_wrapped_tensor(loc)):
        # plain views there: a transformed view's _base is not the transformed head, and a trace's
        # second run (check_trace) sees views whose _base it did not record: one graph for both
        return None
    parts = (loc, log_diag, off_diag)
    if any(t.grad_fn is None or t.retains_grad or t._backward_hooks for t in parts):
        # A view made under torch.no_grad() has no grad_fn (yet says requires_grad): autograd
        # sends it nothing, so neither may the head. A retained gradient or a hook on a slice
        # must see that slice's own gradient, which the head path never forms.
        return None
    head = loc._base
    if (head is None or log_diag._base is not head or off_diag._base is not head or head.dim() != 4
            or not head.requires_grad or not torch.is_grad_enabled()
            or head.dtype not in (torch.float32, torch.float64)):
        return None
    B, C, H, W = loc.shape
    if head.shape[0] != B or tuple(head.shape[2:]) != (H, W) or any(
            t.stride() != head.stride() for t in (loc, log_diag, off_diag)):
        return None
    step = head.stride(1)
    c0, rest = divmod(loc.storage_offset() - head.storage_offset(), step) if step > 0 else (0, 1)
    if (rest or log_diag.storage_offset() != loc.storage_offset() + C * step
            or off_diag.storage_offset() != loc.storage_offset() + 2 * C * step):
        return None
    return head, c0


def checked_nll(x_name: str, x, loc, log_diag, off_diag, stencil, *, basis=None):
    """The NLL (``basis``: with a learned basis, off_diag then being its coefficients),
    with the data tensor called ``x_name`` in errors (``value`` for log_prob)."""
    from .. import backends
    from .nll_basis import nll_basis_op
    _checks.check_stencil(stencil)
    off_name = "off_diag" if basis is None else "coeffs"
    if basis is None:
        per_channel, layout = stencil.S, f"(B, C*S, H, W) with S={stencil.S}"
    else:
        _checks.check_float_tensor(x_name, x, "(B, C, H, W)")
        per_channel = check_basis(basis, stencil, device=x.device)
        layout = f"(B, C*n_b, H, W) with n_b={per_channel}"
    _checks.check_against_image(x_name, x, stencil, (("loc", loc, 1, "(B, C, H, W)"),
                                                     ("log_diag", log_diag, 1, "(B, C, H, W)"),
                                                     (off_name, off_diag, per_channel, layout)))
    backend = backends.name_of(x.device)
    inputs = {x_name: x, "loc": loc, "log_diag": log_diag, off_name: off_diag, **({} if basis is None else
                                                                                 {"basis": basis})}
    if basis is None:
        x, loc, log_diag, off_diag = _checks.promote(x, loc, log_diag, off_diag)
    else:
        x, loc, log_diag, off_diag, basis = _checks.promote(x, loc, log_diag, off_diag, basis)
    head = head_of(loc, log_diag, off_diag) if basis is None else None
    tensors = (x, loc, log_diag, off_diag) + (() if basis is None else (basis,))
    if not reads_half(backend):
        tensors = _library.upcast(*tensors)
    if head is not None:
        out = nll_head_op(x, *head, stencil.flat_offsets, backend)
    elif basis is None:
        out = nll_op(*tensors, stencil.flat_offsets, backend)
    else:
        out = nll_basis_op(*tensors, stencil.flat_offsets, backend)
    _checks.check_result(out, inputs, op="nll" if basis is None else "nll_basis")
    return out


def nll(x: torch.Tensor, loc: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor,
        stencil: Stencil) -> torch.Tensor:
    """Per-image negative log-likelihood, shape (B,):

    ``0.5 * ||U (x - loc)||^2 - sum(log_diag) + (C*H*W / 2) * log(2 pi)``.
    """
    return checked_nll("x", x, loc, log_diag, off_diag, stencil)
