"""The fused NLL (forward) and its backward.

Forward: each program reads its tile of x, loc, log_diag and off_diag (the
neighbours of x - loc come through the cache) and writes one partial sum of
0.5 u^2 - s; the host adds the partials of each image (a deterministic sum, no
atomics) and the normaliser.

Backward, two passes because d/dx = g U^T u needs u at p - delta_i, which
another program computes:
  1. u = U r, stored (one value per pixel), with d/ds = g (u r d - 1) and
     d/dw_{p,i} = g u_p r_{p+delta_i}, both of which need only u_p;
  2. d/dx = g (d u + sum_i w_{p-delta_i,i} u_{p-delta_i}); d/dloc = -d/dx.
"""
import torch
import triton
import triton.language as tl

from .common import acc_dtype, block_for, finish_nll, neighbour, partial_buffer, tile


@triton.jit
def _residual_and_u(x, loc, log_diag, off_diag, k, p, y, xx, valid, H, W, OFFS: tl.constexpr, S: tl.constexpr,
                    ACC: tl.constexpr):
    n = H * W
    base = k * n
    r = tl.load(x + base + p, valid, 0.0).to(ACC) - tl.load(loc + base + p, valid, 0.0).to(ACC)
    s = tl.load(log_diag + base + p, valid, 0.0).to(ACC)
    d = tl.exp(s)
    u = d * r
    for i in tl.static_range(S):
        q, ok = neighbour(y, xx, H, W, OFFS[2 * i], OFFS[2 * i + 1], valid)
        r_q = tl.load(x + base + q, ok, 0.0).to(ACC) - tl.load(loc + base + q, ok, 0.0).to(ACC)
        u += tl.load(off_diag + (k * S + i) * n + p, ok, 0.0).to(ACC) * r_q
    return r, s, d, u


@triton.jit
def nll_kernel(x, loc, log_diag, off_diag, partial, H, W, OFFS: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr,
               BLOCK: tl.constexpr):
    k, p, y, xx, valid = tile(H, W, BLOCK)
    r, s, d, u = _residual_and_u(x, loc, log_diag, off_diag, k, p, y, xx, valid, H, W, OFFS, S, ACC)
    term = tl.where(valid, 0.5 * u * u - s, 0.0)
    tl.store(partial + k * tl.num_programs(0) + tl.program_id(0), tl.sum(term, axis=0))


@triton.jit
def nll_backward_u_kernel(grad, x, loc, log_diag, off_diag, u_out, grad_s, grad_w, C, H, W, OFFS: tl.constexpr,
                          S: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    k, p, y, xx, valid = tile(H, W, BLOCK)
    n = H * W
    base = k * n
    g = tl.load(grad + k // C).to(ACC)
    r, s, d, u = _residual_and_u(x, loc, log_diag, off_diag, k, p, y, xx, valid, H, W, OFFS, S, ACC)
    tl.store(u_out + base + p, u, valid)
    tl.store(grad_s + base + p, (g * (u * r * d - 1.0)).to(grad_s.dtype.element_ty), valid)
    for i in tl.static_range(S):
        q, ok = neighbour(y, xx, H, W, OFFS[2 * i], OFFS[2 * i + 1], valid)
        r_q = tl.load(x + base + q, ok, 0.0).to(ACC) - tl.load(loc + base + q, ok, 0.0).to(ACC)
        tl.store(grad_w + (k * S + i) * n + p, (g * u * r_q).to(grad_w.dtype.element_ty), valid)


@triton.jit
def nll_backward_x_kernel(grad, u, log_diag, off_diag, grad_x, C, H, W, OFFS: tl.constexpr, S: tl.constexpr,
                          ACC: tl.constexpr, BLOCK: tl.constexpr):
    k, p, y, xx, valid = tile(H, W, BLOCK)
    n = H * W
    base = k * n
    g = tl.load(grad + k // C).to(ACC)
    acc = tl.exp(tl.load(log_diag + base + p, valid, 0.0).to(ACC)) * tl.load(u + base + p, valid, 0.0)
    for i in tl.static_range(S):
        q, ok = neighbour(y, xx, H, W, -OFFS[2 * i], -OFFS[2 * i + 1], valid)
        acc += tl.load(off_diag + (k * S + i) * n + q, ok, 0.0).to(ACC) * tl.load(u + base + q, ok, 0.0)
    tl.store(grad_x + base + p, (g * acc).to(grad_x.dtype.element_ty), valid)


def _prepare(*tensors):
    return tuple(t.contiguous() for t in tensors)


def forward(x, loc, log_diag, off_diag, offsets):
    B, C, H, W = x.shape
    x, loc, log_diag, off_diag = _prepare(x, loc, log_diag, off_diag)
    block = block_for(H * W)
    tiles = triton.cdiv(H * W, block)
    partial = partial_buffer(x, B * C, tiles)
    nll_kernel[(tiles, B * C)](x, loc, log_diag, off_diag, partial, H, W, OFFS=tuple(offsets),
                               S=len(offsets) // 2, ACC=acc_dtype(x), BLOCK=block)
    return finish_nll(partial, x)


def backward(grad, x, loc, log_diag, off_diag, offsets):
    B, C, H, W = x.shape
    x, loc, log_diag, off_diag, grad = _prepare(x, loc, log_diag, off_diag, grad)
    block = block_for(H * W)
    grid = (triton.cdiv(H * W, block), B * C)
    meta = dict(OFFS=tuple(offsets), S=len(offsets) // 2, ACC=acc_dtype(x), BLOCK=block)
    u = torch.empty(x.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    grad_s, grad_w, grad_x = torch.empty_like(log_diag), torch.empty_like(off_diag), torch.empty_like(x)
    nll_backward_u_kernel[grid](grad, x, loc, log_diag, off_diag, u, grad_s, grad_w, C, H, W, **meta)
    nll_backward_x_kernel[grid](grad, u, log_diag, off_diag, grad_x, C, H, W, **meta)
    return grad_x, grad_s, grad_w
