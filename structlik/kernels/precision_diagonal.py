"""diag(U^T U)_p = d_p^2 + sum_i w_{p-delta_i,i}^2, gathered (no atomics)."""
import torch
import triton
import triton.language as tl

from .common import acc_dtype, block_for, neighbour, tile


@triton.jit
def precision_diagonal_kernel(log_diag, off_diag, out, H, W, OFFS: tl.constexpr, S: tl.constexpr,
                              ACC: tl.constexpr, BLOCK: tl.constexpr):
    k, p, y, x, valid = tile(H, W, BLOCK)
    n = H * W
    acc = tl.exp(2.0 * tl.load(log_diag + k * n + p, valid, 0.0).to(ACC))
    for i in tl.static_range(S):
        q, ok = neighbour(y, x, H, W, -OFFS[2 * i], -OFFS[2 * i + 1], valid)
        w = tl.load(off_diag + (k * S + i) * n + q, ok, 0.0).to(ACC)
        acc += w * w
    tl.store(out + k * n + p, acc.to(out.dtype.element_ty), valid)


def launch(log_diag, off_diag, offsets):
    B, C, H, W = log_diag.shape
    log_diag, off_diag = log_diag.contiguous(), off_diag.contiguous()
    out = torch.empty_like(log_diag)
    block = block_for(H * W)
    precision_diagonal_kernel[(triton.cdiv(H * W, block), B * C)](
        log_diag, off_diag, out, H, W, OFFS=tuple(offsets), S=len(offsets) // 2, ACC=acc_dtype(log_diag),
        BLOCK=block)
    return out
