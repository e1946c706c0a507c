"""Fake (meta) kernels, autograd formulas and vmap rules shared by every op namespace.

A backend defines the ops of docs/contract.md §1 under its own namespace
(``structlik_cpu``, ``structlik_triton``; ``structlik_reference`` has the two
solves) with the same names and schemas; this module registers, once per
namespace, what torch.compile needs (a fake kernel giving output shapes), the
backward formulas of docs/contract.md §1 written in terms of that namespace's own
ops, and a vmap rule (``structlik._vmap``).

Every formula is itself differentiable, so every op is twice differentiable
(Hessian-vector products, gradient penalties): the fused NLL backward kernels
run when no graph is being built (``create_graph=False``, the training step);
under ``create_graph=True`` the NLL's gradient is composed of the library's own
differentiable ops instead (U r, U^T y and ``weight_grad``, whose backward is
two applications of U with a zero diagonal).
"""
from __future__ import annotations

import torch

from . import _vmap
from .reference import sum_repeats

__all__ = ["register", "OpsBackend"]

IMAGE_OPS = ("apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t")
# Optional: a training forward that also returns u = U (x - loc) for a one-pass backward
# (the Triton backend has them; structlik/kernels/nll.py).
TRAINING_OPS = ("nll_u", "nll_head_u")
BACKWARD_KERNELS = ("nll_backward", "nll_head_backward", "nll_basis_backward", "nll_u_backward",
                    "nll_head_u_backward")


def _offsets_count(offsets) -> int:
    return len(offsets) // 2


def nll_dtype(x: torch.Tensor) -> torch.dtype:
    """The NLL's dtype: the input's for float32/float64; float32 for float16/bfloat16 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _has(ops, name: str) -> bool:
    try:
        getattr(ops, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _register_fakes(ns: str, names) -> None:
    fake = torch.library.register_fake
    for name in IMAGE_OPS:
        if name in names:
            fake(f"{ns}::{name}")(lambda image, log_diag, off_diag, offsets:
                                  image.new_empty(image.shape))
    if "weight_grad" in names:
        fake(f"{ns}::weight_grad")(lambda a, b, offsets: a.new_empty(
            a.shape[0], a.shape[1] * _offsets_count(offsets), *a.shape[2:]))
    if "precision_diagonal" in names:
        fake(f"{ns}::precision_diagonal")(lambda log_diag, off_diag, offsets: log_diag.new_empty(log_diag.shape))
    if "nll" in names:
        fake(f"{ns}::nll")(lambda x, loc, log_diag, off_diag, offsets:
                           x.new_empty(x.shape[0], dtype=nll_dtype(x)))
        fake(f"{ns}::nll_backward")(lambda grad, x, loc, log_diag, off_diag, offsets: (
            x.new_empty(x.shape), log_diag.new_empty(log_diag.shape), off_diag.new_empty(off_diag.shape)))
    if "nll_head" in names:
        fake(f"{ns}::nll_head")(lambda x, head, c0, offsets: x.new_empty(x.shape[0], dtype=nll_dtype(x)))
        fake(f"{ns}::nll_head_backward")(lambda grad, x, head, c0, offsets: head.new_empty(head.shape))
    if "nll_u" in names:
        fake(f"{ns}::nll_u")(lambda x, loc, log_diag, off_diag, offsets: (
            x.new_empty(x.shape[0], dtype=nll_dtype(x)), x.new_empty(x.shape, dtype=nll_dtype(x))))
        fake(f"{ns}::nll_u_backward")(lambda grad, x, loc, log_diag, off_diag, u, offsets: (
            x.new_empty(x.shape), log_diag.new_empty(log_diag.shape), off_diag.new_empty(off_diag.shape)))
    if "nll_head_u" in names:
        fake(f"{ns}::nll_head_u")(lambda x, head, c0, offsets: (
            x.new_empty(x.shape[0], dtype=nll_dtype(x)), x.new_empty(x.shape, dtype=nll_dtype(x))))
        fake(f"{ns}::nll_head_u_backward")(lambda grad, x, head, c0, u, offsets: head.new_empty(head.shape))
    if "nll_basis" in names:
        fake(f"{ns}::nll_basis")(lambda x, loc, log_diag, coeffs, basis, offsets:
                                 x.new_empty(x.shape[0], dtype=nll_dtype(x)))
        fake(f"{ns}::nll_basis_backward")(lambda grad, x, loc, log_diag, coeffs, basis, offsets: (
            x.new_empty(x.shape), log_diag.new_empty(log_diag.shape), coeffs.new_empty(coeffs.shape),
            basis.new_empty(basis.shape)))


def _call(function, op):
    """``function.apply`` (torch.func can transform it), or the dispatcher's op while
    torch.compile traces (dynamo takes the op with its registered formula, not the Function)."""
    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else function.apply(*args)
    return call


class _Ops:
    """The differentiable ops of a namespace, as the functions ``register`` returns (so that
    the formulas below, being made of them, work under torch.func too)."""

    def __init__(self, functions):
        for name, fn in functions.items():
            setattr(self, name, _call(fn, getattr(getattr(torch.ops, fn.namespace), name)))


def register(ns: str, *, fakes: bool = True) -> dict:
    """Register fakes, formulas and vmap rules for the ops of ``ns``; return them also as one
    ``torch.autograd.Function`` per op (name -> class), which is what the backends call:
    torch 2.13's ``register_autograd`` makes an autograd.Function without setup_context, which
    torch.func's transforms refuse; these have it, and a vmap staticmethod."""
    raw = getattr(torch.ops, ns)
    names = {n for n in (*IMAGE_OPS, "weight_grad", "precision_diagonal", "nll", "nll_head", "nll_basis",
                         *TRAINING_OPS) if _has(raw, n)}
    if fakes:
        _register_fakes(ns, names)
    functions = {}
    ops = _Ops(functions)        # filled below; the formulas look the ops up when they run
    for kernel in BACKWARD_KERNELS:
        if _has(raw, kernel):
            setattr(ops, kernel, getattr(raw, kernel))
    if "weight_grad" in names:
        def weight_grad(a, b, offsets):
            return ops.weight_grad(a, b, offsets)
    else:   # the reference namespace: weight_grad in plain PyTorch, differentiated by autograd
        from .reference import weight_grad as _weight_grad
        from .stencil import Stencil

        def weight_grad(a, b, offsets):
            return _weight_grad(a, b, Stencil.from_flat_offsets(offsets))

    # Every setup_context keeps the tensors the formulas below read.
    def save_inputs(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:-1])
        ctx.offsets = inputs[-1]

    def save_output(ctx, inputs, output):
        _, log_diag, off_diag, offsets = inputs
        ctx.save_for_backward(output, log_diag, off_diag)
        ctx.offsets = offsets

    # U r: d/dr = U^T g, d/ds = g r d, d/dw_{p,i} = g_p r_{p+delta_i}
    def apply_upper_backward(ctx, g):
        r, log_diag, off_diag = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (ops.apply_upper_t(g, log_diag, off_diag, ctx.offsets) if need[0] else None,
                sum_repeats(g * r, log_diag.shape[0]) * log_diag.exp() if need[1] else None,
                sum_repeats(weight_grad(g, r, ctx.offsets), log_diag.shape[0]) if need[2] else None,
                None)

    # U^T y = sum over p of y_p U[p, :]: d/dy = U g, d/ds = y g d, d/dw_{p,i} = y_p g_{p+delta_i}
    def apply_upper_t_backward(ctx, g):
        y, log_diag, off_diag = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (ops.apply_upper(g, log_diag, off_diag, ctx.offsets) if need[0] else None,
                sum_repeats(y * g, log_diag.shape[0]) * log_diag.exp() if need[1] else None,
                sum_repeats(weight_grad(y, g, ctx.offsets), log_diag.shape[0]) if need[2] else None,
                None)

    # weight_grad(a, b)_{p,i} = a_p b_{p+delta_i}: d/da_p = sum_i G_{p,i} b_{p+delta_i} and
    # d/db_q = sum_i G_{q-delta_i,i} a_{q-delta_i}: U b and U^T a with weights G and a zero diagonal.
    def weight_grad_backward(ctx, G):
        a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        zero_diagonal = torch.full_like(a, float("-inf"))     # exp(-inf) = 0
        return (ops.apply_upper(b, zero_diagonal, G, ctx.offsets) if need[0] else None,
                ops.apply_upper_t(a, zero_diagonal, G, ctx.offsets) if need[1] else None,
                None)

    # After v = U^-T g (solve_upper) or a = U^-1 h (solve_upper_t): dL/dU_{pq} = -v_p sol_q,
    # summed over the samples that share one set of parameters (the solves' params may repeat).
    def solve_grads(ctx, v, sol, log_diag, off_diag):
        need = ctx.needs_input_grad
        batch = log_diag.shape[0]
        return (-sum_repeats(v * sol, batch) * log_diag.exp() if need[1] else None,
                -sum_repeats(weight_grad(v, sol, ctx.offsets), batch) if need[2] else None)

    def solve_upper_backward(ctx, g):
        eps, log_diag, off_diag = ctx.saved_tensors
        v = ops.solve_upper_t(g, log_diag, off_diag, ctx.offsets)
        return (v, *solve_grads(ctx, v, eps, log_diag, off_diag), None)

    def solve_upper_t_backward(ctx, h):
        v, log_diag, off_diag = ctx.saved_tensors
        a = ops.solve_upper(h, log_diag, off_diag, ctx.offsets)
        return (a, *solve_grads(ctx, v, a, log_diag, off_diag), None)

    # Lambda_pp = d_p^2 + sum_i w_{p-delta_i,i}^2: d/ds = 2 G d^2, d/dw_{p,i} = 2 w_{p,i} G_{p+delta_i}
    def precision_diagonal_backward(ctx, G):
        log_diag, off_diag = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (2 * G * (2 * log_diag).exp() if need[0] else None,
                2 * off_diag * weight_grad(torch.ones_like(G), G, ctx.offsets) if need[1] else None,
                None)

    # The NLL's gradient for upstream grad (B,), composed of differentiable ops (create_graph):
    #   d/dloc = -g U^T u,  d/ds = g (u r d - 1),  d/dw_{p,i} = g u_p r_{p+delta_i},  u = U (x - loc).
    # Half inputs are computed in float32, as the fused path does.
    def composed_nll_grads(grad, x, loc, log_diag, off_diag, offsets):
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x, loc, log_diag, off_diag = (t.float() for t in (x, loc, log_diag, off_diag))
        g = grad.to(x.dtype)[:, None, None, None]
        r = x - loc
        u = ops.apply_upper(r, log_diag, off_diag, offsets)
        grads = (-g * ops.apply_upper_t(u, log_diag, off_diag, offsets), g * (u * r * log_diag.exp() - 1),
                 g * weight_grad(u, r, offsets))
        return tuple(t.to(dtype) for t in grads)

    def fused(ctx):
        """The fused backward kernels, unless a graph of the gradient is being built (create_graph)."""
        return not torch.is_grad_enabled()

    # The fused backward returns d/dloc; d/dx is its negative, formed only when x needs a
    # gradient (data never does), so the common path makes no pass over it.
    def x_and_loc_grads(gloc, need):
        return (-gloc if need[0] else None), (gloc if need[1] else None)

    # u: what the training forward (nll_u) stored, read by the one-pass kernel; else recomputed.
    def nll_grads(ctx, grad, x, loc, log_diag, off_diag, u=None):
        need = ctx.needs_input_grad
        if fused(ctx) and u is not None:
            gloc, gs, gw = ops.nll_u_backward(grad, x, loc, log_diag, off_diag, u, ctx.offsets)
        elif fused(ctx):
            gloc, gs, gw = ops.nll_backward(grad, x, loc, log_diag, off_diag, ctx.offsets)
        else:
            gloc, gs, gw = composed_nll_grads(grad, x, loc, log_diag, off_diag, ctx.offsets)
        return (*x_and_loc_grads(gloc, need), gs if need[2] else None, gw if need[3] else None, None)

    def nll_backward(ctx, grad):
        return nll_grads(ctx, grad, *ctx.saved_tensors)

    # The NLL of adjacent channel slices of one head: the head's gradient in one piece.
    def head_grads(ctx, grad, x, head, u=None):
        need = ctx.needs_input_grad
        c0, C, S = ctx.c0, x.shape[1], _offsets_count(ctx.offsets)
        if fused(ctx) and u is not None:
            grad_head = ops.nll_head_u_backward(grad, x, head, c0, u, ctx.offsets)
        elif fused(ctx):
            grad_head = ops.nll_head_backward(grad, x, head, c0, ctx.offsets)
        else:
            loc, log_diag, off_diag = head.narrow(1, c0, C), head.narrow(1, c0 + C, C), head.narrow(1, c0 + 2 * C,
                                                                                                    S * C)
            parts = composed_nll_grads(grad, x, loc, log_diag, off_diag, ctx.offsets)
            rest = head.shape[1] - c0 - (2 + S) * C
            grad_head = torch.cat([head.new_zeros(head.shape[0], c0, *head.shape[2:]), *parts,
                                   head.new_zeros(head.shape[0], rest, *head.shape[2:])], dim=1)
        grad_x = -grad_head.narrow(1, c0, C) if need[0] else None
        return grad_x, grad_head if need[1] else None, None, None

    def nll_head_backward(ctx, grad):
        return head_grads(ctx, grad, *ctx.saved_tensors)

    # The training forwards: the same formulas, the fused backward reading the u the forward
    # stored. u is auxiliary: not differentiable, and its gradient never materialised.
    def save_inputs_and_u(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:-1], output[1])
        ctx.offsets = inputs[-1]
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def nll_u_backward(ctx, grad, _grad_u):
        if grad is None:        # not materialised: nothing flows back (gradcheck's undefined-grad check)
            return None, None, None, None, None
        return nll_grads(ctx, grad, *ctx.saved_tensors)

    def save_head_and_u(ctx, inputs, output):
        x, head, c0, offsets = inputs
        ctx.save_for_backward(x, head, output[1])
        ctx.c0, ctx.offsets = c0, offsets
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def nll_head_u_backward(ctx, grad, _grad_u):
        if grad is None:
            return None, None, None, None
        return head_grads(ctx, grad, *ctx.saved_tensors)

    def save_head(ctx, inputs, output):
        x, head, c0, offsets = inputs
        ctx.save_for_backward(x, head)
        ctx.c0, ctx.offsets = c0, offsets

    # With a learned basis, w = coeffs x basis: d/dcoeffs_j = sum_i basis_ij gw_i, d/dbasis_ij = <gw_i, coeffs_j>.
    def nll_basis_backward(ctx, grad):
        x, loc, log_diag, coeffs, basis = ctx.saved_tensors
        need = ctx.needs_input_grad
        if fused(ctx):
            gloc, gs, gc, gb = ops.nll_basis_backward(grad, x, loc, log_diag, coeffs, basis, ctx.offsets)
        else:
            from .basis import expand_basis
            B, _, H, W = x.shape
            S, nb = basis.shape
            gloc, gs, gw = composed_nll_grads(grad, x, loc, log_diag, expand_basis(coeffs, basis), ctx.offsets)
            gw = gw.reshape(B, -1, S, H, W)
            c = coeffs.reshape(B, -1, nb, H, W)
            gc = torch.einsum("ij,bcihw->bcjhw", basis.to(gw.dtype), gw).reshape(coeffs.shape).to(coeffs.dtype)
            gb = torch.einsum("bcihw,bcjhw->ij", gw, c.to(gw.dtype)).to(basis.dtype)
        return (*x_and_loc_grads(gloc, need), gs if need[2] else None,
                gc if need[3] else None, gb if need[4] else None, None)

    formulas = {
        "apply_upper": (apply_upper_backward, save_inputs), "apply_upper_t": (apply_upper_t_backward, save_inputs),
        "solve_upper": (solve_upper_backward, save_output), "solve_upper_t": (solve_upper_t_backward, save_output),
        "weight_grad": (weight_grad_backward, save_inputs),
        "precision_diagonal": (precision_diagonal_backward, save_inputs), "nll": (nll_backward, save_inputs),
        "nll_basis": (nll_basis_backward, save_inputs), "nll_head": (nll_head_backward, save_head),
        "nll_u": (nll_u_backward, save_inputs_and_u), "nll_head_u": (nll_head_u_backward, save_head_and_u),
    }
    for name in names:
        backward, setup = formulas[name]
        torch.library.register_autograd(f"{ns}::{name}", backward, setup_context=setup)
        functions[name] = _function(ns, name, getattr(raw, name).default, backward, setup)
        setattr(ops, name, _call(functions[name], getattr(raw, name)))
    _vmap.register(ns, names)
    return functions


def _function(ns, name, op, backward, setup):
    """``op`` as an autograd.Function with the same formula, setup and vmap rule."""
    def forward(*args):
        return op(*args)

    def vmap(info, in_dims, *args):
        return _vmap.rule(function.apply, [a.name for a in op._schema.arguments], name in _vmap.PER_SLICE_OPS)(
            info, in_dims, *args)

    def jvp(ctx, *tangents):
        raise NotImplementedError(f"structlik: {ns}::{name} has no forward-mode derivative (torch.func.jvp, "
                                  f"torch.autograd.forward_ad); use reverse mode (torch.func.grad, vjp, jacrev)")

    function = type(f"{ns}_{name}", (torch.autograd.Function,), {
        "namespace": ns, "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(backward), "vmap": staticmethod(vmap), "jvp": staticmethod(jvp)})
    return function


class OpsBackend:
    """The backend interface of ``structlik.reference`` over ``torch.ops.<namespace>``.

    The compiled ops take the stencil as a flat int list; this passes it on.
    ``half_nll``: its ``nll`` and ``nll_basis`` read float16/bfloat16 inputs
    themselves (accumulating in float32, returning a float32 NLL and gradients
    in the inputs' dtype), so ``structlik.ops`` need not upcast them first.
    """

    def __init__(self, namespace: str, half_nll: bool = False):
        self.namespace = namespace
        self.half_nll = half_nll
        self._ops = _Ops(register(namespace))

    def apply_upper(self, r, log_diag, off_diag, stencil):
        return self._ops.apply_upper(r, log_diag, off_diag, stencil.flat_offsets)

    def apply_upper_t(self, y, log_diag, off_diag, stencil):
        return self._ops.apply_upper_t(y, log_diag, off_diag, stencil.flat_offsets)

    def solve_upper(self, z, log_diag, off_diag, stencil):
        return self._ops.solve_upper(z, log_diag, off_diag, stencil.flat_offsets)

    def solve_upper_t(self, g, log_diag, off_diag, stencil):
        return self._ops.solve_upper_t(g, log_diag, off_diag, stencil.flat_offsets)

    def nll(self, x, loc, log_diag, off_diag, stencil):
        if self._training(x, loc, log_diag, off_diag) and hasattr(self._ops, "nll_u"):
            return self._ops.nll_u(x, loc, log_diag, off_diag, stencil.flat_offsets)[0]
        return self._ops.nll(x, loc, log_diag, off_diag, stencil.flat_offsets)

    def nll_head(self, x, head, c0, stencil):
        if self._training(x, head) and hasattr(self._ops, "nll_head_u"):
            return self._ops.nll_head_u(x, head, c0, stencil.flat_offsets)[0]
        return self._ops.nll_head(x, head, c0, stencil.flat_offsets)

    @staticmethod
    def _training(*tensors) -> bool:
        """A gradient will be taken: worth storing u in the forward for the backward."""
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def nll_basis(self, x, loc, log_diag, coeffs, basis, stencil):
        return self._ops.nll_basis(x, loc, log_diag, coeffs, basis, stencil.flat_offsets)

    def precision_diagonal(self, log_diag, off_diag, stencil):
        return self._ops.precision_diagonal(log_diag, off_diag, stencil.flat_offsets)

    def __repr__(self):
        return f"OpsBackend({self.namespace!r})"
