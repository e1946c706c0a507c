"""U r and U^T y (docs/contract.md §1).

apply_upper gathers ``w_{p,i} r_{p+delta_i}``; apply_upper_t gathers
``w_{p-delta_i,i} y_{p-delta_i}`` (the transposed stencil), so both write
each output pixel once, with no atomics. The parameters may have fewer images
than the input (``param_batch``): image b reads parameters b % param_batch.
With cross weights (``NCH`` = C, a constexpr) each pixel also gathers its partners in the other
channels of its image (common.cross_terms): M r and M^T y.
"""
import torch
import triton
import triton.language as tl

from .common import (acc_dtype, stencil_meta, block_for, cross_meta, cross_strides, cross_terms, empty, grid, neighbour, plane_start,
                     plane_strides, planes_contiguous, tile)


@triton.jit
def param_plane(k, C, param_batch):
    """The parameters' plane for image plane k: parameters repeat over the image batch."""
    return ((k // C) % param_batch) * C + k % C


@triton.jit
def apply_upper_kernel(inp, log_diag, off_diag, cross, out, C, H, W, HS, param_batch, isb, isc, ssb, ssc, wsb, wsc,
                       xsb, xsc, OFFS: tl.constexpr, S: tl.constexpr, VOL: tl.constexpr, TRANSPOSED: tl.constexpr,
                       ACC: tl.constexpr, BLOCK: tl.constexpr, NCH: tl.constexpr):
    _, k, p, y, x, valid = tile(H, W, BLOCK)
    kp = param_plane(k, C, param_batch)
    ib = plane_start(k, C, isb, isc)
    wb = plane_start(kp, C, wsb, wsc * S)
    acc = (tl.exp(tl.load(log_diag + plane_start(kp, C, ssb, ssc) + p, valid, 0.0).to(ACC))
           * tl.load(inp + ib + p, valid, 0.0).to(ACC))
    for i in tl.static_range(S):
        if TRANSPOSED:   # the weight belongs to row q = p - delta_i of U
            q, ok = neighbour(y, x, H, W, HS, -OFFS[3 * i], -OFFS[3 * i + 1], -OFFS[3 * i + 2], valid, VOL)
            term = tl.load(off_diag + wb + i * wsc + q, ok, 0.0).to(ACC) * tl.load(inp + ib + q, ok, 0.0).to(ACC)
        else:            # the weight at the pixel itself: a contiguous load under the tile's mask
            q, ok = neighbour(y, x, H, W, HS, OFFS[3 * i], OFFS[3 * i + 1], OFFS[3 * i + 2], valid, VOL)
            w_i = tl.load(off_diag + wb + i * wsc + p, valid, 0.0).to(ACC)
            term = tl.where(ok, w_i * tl.load(inp + ib + q, ok, 0.0).to(ACC), 0.0)
        acc += term
    if NCH > 1:
        acc = cross_terms(acc, cross, inp, (k // C) * isb, (kp // C) * xsb, k % C, p, valid, isc, xsc, NCH,
                          TRANSPOSED, ACC)
    tl.store(out + k * H * W + p, acc.to(out.dtype.element_ty), valid)


def launch(image: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, offsets, transposed: bool,
           cross=None):
    B, C, H, W = image.shape
    image, log_diag, off_diag = (planes_contiguous(t) for t in (image, log_diag, off_diag))
    cross = planes_contiguous(cross) if cross is not None else None
    out = empty(image.shape, image.dtype, image.device)
    block = block_for(H * W)
    meta = stencil_meta(offsets)
    apply_upper_kernel[grid(B * C, triton.cdiv(H * W, block))](
        image, log_diag, off_diag, cross_strides(cross, log_diag)[0], out, C, H, W, meta.pop("HS"), log_diag.shape[0],
        *plane_strides(image), *plane_strides(log_diag), *plane_strides(off_diag), *cross_strides(cross, log_diag)[1:],
        **meta, TRANSPOSED=transposed, ACC=acc_dtype(image), BLOCK=block,
        NCH=cross_meta(cross, C))
    return out
