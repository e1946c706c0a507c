"""Pieces shared by the Triton kernels.

The stencil reaches every kernel as ``OFFS``, a constexpr tuple
``(dy0, dx0, dy1, dx1, ...)``, so loops over offsets unroll at compile time and
each distinct stencil gets its own specialised kernel. Pixels of one (b, c)
plane are indexed in raster order; a program handles ``BLOCK`` consecutive
pixels of one plane. Grid: planes x tiles on axis 0 (``grid``; the solves: one
program per plane), whose limit is 2^31 - 1: 8192x8192 planes of 256-pixel
tiles leave room for 8,191 of them. Plane offsets are computed in int64 so that
B*C*S*H*W may exceed 2^31.

Inputs are read in place: each H x W plane must be contiguous, the batch and
channel strides are free (``head.split`` views are not copied); see
``plane_strides``. Outputs are written contiguous.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .._dtypes import compute_dtype

# Elementwise stencil kernels: pixels per program, at most 256 (2 per thread at
# 4 warps). Each pixel keeps its S unrolled neighbours' values in registers: at
# 1024 pixels per program the backward's first pass sat at 255 registers and
# spilled (2.4 KB per thread at radius 3, 12.5% occupancy on an H100), and at 256
# nothing spills in any dtype (tools/triton_aot.py, results in
# benchmarks/RESULTS.md). The interpreter's cost per program does not matter:
# the tests' images are smaller than one block.
MAX_BLOCK = 256


def block_for(n: int) -> int:
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(n)))


def acc_dtype(t: torch.Tensor):
    """The registers' dtype: ``t``'s compute dtype (structlik/_dtypes.py) as a Triton type."""
    return tl.float64 if compute_dtype(t) == torch.float64 else tl.float32


# STRUCTLIK_POISON_EMPTY=1 (the tests set it): every buffer and output the kernels allocate starts
# as NaN instead of whatever memory held, so an element a kernel forgets to write shows in a result.
POISON = os.environ.get("STRUCTLIK_POISON_EMPTY") == "1"


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for the kernels' outputs and buffers, NaN-filled under STRUCTLIK_POISON_EMPTY=1."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def stencil_meta(offsets) -> dict:
    """The stencil's constexprs from the ops' offsets: OFFS as (dz, dy, dx) triples (dz = 0 for
    images), S, and VOL, whether they are a volume's (its tall view, ``[-h, dz0, dy0, dx0, ...]``,
    docs/contract.md §3); and HS, a volume's slice height h (1 for images), a runtime argument so
    that one compilation serves every volume size."""
    offsets = tuple(int(v) for v in offsets)
    if offsets and offsets[0] < 0:
        return dict(OFFS=offsets[1:], S=(len(offsets) - 1) // 3, VOL=True, HS=-offsets[0])
    triples = tuple(v for i in range(0, len(offsets), 2) for v in (0, offsets[i], offsets[i + 1]))
    return dict(OFFS=triples, S=len(offsets) // 2, VOL=False, HS=1)


@triton.jit
def neighbour(y, x, H, W, HS, dz: tl.constexpr, dy: tl.constexpr, dx: tl.constexpr, valid, VOL: tl.constexpr):
    """Flat index of the neighbour (dz, dy, dx) of row y, column x, and whether it lies inside the
    image (dz = 0) or, for a volume's tall view (VOL: H = D*HS rows, row y = z*HS + y'), inside
    the volume: a tall neighbour across a slice boundary is not one."""
    nx = x + dx
    if VOL:
        ys = y % HS + dy
        nz = y // HS + dz
        ny = y + dz * HS + dy
        inside = valid & (ys >= 0) & (ys < HS) & (nz >= 0) & (nz < H // HS) & (nx >= 0) & (nx < W)
    else:
        ny = y + dy
        inside = valid & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
    return ny * W + nx, inside


# Tiled kernels run on a 1-D grid of planes x tiles, program = k * tiles + tile: CUDA allows
# 2^31 - 1 programs on axis 0 but 65,535 on axes 1 and 2, which one 4096x4096 plane's 65,536
# tiles of 256 exceeded (as 100,000 planes of a many-sample solve would have on axis 1).
GRID_LIMIT = 2 ** 31 - 1


def grid(planes: int, tiles: int) -> tuple:
    """The launch grid of a tiled kernel over ``planes`` planes of ``tiles`` tiles each."""
    if planes * tiles > GRID_LIMIT:
        raise ValueError(f"the Triton kernels take at most {GRID_LIMIT} programs: B*C = {planes} planes of "
                         f"{tiles} tiles each is {planes * tiles}; split the batch")
    return (planes * tiles,)


@triton.jit
def tile(H, W, BLOCK: tl.constexpr):
    """This program's index, its plane k (int64), its pixels p, their (y, x) and the in-image mask.
    The division in int32 (the grid is below 2^31): in int64 it spilled the basis backward."""
    program = tl.program_id(0)
    tiles = tl.cdiv(H * W, BLOCK)
    k = (program // tiles).to(tl.int64)
    p = (program % tiles) * BLOCK + tl.arange(0, BLOCK)
    valid = p < H * W
    return program, k, p, p // W, p % W, valid


# --- coupled channels (docs/contract.md §1): the cross weights, plane kappa(c, j) of the pair c < j --

def cross_meta(cross, C: int) -> int:
    """NCH, the kernels' constexpr: C with cross weights (each channel's partners unrolled), else 1."""
    return C if cross is not None and C > 1 else 1


@triton.jit
def cross_index(c, j, C):
    """kappa(c, j) = c(2C-c-1)/2 + j-c-1 for c < j."""
    return c * (2 * C - c - 1) // 2 + j - c - 1


@triton.jit
def cross_terms(acc, cross, inp, ib, xb, c, p, valid, isc, xsc, NCH: tl.constexpr, TRANSPOSED: tl.constexpr,
                ACC: tl.constexpr):
    """acc plus plane c's partners at pixels p: M's sum_{j>c} xi_{kappa(c,j)} v_j, or (TRANSPOSED) M^T's
    sum_{j<c} xi_{kappa(j,c)} v_j, with v = ``inp`` from ib (the image's start, channel stride isc)
    and the cross weights from xb (channel stride xsc). Masked loads for the channels that are not
    partners: c is a runtime value, j unrolled."""
    for j in tl.static_range(NCH):
        if TRANSPOSED:
            partner = valid & (j < c)
            kap = cross_index(j, c, NCH)
        else:
            partner = valid & (j > c)
            kap = cross_index(c, j, NCH)
        kap = tl.maximum(kap, 0)
        xi = tl.load(cross + xb + kap * xsc + p, partner, 0.0).to(ACC)
        acc += xi * tl.load(inp + ib + j * isc + p, partner, 0.0).to(ACC)
    return acc


def cross_strides(cross, fallback):
    """The cross weights (or, without them, any tensor: never read) and their (batch, channel) strides."""
    return (cross, *plane_strides(cross)) if cross is not None else (fallback, 0, 0)


@triton.jit
def plane_start(k, C, sb, sc):
    """Where image plane k = b*C + c starts in an operand with batch stride sb and channel
    stride sc (for off_diag pass sc*S: channel c's S weight planes follow each other)."""
    return (k // C) * sb + (k % C) * sc


def planes_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when each H x W plane is contiguous, else one contiguous copy."""
    H, W = t.shape[-2:]
    rows_ok = H <= 1 or t.stride(-2) == W
    cols_ok = W <= 1 or t.stride(-1) == 1
    return t if rows_ok and cols_ok else t.contiguous()


def plane_strides(t: torch.Tensor):
    """(batch stride, channel stride) of a planes-contiguous (B, C', H, W) operand."""
    return t.stride(0), t.stride(1)


def finish_nll(partial: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image NLL from per-program partials (B*C, tiles): a deterministic sum plus the normaliser.

    In the accumulation dtype: float16/bfloat16 inputs give a float32 NLL."""
    B, C, H, W = x.shape
    return partial.view(B, partial.numel() // max(B, 1)).sum(1) + 0.5 * C * H * W * math.log(2 * math.pi)
