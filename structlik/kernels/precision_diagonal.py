"""diag(U^T U)_p = d_p^2 + sum_i w_{p-delta_i,i}^2, gathered (no atomics); with cross weights
(``NCH`` = C) channel j adds sum_{c<j} xi_{kappa(c,j),p}^2, the rest of M's column."""
import triton
import triton.language as tl

from .common import (acc_dtype, stencil_meta, block_for, cross_index, cross_meta, cross_strides, empty, grid, neighbour, plane_start,
                     plane_strides, planes_contiguous, tile)


@triton.jit
def precision_diagonal_kernel(log_diag, off_diag, cross, out, C, H, W, HS, ssb, ssc, wsb, wsc, xsb, xsc,
                              OFFS: tl.constexpr, S: tl.constexpr, VOL: tl.constexpr, ACC: tl.constexpr,
                              BLOCK: tl.constexpr, NCH: tl.constexpr):
    _, k, p, y, x, valid = tile(H, W, BLOCK)
    wb = plane_start(k, C, wsb, wsc * S)
    acc = tl.exp(2.0 * tl.load(log_diag + plane_start(k, C, ssb, ssc) + p, valid, 0.0).to(ACC))
    for i in tl.static_range(S):
        q, ok = neighbour(y, x, H, W, HS, -OFFS[3 * i], -OFFS[3 * i + 1], -OFFS[3 * i + 2], valid, VOL)
        w = tl.load(off_diag + wb + i * wsc + q, ok, 0.0).to(ACC)
        acc += w * w
    if NCH > 1:
        j = k % C
        for c in tl.static_range(NCH):
            partner = valid & (c < j)
            xi = tl.load(cross + (k // C) * xsb + tl.maximum(cross_index(c, j, NCH), 0) * xsc + p, partner,
                         0.0).to(ACC)
            acc += xi * xi
    tl.store(out + k * H * W + p, acc.to(out.dtype.element_ty), valid)


def launch(log_diag, off_diag, offsets, cross=None):
    B, C, H, W = log_diag.shape
    log_diag, off_diag = planes_contiguous(log_diag), planes_contiguous(off_diag)
    cross = planes_contiguous(cross) if cross is not None else None
    out = empty(log_diag.shape, log_diag.dtype, log_diag.device)
    block = block_for(H * W)
    xs = cross_strides(cross, log_diag)
    meta = stencil_meta(offsets)
    precision_diagonal_kernel[grid(B * C, triton.cdiv(H * W, block))](
        log_diag, off_diag, xs[0], out, C, H, W, meta.pop("HS"), *plane_strides(log_diag), *plane_strides(off_diag), *xs[1:],
        **meta, ACC=acc_dtype(log_diag), BLOCK=block, NCH=cross_meta(cross, C))
    return out
