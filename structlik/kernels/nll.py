"""The fused NLL (forward) and its backward.

Forward: each program reads its tile of x, loc, log_diag and off_diag (the
neighbours of x - loc come through the cache) and writes one partial sum of
0.5 u^2 - s; the host adds the partials of each image (a deterministic sum, no
atomics) and the normaliser.

Backward, one pass: d/ds = g (u r d - 1) and d/dw_{p,i} = g u_p r_{p+delta_i} need
u at the pixel, d/dloc = -g (d u + sum_i w_{p-delta_i,i} u_{p-delta_i}) needs u at the
neighbours, which other programs compute. So the training forward (``nll_u``) also
stores u = U r, one plane, and the backward reads it; d/dx is the negative of d/dloc,
formed by the caller only when x needs a gradient (data never does).

Bytes per pixel, in planes of the input dtype (u counts as one; float32 at S = 24,
docs/kernels.md has the model and the figures for each S):
  forward (eval)          reads x, loc, s, w: 3 + S                    = 27
  forward (training)      same, writes u: 3 + S + 1                     = 28
  backward                reads x, loc, s, w, u; writes dloc, ds, dw:
                          (4 + S) + (2 + S)                             = 54
  training step           28 + 54 = 6 + 3S                              = 82
(Before: forward 27, then a backward in two passes, 27 + 26 and 26 + 1, and a
negation pass of 2: 109 planes.) Neighbours' values are counted once: they come
through L1/L2, each plane's tile being read by one program and its halo by the
programs beside it.

Inputs are read through their batch and channel strides (``xs``, ``ls``, ``ss``,
``ws``: (batch, channel) pairs; common.plane_start), so split-head views are
never copied; u and the gradients are contiguous.
"""
import torch
import triton
import triton.language as tl

from .common import (acc_dtype, acc_torch_dtype, block_for, finish_nll, neighbour, partial_buffer, plane_start,
                     plane_strides, planes_contiguous, tile)


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
def nll_kernel(x, loc, log_diag, off_diag, partial, u_out, C, H, W, xsb, xsc, lsb, lsc, ssb, ssc, wsb, wsc,
               OFFS: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, STORE_U: tl.constexpr):
    k, p, y, xx, valid = tile(H, W, BLOCK)
    r, s, d, u = _residual_and_u(x, loc, log_diag, off_diag, k, p, y, xx, valid, C, H, W, xsb, xsc, lsb, lsc,
                                 ssb, ssc, wsb, wsc, OFFS, S, ACC)
    term = tl.where(valid, 0.5 * u * u - s, 0.0)
    tl.store(partial + k * tl.num_programs(1) + tl.program_id(1), tl.sum(term, axis=0))
    if STORE_U:      # training: one more plane written here saves the backward recomputing U r
        tl.store(u_out + k * H * W + p, u, valid)


@triton.jit
def nll_backward_kernel(grad, x, loc, log_diag, off_diag, u, grad_loc, grad_s, grad_w, C, H, W, xsb, xsc, lsb,
                        lsc, ssb, ssc, wsb, wsc, glsb, glsc, gssb, gssc, gwsb, gwsc, OFFS: tl.constexpr,
                        S: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """All three gradients in one pass, from the u the forward stored."""
    k, p, y, xx, valid = tile(H, W, BLOCK)
    ub = k * H * W
    xb = plane_start(k, C, xsb, xsc)
    lb = plane_start(k, C, lsb, lsc)
    wb = plane_start(k, C, wsb, wsc * S)
    gwb = plane_start(k, C, gwsb, gwsc * S)
    g = tl.load(grad + k // C).to(ACC)
    u_p = tl.load(u + ub + p, valid, 0.0).to(ACC)
    r = tl.load(x + xb + p, valid, 0.0).to(ACC) - tl.load(loc + lb + p, valid, 0.0).to(ACC)
    s = tl.load(log_diag + plane_start(k, C, ssb, ssc) + p, valid, 0.0).to(ACC)
    d = tl.exp(s)
    tl.store(grad_s + plane_start(k, C, gssb, gssc) + p, (g * (u_p * r * d - 1.0)).to(grad_s.dtype.element_ty),
             valid)
    acc = d * u_p
    for i in tl.static_range(S):
        # d/dw_{p,i} = g u_p r_{p+delta_i} (residual at the neighbour, through the cache) ...
        q, ok = neighbour(y, xx, H, W, OFFS[2 * i], OFFS[2 * i + 1], valid)
        r_q = tl.load(x + xb + q, ok, 0.0).to(ACC) - tl.load(loc + lb + q, ok, 0.0).to(ACC)
        tl.store(grad_w + gwb + i * gwsc + p, (g * u_p * r_q).to(grad_w.dtype.element_ty), valid)
        # ... and (U^T u)_p gathers w_{p-delta_i,i} u_{p-delta_i}
        q, ok = neighbour(y, xx, H, W, -OFFS[2 * i], -OFFS[2 * i + 1], valid)
        acc += tl.load(off_diag + wb + i * wsc + q, ok, 0.0).to(ACC) * tl.load(u + ub + q, ok, 0.0).to(ACC)
    tl.store(grad_loc + plane_start(k, C, glsb, glsc) + p, (-g * acc).to(grad_loc.dtype.element_ty), valid)


def _meta(offsets, H, W, x):
    return dict(OFFS=tuple(offsets), S=len(offsets) // 2, ACC=acc_dtype(x), BLOCK=block_for(H * W))


def _strides(*tensors):
    return [v for t in tensors for v in plane_strides(t)]


def forward(x, loc, log_diag, off_diag, offsets, with_u=False):
    """The per-image NLL, and with ``with_u`` also u = U (x - loc) (contiguous, in the
    accumulation dtype) for ``backward``."""
    B, C, H, W = x.shape
    x, loc, log_diag, off_diag = (planes_contiguous(t) for t in (x, loc, log_diag, off_diag))
    meta = _meta(offsets, H, W, x)
    tiles = triton.cdiv(H * W, meta["BLOCK"])
    partial = partial_buffer(x, B * C, tiles)
    # without with_u the kernel never stores u (STORE_U is a constexpr); any pointer will do
    u = torch.empty(x.shape, dtype=acc_torch_dtype(x), device=x.device) if with_u else partial
    nll_kernel[(B * C, tiles)](x, loc, log_diag, off_diag, partial, u, C, H, W,
                               *_strides(x, loc, log_diag, off_diag), STORE_U=with_u, **meta)
    nll = finish_nll(partial, x)
    return (nll, u) if with_u else nll


def backward(grad, x, loc, log_diag, off_diag, offsets, u=None, out=None):
    """(d/dloc, d/dlog_diag, d/doff_diag), contiguous, or written into ``out`` (three tensors
    of those shapes, any plane-contiguous strides: the slices of one head's gradient).
    ``u``: what ``forward(..., with_u=True)`` returned; computed here (one more pass) if None."""
    B, C, H, W = x.shape
    x, loc, log_diag, off_diag = (planes_contiguous(t) for t in (x, loc, log_diag, off_diag))
    if u is None:
        u = forward(x, loc, log_diag, off_diag, offsets, with_u=True)[1]
    grad = grad.contiguous()
    meta = _meta(offsets, H, W, x)
    if out is None:
        out = tuple(torch.empty(t.shape, dtype=t.dtype, device=x.device) for t in (x, log_diag, off_diag))
    grad_loc, grad_s, grad_w = out
    nll_backward_kernel[(B * C, triton.cdiv(H * W, meta["BLOCK"]))](
        grad, x, loc, log_diag, off_diag, u, grad_loc, grad_s, grad_w, C, H, W,
        *_strides(x, loc, log_diag, off_diag, grad_loc, grad_s, grad_w), **meta)
    return grad_loc, grad_s, grad_w


def head_slices(head, c0, C, S):
    """loc, log_diag, off_diag as head.split gives them: channels from c0 of one decoder head."""
    return head.narrow(1, c0, C), head.narrow(1, c0 + C, C), head.narrow(1, c0 + 2 * C, S * C)


def head_backward(grad, x, head, c0, offsets, u=None):
    """The head's whole gradient: the three slices written in place, its other channels zero
    (autograd's backward of head.split, a cat of three gradients, never runs)."""
    C, S = x.shape[1], len(offsets) // 2
    grad_head = torch.empty(head.shape, dtype=head.dtype, device=head.device)
    grad_head[:, :c0].zero_()
    grad_head[:, c0 + (2 + S) * C:].zero_()
    backward(grad, x, *head_slices(head, c0, C, S), offsets, u=u, out=head_slices(grad_head, c0, C, S))
    return grad_head
