"""weight_grad(a, b)[c*S+i, p] = a_p b_{p+delta_i}: the off_diag gradient of a^T U b."""
import triton
import triton.language as tl

from .common import acc_dtype, stencil_meta, block_for, empty, grid, neighbour, plane_start, plane_strides, planes_contiguous, tile


@triton.jit
def weight_grad_kernel(a, b, out, C, H, W, HS, asb, asc, bsb, bsc, OFFS: tl.constexpr, S: tl.constexpr,
                       VOL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    _, k, p, y, x, valid = tile(H, W, BLOCK)
    n = H * W
    a_p = tl.load(a + plane_start(k, C, asb, asc) + p, valid, 0.0).to(ACC)
    bb = plane_start(k, C, bsb, bsc)
    for i in tl.static_range(S):
        q, ok = neighbour(y, x, H, W, HS, OFFS[3 * i], OFFS[3 * i + 1], OFFS[3 * i + 2], valid, VOL)
        b_q = tl.load(b + bb + q, ok, 0.0).to(ACC)
        tl.store(out + (k * S + i) * n + p, (a_p * b_q).to(out.dtype.element_ty), valid)


def launch(a, b, offsets):
    B, C, H, W = a.shape
    meta = stencil_meta(offsets)
    S = meta["S"]
    a, b = planes_contiguous(a), planes_contiguous(b)
    out = empty((B, C * S, H, W), a.dtype, a.device)
    block = block_for(H * W)
    weight_grad_kernel[grid(B * C, triton.cdiv(H * W, block))](
        a, b, out, C, H, W, meta.pop("HS"), *plane_strides(a), *plane_strides(b), **meta, ACC=acc_dtype(a),
        BLOCK=block)
    return out
