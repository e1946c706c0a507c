"""Sigma's band by the Takahashi recurrence on a wavefront schedule (docs/kernels.md §4).

Entry (i, j = i + k), 0 <= k <= b, of Sigma = U^-1 U^-T reads the entries (i + f_d, j) (and the
diagonal reads (i, i + f_d)). With t(p) = a*(H-1-y) + (W-1-x), the solve's wavefront step
(a = the stencil's slope), every read entry has a smaller level T = t(i) + t(j), so the entries
of one level are independent: one program per (b, c) plane walks the 2*t_max + 1 levels with a
barrier between them, its lanes spread over the level's entries.

A level's entries are enumerated by lane (k, wrap, row): with k = q*W + m, j lies m columns right
of i and q rows down, or (wrap, m > 0) m - W columns and q + 1 rows down; then
t(j) = t(i) - c with c = a*q + m (or a*(q+1) + m - W), so t(i) = (T + c) / 2 when T + c is even,
and i is the row-th pixel of wavefront t(i), as in the solve. A level enumerates only the
(k, wrap) whose c has T's parity (``parity_pairs``, a table the lanes read); of those, about half
hold an entry (one of the two wrap cases per row of a wavefront).

The band lives in the output (B, C*L, H, W) (its entries past the image stay 0), which is also
the recurrence's memory: on the GPU ``diagonal_only`` keeps the band and returns its first plane.
The backward walks the levels downwards and gathers each entry's adjoint from the entries that read
it (all on higher levels, so final): no atomics. The parameter gradients then sum over each
pixel's row of the band in a tiled kernel.
"""
import functools

import torch
import triton
import triton.language as tl

from .common import acc_dtype, block_for, empty, grid, plane_start, plane_strides, planes_contiguous, tile
from .solve_upper import wavefront_slope
from .. import reference
from ..reference import cached_unless_tracing
from ..stencil import Stencil


def band_length(offsets, W: int) -> int:
    """L = b + 1, b the largest flat offset (of a volume's offsets, in its tall view)."""
    return max(dy * W + dx for dy, dx in Stencil.from_flat_offsets(offsets).tall_offsets) + 1


@triton.jit
def _entry(e, T, H, W, RW, lanes_per_level, pairs, SLOPE: tl.constexpr):
    """Lane e's entry of level T: (ok, k, i's y and x, j's y and x). ``pairs`` (2, P): for each parity
    of T, the codes 2k + wrap whose c has that parity (-1 pads), so no lane is spent on the half of
    (k, wrap) that has no entry on this level."""
    rho = e % RW
    P = lanes_per_level // RW
    code = tl.load(pairs + (T % 2) * P + e // RW, e < lanes_per_level, -1)
    wrap = tl.maximum(code, 0) % 2
    k = tl.maximum(code, 0) // 2
    q = k // W
    m = k % W
    c = tl.where(wrap == 0, SLOPE * q + m, SLOPE * (q + 1) + m - W)
    twice = T + c
    ok = (code >= 0) & (twice >= 0) & ((twice % 2) == 0)
    ti = tl.maximum(twice, 0) // 2
    y = tl.maximum(H - 1 - ti // SLOPE, 0) + rho
    x = (W - 1) - (ti - SLOPE * (H - 1 - y))
    ok = ok & (ti <= SLOPE * (H - 1) + W - 1) & (y < H) & (x >= 0) & (x < W)
    ok = ok & tl.where(wrap == 0, x + m < W, (m > 0) & (x + m >= W))
    yj = y + q + wrap
    xj = tl.where(wrap == 0, x + m, x + m - W)
    ok = ok & (yj < H)
    return ok, k, y, x, yj, xj


@triton.jit
def band_length_of(W, OFFS: tl.constexpr, S: tl.constexpr):
    """L = max(dy*W + dx) + 1 over the offsets (W is a runtime value)."""
    b = OFFS[0] * W + OFFS[1]
    for s in tl.static_range(1, S):
        b = tl.maximum(b, OFFS[2 * s] * W + OFFS[2 * s + 1])
    return b + 1


@triton.jit
def covariance_band_kernel(log_diag, off_diag, band, pairs, C, H, W, RW, levels, lanes_per_level, ssb, ssc, wsb, wsc,
                           SLOPE: tl.constexpr, OFFS: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr,
                           LANES: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    n = H.to(tl.int64) * W            # int64: L*n passes 2^31 from 2048x2048 radius 3
    base = plane * (band_length_of(W, OFFS, S) * n)
    sb = plane_start(plane, C, ssb, ssc)
    wb = plane_start(plane, C, wsb, wsc * S)
    lane = tl.arange(0, LANES)
    T = 0
    while T < levels:                  # a while loop: see solve_upper_kernel
        chunk = 0
        while chunk < lanes_per_level:
            ok, k, y, x, yj, xj = _entry(chunk + lane, T, H, W, RW, lanes_per_level, pairs, SLOPE)
            i = y * W + x
            j = i + k
            acc = tl.zeros([LANES], ACC)
            # w/d before it meets Sigma (|w/d| <= 1 when bounded): w * Sigma overflows float32 where d
            # spans e^+-30 although every entry of Sigma fits (issue #39 item 2)
            inv = 1.0 / tl.exp(tl.load(log_diag + sb + i, ok, 0.0).to(ACC))
            for s in tl.static_range(S):
                dy = OFFS[2 * s]
                dx = OFFS[2 * s + 1]
                inside = ok & (y + dy < H) & (x + dx >= 0) & (x + dx < W)
                w = tl.load(off_diag + wb + s * wsc + i, inside, 0.0).to(ACC)
                a = i + dy * W + dx                 # Sigma_{a, j}, stored at (|j - a|, min(a, j))
                sig = tl.load(band + base + tl.abs(j - a) * n + tl.minimum(a, j), inside, 0.0)
                acc += (w * inv) * sig
            value = tl.where(k == 0, inv * inv - acc, -acc)
            tl.store(band + base + k * n + i, value, ok)
            chunk += LANES
        tl.debug_barrier()
        T += 1


@triton.jit
def _reader_terms(adj, s, dy, dx, ok, k, y, x, yj, xj, a, W, L, n, base, wb, sb, wsc, off_diag, log_diag, adjoint,
                  ACC: tl.constexpr):
    """adj minus the shares of offset s's two readers of the entry (k, a)."""
    fl = dy * W + dx
    # reader (a - delta, c): its entry k + f of the band, if within it
    r1 = ok & (y - dy >= 0) & (x - dx >= 0) & (x - dx < W) & (k + fl < L)
    p1 = a - fl
    w1 = tl.load(off_diag + wb + s * wsc + p1, r1, 0.0).to(ACC)
    d1 = tl.exp(tl.load(log_diag + sb + p1, r1, 0.0).to(ACC))
    adj -= tl.load(adjoint + base + (k + fl) * n + p1, r1, 0.0) * (w1 / d1)
    # reader (c - delta, a), when a != c and a >= c - delta: its entry f - k
    r2 = ok & (k > 0) & (k <= fl) & (yj - dy >= 0) & (xj - dx >= 0) & (xj - dx < W)
    p2 = a + k - fl
    w2 = tl.load(off_diag + wb + s * wsc + p2, r2, 0.0).to(ACC)
    d2 = tl.exp(tl.load(log_diag + sb + p2, r2, 1.0).to(ACC))
    adj -= tl.load(adjoint + base + (fl - k) * n + p2, r2, 0.0) * (w2 / d2)
    return adj


@triton.jit
def covariance_band_adjoint_kernel(grad, log_diag, off_diag, adjoint, pairs, offs, C, H, W, RW, levels,
                                   lanes_per_level, ssb, ssc, wsb, wsc, SLOPE: tl.constexpr, OFFS: tl.constexpr,
                                   S: tl.constexpr, ACC: tl.constexpr, LANES: tl.constexpr, UNROLL: tl.constexpr):
    """adjoint_{a,c} = grad_{a,c} + the share of every entry (r, .) that read Sigma_{a,c}: the entry
    (r = a - delta, c) and, for a != c, (r = c - delta, a), each with factor -w_{r,delta} / d_r.
    UNROLL: the offsets unrolled (OFFS); else a loop over them read from ``offs`` (int32 pairs): at
    S = 62 (a volume at radius 2) the unrolled kernel spilled 1,032 bytes at one lane a thread."""
    plane = tl.program_id(0).to(tl.int64)
    n = H.to(tl.int64) * W            # int64: L*n passes 2^31 from 2048x2048 radius 3
    L = band_length_of(W, OFFS, S)
    base = plane * (L * n)
    sb = plane_start(plane, C, ssb, ssc)
    wb = plane_start(plane, C, wsb, wsc * S)
    lane = tl.arange(0, LANES)
    level = 0
    while level < levels:
        T = levels - 1 - level
        chunk = 0
        while chunk < lanes_per_level:
            ok, k, y, x, yj, xj = _entry(chunk + lane, T, H, W, RW, lanes_per_level, pairs, SLOPE)
            a = y * W + x
            adj = tl.load(grad + base + k * n + a, ok, 0.0).to(ACC)
            if UNROLL:
                for s in tl.static_range(S):
                    adj = _reader_terms(adj, s, OFFS[2 * s], OFFS[2 * s + 1], ok, k, y, x, yj, xj, a, W, L, n, base,
                                        wb, sb, wsc, off_diag, log_diag, adjoint, ACC)
            else:
                s = 0
                while s < S:
                    adj = _reader_terms(adj, s, tl.load(offs + 2 * s), tl.load(offs + 2 * s + 1), ok, k, y, x, yj,
                                        xj, a, W, L, n, base, wb, sb, wsc, off_diag, log_diag, adjoint, ACC)
                    s += 1
            tl.store(adjoint + base + k * n + a, adj, ok)
            chunk += LANES
        tl.debug_barrier()
        level += 1


@triton.jit
def covariance_band_grads_kernel(adjoint, band, log_diag, grad_s, grad_w, C, H, W, L, ssb, ssc,
                                 OFFS: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """d/ds_i = -sum_k A_{i,k} Sigma_{i,i+k} - A_{i,0}/d_i^2;
    d/dw_{i,delta} = -(1/d_i) sum_k A_{i,k} Sigma_{i+f, i+k} (0 where i + delta is outside)."""
    _, plane, i, y, x, valid = tile(H, W, BLOCK)
    n = H.to(tl.int64) * W            # int64: L*n passes 2^31 from 2048x2048 radius 3
    base = plane * (L * n)
    inv = 1.0 / tl.exp(tl.load(log_diag + plane_start(plane, C, ssb, ssc) + i, valid, 0.0).to(ACC))
    a0 = tl.load(adjoint + base + i, valid, 0.0)
    ds = -a0 * inv * inv
    k = 0
    while k < L:
        live = valid & (i + k < n)
        ds -= tl.load(adjoint + base + k * n + i, live, 0.0) * tl.load(band + base + k * n + i, live, 0.0)
        k += 1
    tl.store(grad_s + plane * n + i, ds.to(grad_s.dtype.element_ty), valid)
    for s in tl.static_range(S):
        dy = OFFS[2 * s]
        dx = OFFS[2 * s + 1]
        inside = valid & (y + dy < H) & (x + dx >= 0) & (x + dx < W)
        fl = dy * W + dx
        acc = tl.zeros([BLOCK], ACC)
        k = 0
        while k < L:
            live = inside & (i + k < n)
            j = i + k
            p = i + fl
            sig = tl.load(band + base + tl.abs(j - p) * n + tl.minimum(p, j), live, 0.0)
            acc += tl.load(adjoint + base + k * n + i, live, 0.0) * sig
            k += 1
        tl.store(grad_w + (plane * S + s) * n + i, (-acc * inv).to(grad_w.dtype.element_ty), valid)


@functools.lru_cache(maxsize=64)
def parity_pairs(offsets: tuple, W: int):
    """[codes 2k + wrap with c even, codes with c odd], c = a*q + m (wrap 0) or a*(q+1) + m - W (wrap 1,
    m > 0) for k = q*W + m: an entry of level T has T + c even."""
    slope, out = wavefront_slope(offsets), ([], [])
    for k in range(band_length(offsets, W)):
        q, m = divmod(k, W)
        out[(slope * q + m) % 2].append(2 * k)
        if m > 0:
            out[(slope * (q + 1) + m - W) % 2].append(2 * k + 1)
    return out


@cached_unless_tracing(maxsize=64)
def _pairs_table(offsets: tuple, W: int, device: torch.device) -> torch.Tensor:
    even, odd = parity_pairs(offsets, W)      # (cached: a Python loop over the band, once per shape)
    P = max(len(even), len(odd))
    return torch.tensor([even + [-1] * (P - len(even)), odd + [-1] * (P - len(odd))], dtype=torch.int32,
                        device=device)


def _schedule(H: int, W: int, offsets, max_lanes: int = 1024):
    """(slope, L, rows of a wavefront, lanes a level enumerates, lanes per chunk, levels)."""
    slope = wavefront_slope(offsets)
    L = band_length(offsets, W)
    rows = min(H, -(-W // slope))
    lanes_per_level = max(len(p) for p in parity_pairs(tuple(offsets), W)) * rows
    lanes = max(16, min(max_lanes, triton.next_power_of_2(lanes_per_level)))
    levels = 2 * (slope * (H - 1) + W - 1) + 1
    return slope, L, rows, lanes_per_level, lanes, levels


# Lanes per thread: the forward holds 4 (1024 lanes on 8 warps: 113 registers at radius 3, S = 24,
# no spill); the adjoint reads two readers per offset, and at 4 lanes per thread spilled 16 bytes at
# S = 20 and 10 KB at S = 24, so it takes 2; at radius 4 (S = 40) 2 lanes a thread sat at 255
# registers and spilled 1,816 bytes (128x128), so past S = 24 it takes 1 (tools/triton_aot.py, sm_90).
FORWARD_LANES, ADJOINT_LANES = 1024, 512


# The adjoint's offsets are unrolled up to S = 40 (radius 4 of an image: 180 registers, no spill);
# past it they are a loop (S = 62, a volume at radius 2: 1,032 bytes spilled unrolled).
UNROLLED_ADJOINT = 40


def _adjoint_lanes_per_thread(S: int) -> int:
    return 2 if S <= 24 else 1


def _warps(lanes: int, per_thread: int) -> int:
    return max(1, min(8, lanes // (32 * per_thread)))


def _band(log_diag, off_diag, offsets):
    B, C, H, W = log_diag.shape
    slope, L, rows, lanes_per_level, lanes, levels = _schedule(H, W, offsets, FORWARD_LANES)
    band = torch.zeros(B, C * L, H, W, dtype=torch.float64 if log_diag.dtype == torch.float64 else torch.float32,
                       device=log_diag.device)
    if B * C:
        covariance_band_kernel[(B * C,)](
            log_diag, off_diag, band, _pairs_table(tuple(offsets), W, log_diag.device), C, H, W, rows, levels, lanes_per_level, *plane_strides(log_diag),
            *plane_strides(off_diag), SLOPE=slope, OFFS=tuple(offsets), S=len(offsets) // 2,
            ACC=acc_dtype(log_diag), LANES=lanes, num_warps=_warps(lanes, 4))
    return band


def tall_image(off_diag, offsets):
    """A volume's band as its tall view's (docs/contract.md §3): the recurrence of this file runs on
    the tall image with the tall offsets (dz*h + dy, dx) and the weights that would cross a slice
    boundary set to 0 (one masked copy of off_diag; they are not part of U). An offset that never
    lands inside the volume (|dy| >= h) and does not point forward in the tall raster order (h = 1)
    becomes (0, 1), with zero weights; its flat offset is below 1, so the band's length is kept.
    Returns (off_diag, offsets, mask) with mask None for images."""
    stencil = Stencil.from_flat_offsets(offsets)
    if stencil.ndim == 2:
        return off_diag, list(offsets), None
    B, CS, H, W = off_diag.shape
    mask = reference.read_mask(stencil, H, W, off_diag.device)
    tall = [v for dy, dx in stencil.tall_offsets for v in ((dy, dx) if dy > 0 or (dy == 0 and dx > 0) else (0, 1))]
    masked = torch.where(mask, off_diag.unflatten(1, (-1, stencil.S)), 0).flatten(1, 2)
    return masked, tall, mask


def launch(log_diag, off_diag, offsets, diagonal_only: bool):
    log_diag, off_diag = planes_contiguous(log_diag), planes_contiguous(off_diag)
    off_diag, offsets, _ = tall_image(off_diag, offsets)
    B, C, H, W = log_diag.shape
    band = _band(log_diag, off_diag, offsets)
    if diagonal_only:
        band = band.view(B, C, band_length(offsets, W), H, W)[:, :, 0]
    return band.to(log_diag.dtype).contiguous()


def launch_backward(grad, log_diag, off_diag, band, offsets):
    log_diag, off_diag = planes_contiguous(log_diag), planes_contiguous(off_diag)
    off_diag, offsets, mask = tall_image(off_diag, offsets)
    grad_s, grad_w = _backward(grad, log_diag, off_diag, band, offsets)
    if mask is not None:         # the weights outside the volume are not part of U: no gradient
        grad_w = torch.where(mask, grad_w.unflatten(1, (-1, mask.shape[0])), 0).flatten(1, 2)
    return grad_s, grad_w


def _backward(grad, log_diag, off_diag, band, offsets):
    B, C, H, W = log_diag.shape
    S = len(offsets) // 2
    per_thread = _adjoint_lanes_per_thread(S)
    slope, L, rows, lanes_per_level, lanes, levels = _schedule(H, W, offsets, ADJOINT_LANES * per_thread // 2)
    work = torch.float64 if log_diag.dtype == torch.float64 else torch.float32
    grad, band = grad.to(work).contiguous(), band.to(work).contiguous()
    adjoint = torch.zeros_like(band)
    grad_s = empty((B, C, H, W), log_diag.dtype, log_diag.device)
    grad_w = empty((B, C * S, H, W), off_diag.dtype, off_diag.device)
    if B * C:
        offs = torch.tensor(offsets, dtype=torch.int32, device=log_diag.device)
        covariance_band_adjoint_kernel[(B * C,)](
            grad, log_diag, off_diag, adjoint, _pairs_table(tuple(offsets), W, log_diag.device), offs, C, H, W, rows,
            levels, lanes_per_level, *plane_strides(log_diag), *plane_strides(off_diag), SLOPE=slope,
            OFFS=tuple(offsets), S=S, ACC=acc_dtype(log_diag), LANES=lanes, UNROLL=S <= UNROLLED_ADJOINT,
            num_warps=_warps(lanes, per_thread))
        block = block_for(H * W)
        covariance_band_grads_kernel[grid(B * C, triton.cdiv(H * W, block))](
            adjoint, band, log_diag, grad_s, grad_w, C, H, W, L, *plane_strides(log_diag), OFFS=tuple(offsets),
            S=S, ACC=acc_dtype(log_diag), BLOCK=block)
    return grad_s, grad_w
