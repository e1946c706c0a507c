"""The fused NLL with a learned basis: w_{p,i} = sum_j basis[i, j] coeffs_j(p), formed
in registers from a (NB, BLOCK) tile of coefficients, never stored.

Backward, two passes as nll.py: pass 1 stores u and writes d/ds, d/dcoeffs and
each program's partial d/dbasis (summed on the host, deterministically);
pass 2 forms d/dloc = -g U^T u, recomputing w at p - delta_i from the coefficients.
"""
import torch
import triton
import triton.language as tl

from .common import (acc_dtype, acc_torch_dtype, block_for, finish_nll, neighbour, partial_buffer, plane_start,
                     plane_strides, planes_contiguous, tile)


@triton.jit
def _coeff_tile(coeffs, cb, csc, q, ok, NB: tl.constexpr, NB_P2: tl.constexpr, ACC: tl.constexpr):
    """(NB_P2, BLOCK) coefficients of the plane starting at cb at pixels q (zero where masked or j >= NB)."""
    j = tl.arange(0, NB_P2)
    ptrs = coeffs + cb + j[:, None] * csc + q[None, :]
    return tl.load(ptrs, (j[:, None] < NB) & ok[None, :], 0.0).to(ACC)


@triton.jit
def _basis_row(basis, i, NB: tl.constexpr, NB_P2: tl.constexpr, ACC: tl.constexpr):
    j = tl.arange(0, NB_P2)
    return tl.load(basis + i * NB + j, j < NB, 0.0).to(ACC)


@triton.jit
def _u(x, loc, log_diag, coeffs, basis, k, p, y, xx, valid, C, H, W, xsb, xsc, lsb, lsc, ssb, ssc, csb, csc,
       OFFS: tl.constexpr, S: tl.constexpr, NB: tl.constexpr, NB_P2: tl.constexpr, ACC: tl.constexpr):
    xb = plane_start(k, C, xsb, xsc)
    lb = plane_start(k, C, lsb, lsc)
    r = tl.load(x + xb + p, valid, 0.0).to(ACC) - tl.load(loc + lb + p, valid, 0.0).to(ACC)
    s = tl.load(log_diag + plane_start(k, C, ssb, ssc) + p, valid, 0.0).to(ACC)
    d = tl.exp(s)
    u = d * r
    c = _coeff_tile(coeffs, plane_start(k, C, csb, csc * NB), csc, p, valid, NB, NB_P2, ACC)
    for i in tl.static_range(S):
        q, ok = neighbour(y, xx, H, W, OFFS[2 * i], OFFS[2 * i + 1], valid)
        w = tl.sum(_basis_row(basis, i, NB, NB_P2, ACC)[:, None] * c, axis=0)
        r_q = tl.load(x + xb + q, ok, 0.0).to(ACC) - tl.load(loc + lb + q, ok, 0.0).to(ACC)
        u += w * r_q
    return r, s, d, u, c


@triton.jit
def nll_basis_kernel(x, loc, log_diag, coeffs, basis, partial, C, H, W, xsb, xsc, lsb, lsc, ssb, ssc, csb, csc,
                     OFFS: tl.constexpr, S: tl.constexpr, NB: tl.constexpr, NB_P2: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr):
    k, p, y, xx, valid = tile(H, W, BLOCK)
    r, s, d, u, c = _u(x, loc, log_diag, coeffs, basis, k, p, y, xx, valid, C, H, W, xsb, xsc, lsb, lsc, ssb, ssc,
                       csb, csc, OFFS, S, NB, NB_P2, ACC)
    term = tl.where(valid, 0.5 * u * u - s, 0.0)
    tl.store(partial + k * tl.num_programs(1) + tl.program_id(1), tl.sum(term, axis=0))


@triton.jit
def nll_basis_backward_u_kernel(grad, x, loc, log_diag, coeffs, basis, u_out, grad_s, grad_c, basis_partial, C, H, W,
                                xsb, xsc, lsb, lsc, ssb, ssc, csb, csc, OFFS: tl.constexpr, S: tl.constexpr,
                                NB: tl.constexpr, NB_P2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    k, p, y, xx, valid = tile(H, W, BLOCK)
    n = H * W
    base = k * n
    g = tl.load(grad + k // C).to(ACC)
    r, s, d, u, c = _u(x, loc, log_diag, coeffs, basis, k, p, y, xx, valid, C, H, W, xsb, xsc, lsb, lsc, ssb, ssc,
                       csb, csc, OFFS, S, NB, NB_P2, ACC)
    xb = plane_start(k, C, xsb, xsc)
    lb = plane_start(k, C, lsb, lsc)
    tl.store(u_out + base + p, u, valid)
    tl.store(grad_s + base + p, (g * (u * r * d - 1.0)).to(grad_s.dtype.element_ty), valid)
    j = tl.arange(0, NB_P2)
    gc = tl.zeros([NB_P2, BLOCK], ACC)
    program = k * tl.num_programs(1) + tl.program_id(1)
    for i in tl.static_range(S):
        q, ok = neighbour(y, xx, H, W, OFFS[2 * i], OFFS[2 * i + 1], valid)
        r_q = tl.load(x + xb + q, ok, 0.0).to(ACC) - tl.load(loc + lb + q, ok, 0.0).to(ACC)
        gw = tl.where(ok, g * u * r_q, 0.0)                      # d/dw_{p,i}, never stored
        gc += _basis_row(basis, i, NB, NB_P2, ACC)[:, None] * gw[None, :]
        tl.store(basis_partial + (program * S + i) * NB_P2 + j, tl.sum(c * gw[None, :], axis=1))
    ptrs = grad_c + (k * NB + j[:, None]) * n + p[None, :]
    tl.store(ptrs, gc.to(grad_c.dtype.element_ty), (j[:, None] < NB) & valid[None, :])


@triton.jit
def nll_basis_backward_loc_kernel(grad, u, log_diag, coeffs, basis, grad_loc, C, H, W, ssb, ssc, csb, csc,
                                OFFS: tl.constexpr, S: tl.constexpr, NB: tl.constexpr, NB_P2: tl.constexpr,
                                ACC: tl.constexpr, BLOCK: tl.constexpr):
    k, p, y, xx, valid = tile(H, W, BLOCK)
    n = H * W
    base = k * n
    cb = plane_start(k, C, csb, csc * NB)
    g = tl.load(grad + k // C).to(ACC)
    s = tl.load(log_diag + plane_start(k, C, ssb, ssc) + p, valid, 0.0).to(ACC)
    acc = tl.exp(s) * tl.load(u + base + p, valid, 0.0)
    for i in tl.static_range(S):
        q, ok = neighbour(y, xx, H, W, -OFFS[2 * i], -OFFS[2 * i + 1], valid)
        w = tl.sum(_basis_row(basis, i, NB, NB_P2, ACC)[:, None] * _coeff_tile(coeffs, cb, csc, q, ok, NB, NB_P2, ACC),
                   axis=0)
        acc += w * tl.load(u + base + q, ok, 0.0)
    tl.store(grad_loc + base + p, (-g * acc).to(grad_loc.dtype.element_ty), valid)


def _meta(x, basis, offsets, n):
    nb = basis.shape[1]
    nb_p2 = max(2, triton.next_power_of_2(nb))
    # The coefficient tile and its gradient are NB_P2 x BLOCK each. 128 pixels for 4 warps puts one
    # pixel's NB coefficients in one thread (the sums over the basis stay in registers); at 256 pixels
    # the backward's first pass spilled at NB=6, and below 128 the basis axis is split across warps
    # (sums through shared memory) and spilled more (benchmarks/triton_aot.py).
    return dict(OFFS=tuple(offsets), S=len(offsets) // 2, NB=nb, NB_P2=nb_p2, ACC=acc_dtype(x),
                BLOCK=min(block_for(n), 128))


def _strides(*tensors):
    return [v for t in tensors for v in plane_strides(t)]


def forward(x, loc, log_diag, coeffs, basis, offsets):
    B, C, H, W = x.shape
    x, loc, log_diag, coeffs = (planes_contiguous(t) for t in (x, loc, log_diag, coeffs))
    basis = basis.contiguous()
    meta = _meta(x, basis, offsets, H * W)
    tiles = triton.cdiv(H * W, meta["BLOCK"])
    partial = partial_buffer(x, B * C, tiles)
    nll_basis_kernel[(B * C, tiles)](x, loc, log_diag, coeffs, basis, partial, C, H, W,
                                     *_strides(x, loc, log_diag, coeffs), **meta)
    return finish_nll(partial, x)


def backward(grad, x, loc, log_diag, coeffs, basis, offsets):
    B, C, H, W = x.shape
    x, loc, log_diag, coeffs = (planes_contiguous(t) for t in (x, loc, log_diag, coeffs))
    basis, grad = basis.contiguous(), grad.contiguous()
    meta = _meta(x, basis, offsets, H * W)
    tiles = triton.cdiv(H * W, meta["BLOCK"])
    S, nb, nb_p2 = meta["S"], meta["NB"], meta["NB_P2"]
    acc = acc_torch_dtype(x)
    u = torch.empty(x.shape, dtype=acc, device=x.device)
    grad_s, grad_c, grad_loc = (torch.empty(t.shape, dtype=t.dtype, device=x.device) for t in (log_diag, coeffs, x))
    basis_partial = torch.empty(B * C * tiles, S, nb_p2, dtype=acc, device=x.device)
    grid = (B * C, tiles)
    nll_basis_backward_u_kernel[grid](grad, x, loc, log_diag, coeffs, basis, u, grad_s, grad_c, basis_partial,
                                      C, H, W, *_strides(x, loc, log_diag, coeffs), **meta)
    nll_basis_backward_loc_kernel[grid](grad, u, log_diag, coeffs, basis, grad_loc, C, H, W, *_strides(log_diag, coeffs),
                                      **meta)
    grad_basis = basis_partial.sum(0)[:, :nb].to(basis.dtype).contiguous()
    return grad_loc, grad_s, grad_c, grad_basis
