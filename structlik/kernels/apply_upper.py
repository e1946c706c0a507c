"""U r and U^T y (SPEC section 1).

apply_upper gathers ``w_{p,i} r_{p+delta_i}``; apply_upper_t gathers
``w_{p-delta_i,i} y_{p-delta_i}`` (the transposed stencil), so both write
each output pixel once, with no atomics.
"""
import torch
import triton
import triton.language as tl

from .common import acc_dtype, block_for, neighbour, tile


@triton.jit
def apply_upper_kernel(inp, log_diag, off_diag, out, H, W, OFFS: tl.constexpr, S: tl.constexpr,
                       TRANSPOSED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    k, p, y, x, valid = tile(H, W, BLOCK)
    n = H * W
    base = k * n
    acc = tl.exp(tl.load(log_diag + base + p, valid, 0.0).to(ACC)) * tl.load(inp + base + p, valid, 0.0).to(ACC)
    for i in tl.static_range(S):
        if TRANSPOSED:   # the weight belongs to row q = p - delta_i of U
            q, ok = neighbour(y, x, H, W, -OFFS[2 * i], -OFFS[2 * i + 1], valid)
            w_i = tl.load(off_diag + (k * S + i) * n + q, ok, 0.0).to(ACC)
        else:
            q, ok = neighbour(y, x, H, W, OFFS[2 * i], OFFS[2 * i + 1], valid)
            w_i = tl.load(off_diag + (k * S + i) * n + p, ok, 0.0).to(ACC)
        acc += w_i * tl.load(inp + base + q, ok, 0.0).to(ACC)
    tl.store(out + base + p, acc.to(out.dtype.element_ty), valid)


def launch(image: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, offsets, transposed: bool):
    B, C, H, W = image.shape
    image, log_diag, off_diag = image.contiguous(), log_diag.contiguous(), off_diag.contiguous()
    out = torch.empty_like(image)
    block = block_for(H * W)
    apply_upper_kernel[(triton.cdiv(H * W, block), B * C)](
        image, log_diag, off_diag, out, H, W, OFFS=tuple(offsets), S=len(offsets) // 2,
        TRANSPOSED=transposed, ACC=acc_dtype(image), BLOCK=block)
    return out
