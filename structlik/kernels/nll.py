"""The fused NLL (forward) and its backward.

Forward: each program reads its tile of x, loc, log_diag and off_diag (the
neighbours of x - loc come through the cache) and writes one partial sum of
0.5 u^2 - s; the host adds the partials of each image (a deterministic sum, no
atomics) and the normaliser.

Backward, two passes because d/dx = g U^T u needs u at p - delta_i, which
another program computes:
  1. u = U r, stored (one value per pixel), with d/ds = g (u r d - 1) and
     d/dw_{p,i} = g u_p r_{p+delta_i}, both of which need only u_p;
  2. d/dloc = -g (d u + sum_i w_{p-delta_i,i} u_{p-delta_i}), returned; d/dx is its
     negative, formed by the caller only when x needs a gradient (data never does).

Inputs are read through their batch and channel strides (``xs``, ``ls``, ``ss``,
``ws``: (batch, channel) pairs; common.plane_start), so split-head views are
never copied; u and the gradients are contiguous.
"""
import torch
import triton
import triton.language as tl

from .common import (acc_dtype, block_for, finish_nll, neighbour, partial_buffer, plane_start, plane_strides,
                     planes_contiguous, tile)


@triton.jit
def _residual_and_u(x, loc, log_diag, off_diag, k, p, y, xx, valid, C, H, W, xsb, xsc, lsb, lsc, ssb, ssc, wsb, wsc,
                    OFFS: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr):
    xb = plane_start(k, C, xsb, xsc)
    lb = plane_start(k, C, lsb, lsc)
    wb = plane_start(k, C, wsb, wsc * S)
    r = tl.load(x + xb + p, valid, 0.0).to(ACC) - tl.load(loc + lb + p, valid, 0.0).to(ACC)
    s = tl.load(log_diag + plane_start(k, C, ssb, ssc) + p, valid, 0.0).to(ACC)
    d = tl.exp(s)
    u = d * r
    for i in tl.static_range(S):
        q, ok = neighbour(y, xx, H, W, OFFS[2 * i], OFFS[2 * i + 1], valid)
        r_q = tl.load(x + xb + q, ok, 0.0).to(ACC) - tl.load(loc + lb + q, ok, 0.0).to(ACC)
        # the weight at the pixel itself, under the tile's mask (contiguous, vectorisable);
        # where the neighbour is outside, the term is dropped rather than multiplied by 0
        w = tl.load(off_diag + wb + i * wsc + p, valid, 0.0).to(ACC)
        u += tl.where(ok, w * r_q, 0.0)
    return r, s, d, u


@triton.jit
def nll_kernel(x, loc, log_diag, off_diag, partial, C, H, W, xsb, xsc, lsb, lsc, ssb, ssc, wsb, wsc,
               OFFS: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    k, p, y, xx, valid = tile(H, W, BLOCK)
    r, s, d, u = _residual_and_u(x, loc, log_diag, off_diag, k, p, y, xx, valid, C, H, W, xsb, xsc, lsb, lsc,
                                 ssb, ssc, wsb, wsc, OFFS, S, ACC)
    term = tl.where(valid, 0.5 * u * u - s, 0.0)
    tl.store(partial + k * tl.num_programs(1) + tl.program_id(1), tl.sum(term, axis=0))


@triton.jit
def nll_backward_u_kernel(grad, x, loc, log_diag, off_diag, u_out, grad_s, grad_w, C, H, W, xsb, xsc, lsb, lsc,
                          ssb, ssc, wsb, wsc, gssb, gssc, gwsb, gwsc, OFFS: tl.constexpr, S: tl.constexpr,
                          ACC: tl.constexpr, BLOCK: tl.constexpr):
    k, p, y, xx, valid = tile(H, W, BLOCK)
    n = H * W
    base = k * n
    g = tl.load(grad + k // C).to(ACC)
    r, s, d, u = _residual_and_u(x, loc, log_diag, off_diag, k, p, y, xx, valid, C, H, W, xsb, xsc, lsb, lsc,
                                 ssb, ssc, wsb, wsc, OFFS, S, ACC)
    tl.store(u_out + base + p, u, valid)
    tl.store(grad_s + plane_start(k, C, gssb, gssc) + p, (g * (u * r * d - 1.0)).to(grad_s.dtype.element_ty), valid)
    xb = plane_start(k, C, xsb, xsc)
    lb = plane_start(k, C, lsb, lsc)
    gwb = plane_start(k, C, gwsb, gwsc * S)
    for i in tl.static_range(S):
        q, ok = neighbour(y, xx, H, W, OFFS[2 * i], OFFS[2 * i + 1], valid)
        r_q = tl.load(x + xb + q, ok, 0.0).to(ACC) - tl.load(loc + lb + q, ok, 0.0).to(ACC)
        tl.store(grad_w + gwb + i * gwsc + p, (g * u * r_q).to(grad_w.dtype.element_ty), valid)


@triton.jit
def nll_backward_loc_kernel(grad, u, log_diag, off_diag, grad_loc, C, H, W, ssb, ssc, wsb, wsc, glsb, glsc,
                            OFFS: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    k, p, y, xx, valid = tile(H, W, BLOCK)
    n = H * W
    base = k * n
    wb = plane_start(k, C, wsb, wsc * S)
    g = tl.load(grad + k // C).to(ACC)
    s = tl.load(log_diag + plane_start(k, C, ssb, ssc) + p, valid, 0.0).to(ACC)
    acc = tl.exp(s) * tl.load(u + base + p, valid, 0.0)
    for i in tl.static_range(S):
        q, ok = neighbour(y, xx, H, W, -OFFS[2 * i], -OFFS[2 * i + 1], valid)
        acc += tl.load(off_diag + wb + i * wsc + q, ok, 0.0).to(ACC) * tl.load(u + base + q, ok, 0.0)
    tl.store(grad_loc + plane_start(k, C, glsb, glsc) + p, (-g * acc).to(grad_loc.dtype.element_ty), valid)


def _meta(offsets, H, W, x):
    return dict(OFFS=tuple(offsets), S=len(offsets) // 2, ACC=acc_dtype(x), BLOCK=block_for(H * W))


def _strides(*tensors):
    return [v for t in tensors for v in plane_strides(t)]


def forward(x, loc, log_diag, off_diag, offsets):
    B, C, H, W = x.shape
    x, loc, log_diag, off_diag = (planes_contiguous(t) for t in (x, loc, log_diag, off_diag))
    meta = _meta(offsets, H, W, x)
    tiles = triton.cdiv(H * W, meta["BLOCK"])
    partial = partial_buffer(x, B * C, tiles)
    nll_kernel[(B * C, tiles)](x, loc, log_diag, off_diag, partial, C, H, W,
                               *_strides(x, loc, log_diag, off_diag), **meta)
    return finish_nll(partial, x)


def backward(grad, x, loc, log_diag, off_diag, offsets, out=None):
    """(d/dloc, d/dlog_diag, d/doff_diag), contiguous, or written into ``out`` (three tensors
    of those shapes, any plane-contiguous strides: the slices of one head's gradient)."""
    B, C, H, W = x.shape
    x, loc, log_diag, off_diag = (planes_contiguous(t) for t in (x, loc, log_diag, off_diag))
    grad = grad.contiguous()
    meta = _meta(offsets, H, W, x)
    grid = (B * C, triton.cdiv(H * W, meta["BLOCK"]))
    u = torch.empty(x.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    if out is None:
        out = tuple(torch.empty(t.shape, dtype=t.dtype, device=x.device) for t in (x, log_diag, off_diag))
    grad_loc, grad_s, grad_w = out
    nll_backward_u_kernel[grid](grad, x, loc, log_diag, off_diag, u, grad_s, grad_w, C, H, W,
                                *_strides(x, loc, log_diag, off_diag, grad_s, grad_w), **meta)
    nll_backward_loc_kernel[grid](grad, u, log_diag, off_diag, grad_loc, C, H, W,
                                  *_strides(log_diag, off_diag, grad_loc), **meta)
    return grad_loc, grad_s, grad_w


def head_slices(head, c0, C, S):
    """loc, log_diag, off_diag as head.split gives them: channels from c0 of one decoder head."""
    return head.narrow(1, c0, C), head.narrow(1, c0 + C, C), head.narrow(1, c0 + 2 * C, S * C)


def head_backward(grad, x, head, c0, offsets):
    """The head's whole gradient: the three slices written in place, its other channels zero
    (autograd's backward of head.split, a cat of three gradients, never runs)."""
    C, S = x.shape[1], len(offsets) // 2
    grad_head = torch.empty(head.shape, dtype=head.dtype, device=head.device)
    grad_head[:, :c0].zero_()
    grad_head[:, c0 + (2 + S) * C:].zero_()
    backward(grad, x, *head_slices(head, c0, C, S), offsets, out=head_slices(grad_head, c0, C, S))
    return grad_head
