"""Fake (meta) kernels and autograd formulas shared by every compiled backend.

A compiled backend defines the ops of SPEC section 1 under its own namespace
(``structlik_cpu``, ``structlik_triton``) with the same names and schemas; this
module registers, once per namespace, what torch.compile needs (a fake kernel
giving output shapes) and the backward formulas of SPEC section 1, written in
terms of that namespace's own ops so the backward runs on the same kernels.

Second derivatives are not provided: ``weight_grad`` and ``nll_backward`` have
no backward of their own.
"""
from __future__ import annotations

import torch

from .reference import sum_repeats

__all__ = ["register", "OpsBackend"]


def _offsets_count(offsets) -> int:
    return len(offsets) // 2


def nll_dtype(x: torch.Tensor) -> torch.dtype:
    """The NLL's dtype: the input's for float32/float64; float32 for float16/bfloat16 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def register(ns: str, *, fakes: bool = True) -> None:
    ops = getattr(torch.ops, ns)

    if fakes:   # triton_op traces its Python body instead, so it needs none
        for name in ("apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t"):
            torch.library.register_fake(f"{ns}::{name}")(lambda image, log_diag, off_diag, offsets:
                                                           torch.empty_like(image))

        @torch.library.register_fake(f"{ns}::weight_grad")
        def _(a, b, offsets):
            B, C, H, W = a.shape
            return a.new_empty(B, C * _offsets_count(offsets), H, W)

        @torch.library.register_fake(f"{ns}::precision_diagonal")
        def _(log_diag, off_diag, offsets):
            return torch.empty_like(log_diag)

        @torch.library.register_fake(f"{ns}::nll")
        def _(x, loc, log_diag, off_diag, offsets):
            return x.new_empty(x.shape[0], dtype=nll_dtype(x))

        @torch.library.register_fake(f"{ns}::nll_backward")
        def _(grad, x, loc, log_diag, off_diag, offsets):
            return torch.empty_like(x), torch.empty_like(log_diag), torch.empty_like(off_diag)

        @torch.library.register_fake(f"{ns}::nll_basis")
        def _(x, loc, log_diag, coeffs, basis, offsets):
            return x.new_empty(x.shape[0], dtype=nll_dtype(x))

        @torch.library.register_fake(f"{ns}::nll_basis_backward")
        def _(grad, x, loc, log_diag, coeffs, basis, offsets):
            return (torch.empty_like(x), torch.empty_like(log_diag), torch.empty_like(coeffs),
                    torch.empty_like(basis))

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
                g * r * log_diag.exp() if need[1] else None,
                ops.weight_grad(g, r, ctx.offsets) if need[2] else None,
                None)

    # U^T y = sum over p of y_p U[p, :]: d/dy = U g, d/ds = y g d, d/dw_{p,i} = y_p g_{p+delta_i}
    def apply_upper_t_backward(ctx, g):
        y, log_diag, off_diag = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (ops.apply_upper(g, log_diag, off_diag, ctx.offsets) if need[0] else None,
                y * g * log_diag.exp() if need[1] else None,
                ops.weight_grad(y, g, ctx.offsets) if need[2] else None,
                None)

    # After v = U^-T g (solve_upper) or a = U^-1 h (solve_upper_t): dL/dU_{pq} = -v_p sol_q,
    # summed over the samples that share one set of parameters (the solves' params may repeat).
    def solve_grads(ctx, v, sol, log_diag, off_diag):
        need = ctx.needs_input_grad
        batch = log_diag.shape[0]
        return (-sum_repeats(v * sol, batch) * log_diag.exp() if need[1] else None,
                -sum_repeats(ops.weight_grad(v, sol, ctx.offsets), batch) if need[2] else None)

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
                2 * off_diag * ops.weight_grad(torch.ones_like(G), G, ctx.offsets) if need[1] else None,
                None)

    # The fused backward returns d/dx; d/dloc is its negative. x is usually data (no
    # gradient): then d/dloc is negated in place, so the backward's peak holds one
    # image plane fewer.
    def x_and_loc_grads(gx, need):
        if not need[1]:
            return (gx if need[0] else None), None
        return (gx, -gx) if need[0] else (None, gx.neg_())

    def nll_backward(ctx, grad):
        x, loc, log_diag, off_diag = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gs, gw = ops.nll_backward(grad, x, loc, log_diag, off_diag, ctx.offsets)
        return (*x_and_loc_grads(gx, need), gs if need[2] else None, gw if need[3] else None, None)

    def nll_basis_backward(ctx, grad):
        x, loc, log_diag, coeffs, basis = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gs, gc, gb = ops.nll_basis_backward(grad, x, loc, log_diag, coeffs, basis, ctx.offsets)
        return (*x_and_loc_grads(gx, need), gs if need[2] else None,
                gc if need[3] else None, gb if need[4] else None, None)

    reg = torch.library.register_autograd
    reg(f"{ns}::apply_upper", apply_upper_backward, setup_context=save_inputs)
    reg(f"{ns}::apply_upper_t", apply_upper_t_backward, setup_context=save_inputs)
    reg(f"{ns}::solve_upper", solve_upper_backward, setup_context=save_output)
    reg(f"{ns}::solve_upper_t", solve_upper_t_backward, setup_context=save_output)
    reg(f"{ns}::precision_diagonal", precision_diagonal_backward, setup_context=save_inputs)
    reg(f"{ns}::nll", nll_backward, setup_context=save_inputs)
    reg(f"{ns}::nll_basis", nll_basis_backward, setup_context=save_inputs)


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
        self._ops = getattr(torch.ops, namespace)

    def apply_upper(self, r, log_diag, off_diag, stencil):
        return self._ops.apply_upper(r, log_diag, off_diag, stencil.flat_offsets)

    def apply_upper_t(self, y, log_diag, off_diag, stencil):
        return self._ops.apply_upper_t(y, log_diag, off_diag, stencil.flat_offsets)

    def solve_upper(self, z, log_diag, off_diag, stencil):
        return self._ops.solve_upper(z, log_diag, off_diag, stencil.flat_offsets)

    def solve_upper_t(self, g, log_diag, off_diag, stencil):
        return self._ops.solve_upper_t(g, log_diag, off_diag, stencil.flat_offsets)

    def nll(self, x, loc, log_diag, off_diag, stencil):
        return self._ops.nll(x, loc, log_diag, off_diag, stencil.flat_offsets)

    def nll_basis(self, x, loc, log_diag, coeffs, basis, stencil):
        return self._ops.nll_basis(x, loc, log_diag, coeffs, basis, stencil.flat_offsets)

    def precision_diagonal(self, log_diag, off_diag, stencil):
        return self._ops.precision_diagonal(log_diag, off_diag, stencil.flat_offsets)

    def __repr__(self):
        return f"OpsBackend({self.namespace!r})"
