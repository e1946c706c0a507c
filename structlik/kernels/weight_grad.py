"""weight_grad(a, b, batch)[j, c*S+i, p] = sum_{k = j mod batch} a_kp b_{k,p+delta_i}: the off_diag gradient
of sum_k a_k^T U b_k, image k using parameters k % batch. One program per output tile, the repeats
summed in registers (no k*S planes written and summed afterwards)."""
import triton
import triton.language as tl

from .common import acc_dtype, stencil_meta, block_for, empty, grid, neighbour, plane_start, plane_strides, planes_contiguous, tile


@triton.jit
def weight_grad_kernel(a, b, out, C, H, W, HS, repeats, planes, asb, asc, bsb, bsc, OFFS: tl.constexpr,
                       S: tl.constexpr, VOL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    _, k, p, y, x, valid = tile(H, W, BLOCK)      # k: an output plane; its inputs are k + t*planes
    n = H * W
    for i in tl.static_range(S):
        q, ok = neighbour(y, x, H, W, HS, OFFS[3 * i], OFFS[3 * i + 1], OFFS[3 * i + 2], valid, VOL)
        acc = tl.zeros([BLOCK], ACC)
        kt = k
        while kt < k + repeats * planes:      # (a while: the interpreter's range() takes no runtime bound)
            a_p = tl.load(a + plane_start(kt, C, asb, asc) + p, valid, 0.0).to(ACC)
            b_q = tl.load(b + plane_start(kt, C, bsb, bsc) + q, ok, 0.0).to(ACC)
            acc += a_p * b_q
            kt += planes
        tl.store(out + (k * S + i) * n + p, acc.to(out.dtype.element_ty), valid)


def launch(a, b, offsets, batch):
    B, C, H, W = a.shape
    meta = stencil_meta(offsets)
    S = meta["S"]
    a, b = planes_contiguous(a), planes_contiguous(b)
    out = empty((batch, C * S, H, W), a.dtype, a.device)
    if out.numel() == 0:
        return out
    block = block_for(H * W)
    weight_grad_kernel[grid(batch * C, triton.cdiv(H * W, block))](
        a, b, out, C, H, W, meta.pop("HS"), B // batch, batch * C, *plane_strides(a), *plane_strides(b), **meta,
        ACC=acc_dtype(a), BLOCK=block)
    return out
