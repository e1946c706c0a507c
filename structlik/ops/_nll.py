"""The NLL family (docs/contract.md §1): four ops, their formulas and the public ``nll``, ``nll_basis``.

``0.5 ||U (x - loc)||^2 - sum(log_diag) + (C H W / 2) log(2 pi)`` per image. The variants are
arguments of one forward and one backward, for each of the two ways the parameters arrive:

- ``nll(x, loc, log_diag, off_diag, basis?, offsets, store_u) -> (nll, u)`` and its fused
  gradient ``nll_backward(grad, x, loc, log_diag, off_diag, basis?, u, offsets)`` -> (d/dloc,
  d/dlog_diag, d/doff_diag, d/dbasis). With ``basis`` (S, n_b), ``off_diag`` holds its
  coefficients (B, C*n_b, H, W) and the weights are formed inside the kernels (paper section
  4.3); without it the fourth gradient is an empty (0,) tensor.
- ``nll_head(x, head, c0, offsets, store_u)`` / ``nll_head_backward``: loc, log_diag and off_diag
  as adjacent channel slices of one decoder head (what ``head.split`` gives), whose gradient is
  written in one piece (no copy of three gradients into one by split's backward).

``store_u`` (a gradient will be taken): the forward also returns u = U (x - loc), which the
backward reads instead of computing it again; otherwise u is an empty (0,) tensor and the backward
computes it. Every backend honours the flag the same way, so the dispatcher alone chooses the
kernel. Kernels: the reference (structlik.reference), C++ ``csrc/nll.cpp`` (CPU), Triton
``structlik/kernels/nll.py`` (CUDA); each reads float16/bfloat16 (structlik/_dtypes.py).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _bound, _checks, reference
from .._dtypes import compute_dtype, upcast
from ..basis import check_basis
from ..head import bound_coupled_weights, check_bound
from ..stencil import Stencil
from . import _forced, _library
from ._apply_upper import apply_upper_op, apply_upper_t_op
from ._library import offsets_count
from ._weight_grad import weight_grad_op

_ARGS = "Tensor x, Tensor loc, Tensor log_diag, Tensor off_diag, Tensor? basis"
_HEAD_ARGS = "Tensor x, Tensor head, int c0"


def placeholder(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The empty (0,) tensor that stands for an output not formed (u not stored, no basis gradient)."""
    return like.new_empty(0, dtype=dtype or like.dtype)


def head_slices(head: Tensor, c0: int, C: int, S: int, cross: bool = False) -> Tuple[Tensor, ...]:
    """loc, log_diag, off_diag (and the cross weights) as head.split gives them: channels from c0
    of one decoder head."""
    parts = (head.narrow(1, c0, C), head.narrow(1, c0 + C, C), head.narrow(1, c0 + 2 * C, S * C))
    return parts + ((head.narrow(1, c0 + (2 + S) * C, C * (C - 1) // 2),) if cross else (None,))


def head_gradient(head, c0, parts):
    """The head's gradient: ``parts`` (of loc, log_diag, off_diag) at their channels, zero elsewhere
    (a cat: differentiable, for the composed formula too)."""
    rest = head.shape[1] - c0 - sum(p.shape[1] for p in parts)
    return torch.cat([head.new_zeros(head.shape[0], c0, *head.shape[2:]), *parts,
                      head.new_zeros(head.shape[0], rest, *head.shape[2:])], dim=1)


# --- reference kernels: structlik.reference in the compute dtype ------------------------------

def _computed(x, loc, log_diag, off_diag, basis, cross=None, bound=0.0):
    """The operands in the compute dtype, with the weights materialised from a basis, or bounded
    from raw weights (``bound`` > 0)."""
    x, loc, log_diag, off_diag = (t.to(compute_dtype(x)) for t in (x, loc, log_diag, off_diag))
    weights = off_diag if basis is None else reference.expand_basis(off_diag, basis.to(x.dtype))
    if bound:
        weights = _bound.bounded(log_diag, weights, bound)
    return x, loc, log_diag, weights, None if cross is None else cross.to(x.dtype)


def _reference(x: Tensor, loc: Tensor, log_diag: Tensor, off_diag: Tensor, basis: Optional[Tensor],
               offsets: List[int], store_u: bool, cross: Optional[Tensor] = None,
               bound: float = 0.0) -> Tuple[Tensor, Tensor]:
    xc, lc, s, w, xi = _computed(x, loc, log_diag, off_diag, basis, cross, bound)
    nll, u = reference.nll_and_u(xc, lc, s, w, Stencil.from_flat_offsets(offsets), xi)
    return nll, (u.contiguous() if store_u else placeholder(x, nll.dtype))


def _basis_grads(gw, coeffs, basis):
    """From the weights' gradient gw (B, C*S, H, W): d/dcoeffs_j = sum_i basis_ij gw_i and
    d/dbasis_ij = <gw_i, coeffs_j> over every pixel."""
    B, _, H, W = gw.shape
    S, nb = basis.shape
    gw = gw.reshape(B, -1, S, H, W)
    c = coeffs.reshape(B, -1, nb, H, W)
    gc = torch.einsum("ij,bcihw->bcjhw", basis.to(gw.dtype), gw).reshape(coeffs.shape).to(coeffs.dtype)
    gb = torch.einsum("bcihw,bcjhw->ij", gw, c.to(gw.dtype)).to(basis.dtype)
    return gc, gb


def _reference_backward(grad: Tensor, x: Tensor, loc: Tensor, log_diag: Tensor, off_diag: Tensor,
                        basis: Optional[Tensor], u: Tensor, offsets: List[int],
                        cross: Optional[Tensor] = None, bound: float = 0.0) -> Tuple[Tensor, ...]:
    """d/dloc = -g M^T u,  d/ds = g (u r d - 1),  d/dw_{p,i} = g u_p r_{p+delta_i},
    d/dxi_{kappa(c,j),p} = g u_{c,p} r_{j,p} (u recomputed: the reference's one formula, whatever
    the forward stored); with ``bound``, chained to the raw weights (structlik._bound)."""
    stencil = Stencil.from_flat_offsets(offsets)
    xc, lc, s, w, xi = _computed(x, loc, log_diag, off_diag, basis, cross, bound)
    r = xc - lc
    u = reference.apply_upper(r, s, w, stencil, xi)
    g = grad.to(u.dtype)[:, None, None, None]
    gloc, gs = -g * reference.apply_upper_t(u, s, w, stencil, xi), g * (u * r * s.exp() - 1)
    gw = g * reference.weight_grad(u, r, stencil)
    if bound:
        gw, gs_w = _bound.chain(gw, s, off_diag.to(s.dtype), bound)
        gs = gs + gs_w
    gw, gb = (gw.to(off_diag.dtype), placeholder(off_diag)) if basis is None else _basis_grads(gw, off_diag, basis)
    gx = placeholder(x) if cross is None else (g * reference.cross_grad(u, r)).to(cross.dtype).contiguous()
    return (gloc.to(loc.dtype).contiguous(), gs.to(log_diag.dtype).contiguous(), gw.contiguous(), gb.contiguous(),
            gx)


def _reference_head(x: Tensor, head: Tensor, c0: int, offsets: List[int], store_u: bool,
                    cross: bool = False, bound: float = 0.0) -> Tuple[Tensor, Tensor]:
    loc, log_diag, off_diag, xi = head_slices(head, c0, x.shape[1], offsets_count(offsets), cross)
    return _reference(x, loc, log_diag, off_diag, None, offsets, store_u, xi, bound)


def _reference_head_backward(grad: Tensor, x: Tensor, head: Tensor, c0: int, u: Tensor, offsets: List[int],
                             cross: bool = False, bound: float = 0.0) -> Tensor:
    loc, log_diag, off_diag, xi = head_slices(head, c0, x.shape[1], offsets_count(offsets), cross)
    grads = _reference_backward(grad, x, loc, log_diag, off_diag, None, u, offsets, xi, bound)
    return head_gradient(head, c0, grads[:3] + ((grads[4],) if cross else ()))


# --- Triton kernels (CUDA): structlik/kernels/nll.py, imported at the first call ----------------

# The bound flag on CUDA: the Triton kernels take bounded weights, formed around them in PyTorch
# (structlik._bound, in the compute dtype); bounding inside the Triton sweep waits for a GPU to
# measure it on (the C++ kernel bounds inside its sweep).

def _triton(x, loc, log_diag, off_diag, basis, offsets, store_u, cross=None, bound=0.0):
    if bound:
        x, loc, log_diag, off_diag = upcast(x, loc, log_diag, off_diag)
        off_diag = _bound.bounded(log_diag, off_diag, bound)
    return _library.triton_kernels("nll").nll(x, loc, log_diag, off_diag, basis, offsets, store_u, cross)


def _triton_backward(grad, x, loc, log_diag, off_diag, basis, u, offsets, cross=None, bound=0.0):
    kernels = _library.triton_kernels("nll")
    if not bound:
        return kernels.nll_backward(grad, x, loc, log_diag, off_diag, basis, u, offsets, cross)
    dtypes = (loc.dtype, log_diag.dtype, off_diag.dtype)
    x, loc, log_diag, raw = upcast(x, loc, log_diag, off_diag)
    gloc, gs, gw, gb, gx = kernels.nll_backward(grad, x, loc, log_diag, _bound.bounded(log_diag, raw, bound), basis,
                                                u, offsets, cross)
    graw, gs_w = _bound.chain(gw, log_diag, raw, bound)
    return gloc.to(dtypes[0]), (gs + gs_w).to(dtypes[1]), graw.to(dtypes[2]).contiguous(), gb, gx


def _triton_head(x, head, c0, offsets, store_u, cross=False, bound=0.0):
    C, S = x.shape[1], offsets_count(offsets)
    loc, log_diag, off_diag, xi = head_slices(head, c0, C, S, cross)
    return _triton(x, loc, log_diag, off_diag, None, offsets, store_u, xi, bound)


def _triton_head_backward(grad, x, head, c0, u, offsets, cross=False, bound=0.0):
    if not bound:
        return _library.triton_kernels("nll").nll_head_backward(grad, x, head, c0, u, offsets, cross)
    loc, log_diag, off_diag, xi = head_slices(head, c0, x.shape[1], offsets_count(offsets), cross)
    grads = _triton_backward(grad, x, loc, log_diag, off_diag, None, u, offsets, xi, bound)
    return head_gradient(head, c0, grads[:3] + ((grads[4],) if cross else ()))


# --- fake kernels ------------------------------------------------------------------------------

def _fake(x, loc, log_diag, off_diag, basis, offsets, store_u, cross=None, bound=0.0):
    dtype = compute_dtype(x)
    return x.new_empty(x.shape[0], dtype=dtype), x.new_empty(x.shape if store_u else (0,), dtype=dtype)


def _fake_head(x, head, c0, offsets, store_u, cross=False, bound=0.0):
    return _fake(x, None, None, None, None, offsets, store_u)


def _fake_backward(grad, x, loc, log_diag, off_diag, basis, u, offsets, cross=None, bound=0.0):
    return (loc.new_empty(loc.shape), log_diag.new_empty(log_diag.shape), off_diag.new_empty(off_diag.shape),
            placeholder(off_diag) if basis is None else basis.new_empty(basis.shape),
            placeholder(x) if cross is None else cross.new_empty(cross.shape))


def _fake_head_backward(grad, x, head, *rest):
    return head.new_empty(head.shape)


# --- the fused backward ops, and the formulas ------------------------------------------------------

def _basis_is_given(args) -> bool:
    """vmap: the basis gradient sums over every image, so the backward runs once per vmapped slice."""
    return args["basis"] is not None


_nll_backward = _library.define(
    f"nll_backward(Tensor grad, {_ARGS}, Tensor u, int[] offsets, Tensor? cross=None, float bound=0.0) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor)",
    reference=_reference_backward, fake=_fake_backward, triton=_triton_backward, per_slice_vmap=_basis_is_given)
_nll_head_backward = _library.define(
    f"nll_head_backward(Tensor grad, {_HEAD_ARGS}, Tensor u, int[] offsets, bool cross=False, "
    "float bound=0.0) -> Tensor",
    reference=_reference_head_backward, fake=_fake_head_backward, triton=_triton_head_backward)


def composed_grads(grad, x, loc, log_diag, off_diag, offsets, cross=None):
    """The NLL's gradient (d/dloc, d/dlog_diag, d/doff_diag, and d/dcross with cross weights)
    composed of the library's differentiable ops, so that it can itself be differentiated
    (create_graph: Hessian-vector products, gradient penalties). Half inputs are computed in
    float32, as the fused kernels do."""
    dtype = loc.dtype
    x, loc, log_diag, off_diag = upcast(x, loc, log_diag, off_diag)
    xi = None if cross is None else cross.to(x.dtype)
    g = grad.to(x.dtype)[:, None, None, None]
    r = x - loc
    u = apply_upper_op(r, log_diag, off_diag, offsets, xi)
    grads = (-g * apply_upper_t_op(u, log_diag, off_diag, offsets, xi), g * (u * r * log_diag.exp() - 1),
             g * weight_grad_op(u, r, offsets, u.shape[0]))
    if xi is not None:
        grads = grads + (g * reference.cross_grad(u, r),)
    return tuple(t.to(dtype) for t in grads)


def bounded_composed_grads(grad, x, loc, log_diag, raw, offsets, bound):
    """composed_grads for raw weights bounded by ``bound``: (d/dloc, d/dlog_diag, d/draw), composed
    of differentiable ops (structlik._bound's chain rule is plain PyTorch)."""
    dtype = raw.dtype
    x, loc, log_diag, raw = upcast(x, loc, log_diag, raw)
    gloc, gs, gw = composed_grads(grad, x, loc, log_diag, _bound.bounded(log_diag, raw, bound), offsets)
    graw, gs_w = _bound.chain(gw, log_diag, raw, bound)
    return gloc.to(dtype), (gs + gs_w).to(dtype), graw.to(dtype)


def fused() -> bool:
    """The fused backward kernels run unless a graph of the gradient is being built (create_graph)."""
    return not torch.is_grad_enabled()


def _save(ctx, inputs, output):
    """Every tensor input and u (auxiliary: not differentiable, its gradient never materialised)."""
    x, loc, log_diag, off_diag, basis, offsets, _ = inputs[:7]
    ctx.save_for_backward(x, loc, log_diag, off_diag, basis, inputs[7] if len(inputs) > 7 else None, output[1])
    ctx.offsets, ctx.inputs = offsets, len(inputs)
    ctx.bound = inputs[8] if len(inputs) > 8 else 0.0
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _formula(ctx, grad, _grad_u):
    if grad is None:        # not materialised: nothing flows back (gradcheck's undefined-grad check)
        return (None,) * ctx.inputs
    x, loc, log_diag, off_diag, basis, cross, u = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx = None
    if fused():
        gloc, gs, gw, gb, gx = (_nll_backward(grad, x, loc, log_diag, off_diag, basis, u, ctx.offsets, cross, ctx.bound)
                                if ctx.bound else
                                _nll_backward(grad, x, loc, log_diag, off_diag, basis, u, ctx.offsets, cross))
    elif ctx.bound:
        gloc, gs, gw, *rest = bounded_composed_grads(grad, x, loc, log_diag, off_diag, ctx.offsets, ctx.bound)
    elif basis is None:
        gloc, gs, gw, *rest = composed_grads(grad, x, loc, log_diag, off_diag, ctx.offsets, cross)
    else:
        gloc, gs, gw_full, *rest = composed_grads(grad, x, loc, log_diag, reference.expand_basis(off_diag, basis),
                                                  ctx.offsets, cross)
        gw, gb = _basis_grads(gw_full, off_diag, basis)
    if not fused() and cross is not None:
        gx = rest[0]
    # d/dx is the negative of d/dloc, formed only when x needs a gradient (data never does)
    return (-gloc if need[0] else None, gloc if need[1] else None, gs if need[2] else None,
            gw if need[3] else None, gb if basis is not None and need[4] else None, None, None,
            gx if cross is not None and need[7] else None, None)[:ctx.inputs]


def _save_head(ctx, inputs, output):
    x, head, c0, offsets = inputs[:4]
    ctx.save_for_backward(x, head, output[1])
    ctx.c0, ctx.offsets = c0, offsets
    ctx.cross, ctx.inputs = bool(inputs[5]) if len(inputs) > 5 else False, len(inputs)
    ctx.bound = inputs[6] if len(inputs) > 6 else 0.0
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _head_formula(ctx, grad, _grad_u):
    if grad is None:
        return (None,) * ctx.inputs
    x, head, u = ctx.saved_tensors
    c0, C, S = ctx.c0, x.shape[1], offsets_count(ctx.offsets)
    if fused():
        grad_head = (_nll_head_backward(grad, x, head, c0, u, ctx.offsets, ctx.cross, ctx.bound) if ctx.bound else
                     _nll_head_backward(grad, x, head, c0, u, ctx.offsets, ctx.cross))
    elif ctx.bound:
        loc, log_diag, off_diag, _ = head_slices(head, c0, C, S, False)
        grad_head = head_gradient(head, c0, bounded_composed_grads(grad, x, loc, log_diag, off_diag, ctx.offsets,
                                                                   ctx.bound))
    else:
        loc, log_diag, off_diag, xi = head_slices(head, c0, C, S, ctx.cross)
        grad_head = head_gradient(head, c0, composed_grads(grad, x, loc, log_diag, off_diag, ctx.offsets, xi))
    grad_x = -grad_head.narrow(1, c0, C) if ctx.needs_input_grad[0] else None
    return (grad_x, grad_head if ctx.needs_input_grad[1] else None, None, None, None, None, None)[:ctx.inputs]


_nll = _library.define(f"nll({_ARGS}, int[] offsets, bool store_u, Tensor? cross=None, float bound=0.0) -> "
                       "(Tensor, Tensor)",
                       reference=_reference, fake=_fake, triton=_triton, backward=_formula, setup_context=_save)
_nll_head = _library.define(f"nll_head({_HEAD_ARGS}, int[] offsets, bool store_u, bool cross=False, "
                            "float bound=0.0) -> (Tensor, Tensor)",
                            reference=_reference_head, fake=_fake_head, triton=_triton_head, backward=_head_formula,
                            setup_context=_save_head)


# --- what the public functions call ------------------------------------------------------------

def wants_u(*tensors) -> bool:
    """Whether a gradient will be taken, so the forward should store u for the backward. Not while
    tracing: torch.jit.trace's check run is under no_grad, and must record the same arguments."""
    return (torch.is_grad_enabled() and not torch.jit.is_tracing()
            and any(t is not None and t.requires_grad for t in tensors))


def nll_op(x, loc, log_diag, off_diag, basis, offsets, cross=None, bound=0.0):
    """The differentiable NLL, (B,), unvalidated: u stored where a gradient will be taken;
    ``bound`` > 0: off_diag holds raw weights, bounded inside the kernel (structlik._bound)."""
    store_u = wants_u(x, loc, log_diag, off_diag, basis, cross)
    if bound:
        return _nll(x, loc, log_diag, off_diag, basis, offsets, store_u, cross, bound)[0]
    if cross is None:
        return _nll(x, loc, log_diag, off_diag, basis, offsets, store_u)[0]
    return _nll(x, loc, log_diag, off_diag, basis, offsets, store_u, cross)[0]


def nll_head_op(x, head, c0, offsets, cross=False, bound=0.0):
    if bound:
        return _nll_head(x, head, c0, offsets, wants_u(x, head), cross, bound)[0]
    if not cross:
        return _nll_head(x, head, c0, offsets, wants_u(x, head))[0]
    return _nll_head(x, head, c0, offsets, wants_u(x, head), True)[0]


def head_of(loc, log_diag, off_diag, cross=None):
    """(head, c0) when loc, log_diag and off_diag are channels [c0, c0 + C), [c0 + C, c0 + 2C)
    and [c0 + 2C, c0 + (2 + S)C) of one tensor that needs a gradient (and the cross weights, if
    given, the C(C-1)/2 channels after them), each slice taken where
    autograd records it (what ``head.split`` gives), else None. The NLL then takes the head
    itself, and its backward writes the head's gradient in one piece instead of three
    gradients that autograd's backward of the split copies into one (a pass over all of
    them: 1.6 ms of 4.1 at B64 64x64 radius 3 on a 2-core CPU, benchmarks/RESULTS.md)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._functorch.is_functorch_wrapped_tensor(loc)):
        # plain views there: a transformed view's _base is not the transformed head, and a trace's
        # second run (check_trace) sees views whose _base it did not record: one graph for both
        return None
    parts = (loc, log_diag, off_diag) + (() if cross is None else (cross,))
    if any(t.grad_fn is None or t.retains_grad or t._backward_hooks for t in parts):
        # A view made under torch.no_grad() has no grad_fn (yet says requires_grad): autograd
        # sends it nothing, so neither may the head. A retained gradient or a hook on a slice
        # must see that slice's own gradient, which the head path never forms.
        return None
    head = loc._base
    if (head is None or any(t._base is not head for t in parts[1:]) or head.dim() != loc.dim()
            or head.dim() not in (4, 5) or not head.requires_grad or not torch.is_grad_enabled()
            or head.dtype not in (torch.float32, torch.float64)):
        return None
    B, C = loc.shape[:2]
    if head.shape[0] != B or tuple(head.shape[2:]) != tuple(loc.shape[2:]) or any(
            t.stride() != head.stride() for t in parts):
        return None
    step = head.stride(1)
    c0, rest = divmod(loc.storage_offset() - head.storage_offset(), step) if step > 0 else (0, 1)
    if (rest or log_diag.storage_offset() != loc.storage_offset() + C * step
            or off_diag.storage_offset() != loc.storage_offset() + 2 * C * step
            or (cross is not None
                and cross.storage_offset() != off_diag.storage_offset() + off_diag.shape[1] * step)):
        return None
    return _library.fold(head), c0          # a volume's head: its tall view (a view of the head)


def checked_nll(x_name: str, x, loc, log_diag, off_diag, stencil, *, basis=None, cross=None, weight_bound=None):
    """The NLL (``basis``: with a learned basis, off_diag then being its coefficients; ``cross``:
    the cross weights of coupled channels), with the data tensor called ``x_name`` in errors
    (``value`` for log_prob). ``weight_bound``: off_diag (and cross) hold raw weights, bounded as
    :func:`structlik.bound_weights` does, inside the kernel where no cross weights are given."""
    _checks.check_stencil(stencil)
    bound = 0.0
    if weight_bound is not None:
        bound = check_bound(weight_bound, "weight_bound")
        if basis is not None:
            raise ValueError("weight_bound: bounds raw weights, not a basis's coefficients; pass weight_bound=None "
                             "with a basis")
    off_name = "off_diag" if basis is None else "coeffs"
    if basis is None:
        per_channel, layout = stencil.S, f"{_checks.layout(stencil, 'C*S')} with S={stencil.S}"
    else:
        _checks.check_float_tensor(x_name, x, _checks.layout(stencil))
        per_channel = check_basis(basis, stencil, device=x.device)
        layout = f"{_checks.layout(stencil, 'C*n_b')} with n_b={per_channel}"
    image_layout = _checks.layout(stencil)
    _checks.check_against_image(x_name, x, stencil, (("loc", loc, 1, image_layout),
                                                     ("log_diag", log_diag, 1, image_layout),
                                                     (off_name, off_diag, per_channel, layout)))
    cross = _checks.check_cross(cross, x_name, x)
    _forced.prepare(x.device)
    inputs = {x_name: x, "loc": loc, "log_diag": log_diag, off_name: off_diag,
              **({} if basis is None else {"basis": basis}), **({} if cross is None else {"cross": cross})}
    x, loc, log_diag, off_diag, basis, cross = _checks.promote_optional(x, loc, log_diag, off_diag, basis, cross)
    if bound and cross is not None:     # the kernels bound plain weights only: coupled ones are formed here
        off_diag, cross = bound_coupled_weights(log_diag, off_diag, cross, bound)
        bound = 0.0
    head = head_of(loc, log_diag, off_diag, cross) if basis is None else None
    offsets = _library.op_offsets(stencil, x)
    if head is not None:
        out = nll_head_op(_library.fold(x), *head, offsets, cross is not None, bound)
    else:
        fold = _library.fold
        out = nll_op(fold(x), fold(loc), fold(log_diag), fold(off_diag), basis, offsets, fold(cross), bound)
    _checks.check_result(out, inputs, op="nll" if basis is None else "nll_basis")
    return out


def nll(x: torch.Tensor, loc: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor,
        stencil: Stencil, cross: Optional[torch.Tensor] = None, *,
        weight_bound: Optional[float] = None) -> torch.Tensor:
    """Per-image negative log-likelihood, shape (B,):

    ``0.5 * ||U (x - loc)||^2 - sum(log_diag) + (C*H*W / 2) * log(2 pi)``; with ``cross``
    (B, C(C-1)/2, H, W), U becomes M, whose channels are coupled at each pixel (docs/contract.md §1).
    ``weight_bound`` (e.g. 0.9): off_diag (and cross) are a head's raw weights, bounded as
    :func:`structlik.bound_weights` does; the CPU kernel bounds them inside its sweep (no bounded
    tensor, no autograd of the bound), the same value as ``nll(x, loc, log_diag,
    bound_weights(log_diag, off_diag, weight_bound), stencil)``.
    """
    return checked_nll("x", x, loc, log_diag, off_diag, stencil, cross=cross, weight_bound=weight_bound)


def nll_basis(x: torch.Tensor, loc: torch.Tensor, log_diag: torch.Tensor, coeffs: torch.Tensor, basis: torch.Tensor,
              stencil: Stencil, cross: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-image NLL, (B,), with ``off_diag = expand_basis(coeffs, basis)`` formed inside the kernel.

    coeffs: (B, C*n_b, H, W); basis: (S, n_b), shared by all images and channels.
    Differentiable in every tensor, the basis included (its gradient is a
    reduction over all pixels). Equivalent to ``nll(x, loc, log_diag,
    expand_basis(coeffs, basis), stencil)`` without the (B, C*S, H, W) tensor.
    """
    return checked_nll("x", x, loc, log_diag, coeffs, stencil, basis=basis, cross=cross)
