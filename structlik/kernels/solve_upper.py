"""U^-1 z (back-substitution) and U^-T g (forward substitution), in parallel.

One program solves one (b, c) plane; planes (images, channels, samples) run
in parallel. Inside a plane, pixel (y, x) depends only on pixels whose time
t = a*(H-1-y) + (W-1-x) is smaller (a = ``Stencil.wavefront_slope``), so each
wavefront of equal t, at most one pixel per row and at most ceil(W/a) rows,
is solved at once: one lane per pixel of the wavefront (lanes follow the
active rows as the wavefront moves up the image, so none idles but at its
ends), one warp when the wavefront fits in 32 lanes. A barrier between
wavefronts makes one step's stores visible to the next step's loads. The
transposed solve walks the same wavefronts in reverse and gathers from
p - delta_i. docs/kernels.md has the model: steps, barriers, lanes, SMs.

The right-hand side and parameters are read through their strides; the
parameters may have fewer images than the right-hand side (``param_batch``:
many samples of one distribution without copying its parameters).

Coupled channels (cross weights, ``NCH`` = C): M is upper-triangular in pixel-interleaved order
(p*C + c), so one program solves one image and each lane solves its pixel's C channels within the
same wavefront step (``_solve_image_at``): as many steps and barriers as one plane. The stencil's
terms of all C channels are summed at once as a (NCH_P2, LANES) tile; then the channels are
solved in M's order (last to first; M^T first to last) in registers.
"""

import triton
import triton.language as tl

from .apply_upper import param_plane
from ..stencil import Stencil
from .common import (acc_dtype, cross_index, cross_meta, cross_strides, empty, neighbour, plane_start, plane_strides,
                     planes_contiguous, stencil_meta)


@triton.jit
def _solve_plane_at(rhs, log_diag, off_diag, out, k, kp, C, H, W, HS, y, x, p, valid, rsb, rsc, ssb, ssc, wsb, wsc,
                    OFFS: tl.constexpr, S: tl.constexpr, VOL: tl.constexpr, TRANSPOSED: tl.constexpr, ACC: tl.constexpr):
    """Independent channels: plane k (parameters kp) at this step's pixels p."""
    base = k * (H * W)
    wb = plane_start(kp, C, wsb, wsc * S)
    acc = tl.load(rhs + plane_start(k, C, rsb, rsc) + p, valid, 0.0).to(ACC)
    for i in tl.static_range(S):
        if TRANSPOSED:   # row p of U^T: w_{p-delta_i,i} v_{p-delta_i}
            q, ok = neighbour(y, x, H, W, HS, -OFFS[3 * i], -OFFS[3 * i + 1], -OFFS[3 * i + 2], valid, VOL)
            w = tl.load(off_diag + wb + i * wsc + q, ok, 0.0).to(ACC)
        else:            # row p of U: w_{p,i} eps_{p+delta_i}
            q, ok = neighbour(y, x, H, W, HS, OFFS[3 * i], OFFS[3 * i + 1], OFFS[3 * i + 2], valid, VOL)
            w = tl.load(off_diag + wb + i * wsc + p, ok, 0.0).to(ACC)
        acc -= w * tl.load(out + base + q, ok, 0.0).to(ACC)
    d = tl.exp(tl.load(log_diag + plane_start(kp, C, ssb, ssc) + p, valid, 0.0).to(ACC))
    tl.store(out + base + p, (acc / d).to(out.dtype.element_ty), valid)


@triton.jit
def _solve_image_at(rhs, log_diag, off_diag, cross, out, b, C, H, W, HS, param_batch, y, x, p, valid, rsb, rsc, ssb,
                    ssc, wsb, wsc, xsb, xsc, OFFS: tl.constexpr, S: tl.constexpr, VOL: tl.constexpr, TRANSPOSED: tl.constexpr,
                    ACC: tl.constexpr, NCH: tl.constexpr, NCH_P2: tl.constexpr):
    """Coupled channels: image b's NCH channels at this step's pixels, as an (NCH_P2, LANES) tile.
    The stencil's terms read only earlier steps, so every channel's are summed at once, one offset
    at a time (each neighbour index computed once for all channels); then the pixel's channels are
    solved in M's order in registers (last first; M^T: first first), each subtracting the cross
    terms of its partners just solved. (The first version looped over channels around the
    stencil's loop: 255 registers and 336 bytes spilled at radius 4, C = 3.)"""
    chan = tl.arange(0, NCH_P2)
    live = chan < NCH
    k = b * NCH + chan                                   # the image's planes
    kp = param_plane(k, C, param_batch)
    at = live[:, None] & valid[None, :]
    base = (k * (H * W))[:, None]
    wb = plane_start(kp, C, wsb, wsc * S)[:, None]
    acc = tl.load(rhs + plane_start(k, C, rsb, rsc)[:, None] + p[None, :], at, 0.0).to(ACC)
    for i in tl.static_range(S):
        if TRANSPOSED:
            q, ok = neighbour(y, x, H, W, HS, -OFFS[3 * i], -OFFS[3 * i + 1], -OFFS[3 * i + 2], valid, VOL)
            both = live[:, None] & ok[None, :]
            w = tl.load(off_diag + wb + i * wsc + q[None, :], both, 0.0).to(ACC)
        else:
            q, ok = neighbour(y, x, H, W, HS, OFFS[3 * i], OFFS[3 * i + 1], OFFS[3 * i + 2], valid, VOL)
            both = live[:, None] & ok[None, :]
            w = tl.load(off_diag + wb + i * wsc + p[None, :], both, 0.0).to(ACC)
        acc -= w * tl.load(out + base + q[None, :], both, 0.0).to(ACC)
    d = tl.exp(tl.load(log_diag + plane_start(kp, C, ssb, ssc)[:, None] + p[None, :], at, 0.0).to(ACC))
    xb = (b % param_batch) * xsb                         # the image's cross planes (its parameters')
    solved = tl.zeros_like(acc)
    for step_c in tl.static_range(NCH):
        c = step_c if TRANSPOSED else NCH - 1 - step_c
        this = chan[:, None] == c
        if TRANSPOSED:       # M^T's row (c, p): xi_{kappa(j,c)} eps_j, j < c
            partner = chan < c
            kap = cross_index(chan, c, NCH)
        else:                # M's row (c, p): xi_{kappa(c,j)} eps_j, j > c
            partner = (chan > c) & live
            kap = cross_index(c, chan, NCH)
        xi = tl.load(cross + xb + tl.maximum(kap, 0)[:, None] * xsc + p[None, :], partner[:, None] & valid[None, :],
                     0.0).to(ACC)
        rest = tl.sum(tl.where(this, acc, 0.0), axis=0) - tl.sum(xi * solved, axis=0)
        value = rest / tl.sum(tl.where(this, d, 0.0), axis=0)
        solved = tl.where(this, value[None, :], solved)
    tl.store(out + base + p[None, :], solved.to(out.dtype.element_ty), at)


@triton.jit
def _solve_pixels(rhs, log_diag, off_diag, cross, out, program, C, H, W, HS, param_batch, y, x, valid, rsb, rsc, ssb,
                  ssc, wsb, wsc, xsb, xsc, OFFS: tl.constexpr, S: tl.constexpr, VOL: tl.constexpr,
                  TRANSPOSED: tl.constexpr, ACC: tl.constexpr, NCH: tl.constexpr, NCH_P2: tl.constexpr):
    """Solve this step's pixels (row y, column x) of the program's plane, or of its image's NCH channels."""
    p = y * W + x
    if NCH > 1:
        _solve_image_at(rhs, log_diag, off_diag, cross, out, program, C, H, W, HS, param_batch, y, x, p, valid, rsb,
                        rsc, ssb, ssc, wsb, wsc, xsb, xsc, OFFS, S, VOL, TRANSPOSED, ACC, NCH, NCH_P2)
    else:
        _solve_plane_at(rhs, log_diag, off_diag, out, program, param_plane(program, C, param_batch), C, H, W, HS, y,
                        x, p, valid, rsb, rsc, ssb, ssc, wsb, wsc, OFFS, S, VOL, TRANSPOSED, ACC)


@triton.jit
def solve_upper_kernel(rhs, log_diag, off_diag, cross, out, C, H, W, HS, param_batch, steps, chunks, rsb, rsc, ssb,
                       ssc, wsb, wsc, xsb, xsc, SLOPE: tl.constexpr, ZSLOPE: tl.constexpr, OFFS: tl.constexpr,
                       S: tl.constexpr, VOL: tl.constexpr, TRANSPOSED: tl.constexpr, ACC: tl.constexpr,
                       LANES: tl.constexpr, YLANES: tl.constexpr, NCH: tl.constexpr, NCH_P2: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)     # a plane (b, c); coupled (NCH > 1): an image b
    # A while loop, not range(steps): Triton's interpreter turns a runtime bound into a
    # one-element array that NumPy >= 2.4 refuses to use as an index.
    step = 0
    while step < steps:                # steps = ZSLOPE*(D-1) + SLOPE*(HS-1) + W wavefronts
        if TRANSPOSED:
            t = steps - 1 - step
        else:
            t = step
        if VOL:
            # a volume (tall view: H = D*HS rows): wavefront t holds the voxels with
            # ZSLOPE*(D-1-z) + SLOPE*(HS-1-y) + (W-1-x) = t, in ``chunks`` passes of LANES lanes (they
            # read only earlier wavefronts: no barrier between passes). Lanes are a (slice, row) grid,
            # YLANES rows in each slice from D-1-floor(t/ZSLOPE) down; in slice z the time left,
            # tz = t - ZSLOPE*(D-1-z), places the rows as for an image.
            D = H // HS
            chunk = 0
            while chunk < chunks:
                lane = chunk * LANES + tl.arange(0, LANES)
                z = tl.maximum(D - 1 - t // ZSLOPE, 0) + lane // YLANES
                tz = t - ZSLOPE * (D - 1 - z)
                yz = tl.maximum(HS - 1 - tz // SLOPE, 0) + lane % YLANES
                x = (W - 1) - (tz - SLOPE * (HS - 1 - yz))
                valid = (z < D) & (tz >= 0) & (yz < HS) & (x >= 0) & (x < W)
                _solve_pixels(rhs, log_diag, off_diag, cross, out, program, C, H, W, HS, param_batch, z * HS + yz, x,
                              valid, rsb, rsc, ssb, ssc, wsb, wsc, xsb, xsc, OFFS, S, VOL, TRANSPOSED, ACC, NCH,
                              NCH_P2)
                chunk += 1
        else:
            # Wavefront t holds the pixels with SLOPE*(H-1-y) + (W-1-x) = t: rows from
            # H-1-floor(t/SLOPE) down, at most ceil(W/SLOPE) of them. Lane j takes the j-th.
            y = tl.maximum(H - 1 - t // SLOPE, 0) + tl.arange(0, LANES)
            x = (W - 1) - (t - SLOPE * (H - 1 - y))
            valid = (y < H) & (x >= 0) & (x < W)
            _solve_pixels(rhs, log_diag, off_diag, cross, out, program, C, H, W, HS, param_batch, y, x, valid, rsb,
                          rsc, ssb, ssc, wsb, wsc, xsb, xsc, OFFS, S, VOL, TRANSPOSED, ACC, NCH, NCH_P2)
        tl.debug_barrier()
        step += 1


def wavefront_slopes(offsets) -> tuple:
    """(a, b): the solves' slopes in rows and slices, Stencil.wavefront_slope and depth_slope
    (b = 1 for images): every offset has b*dz + a*dy + dx >= 1."""
    stencil = Stencil.from_flat_offsets(offsets)
    return stencil.wavefront_slope, stencil.depth_slope


def wavefront_slope(offsets) -> int:
    """Smallest a >= 1 with a*dy + dx >= 1 for every in-slice offset (Stencil.wavefront_slope)."""
    return wavefront_slopes(offsets)[0]


def wavefront_steps(H: int, W: int, offsets) -> int:
    """Sequential steps of a solve: b*(D-1) + a*(h-1) + W for a volume of D slices of h rows (its tall
    view has H = D*h rows), a*(H-1) + W for an image."""
    meta = stencil_meta(offsets)
    a, b = wavefront_slopes(offsets)
    hs = meta["HS"] if meta["VOL"] else H
    return b * (H // hs - 1) + a * (hs - 1) + W


def lanes_for(H: int, W: int, slope: int, depth: int = 1, depth_slope: int = 1) -> tuple:
    """(lanes per program, lanes per slice): the most pixels one wavefront holds. An image's,
    min(H, ceil(W / slope)), rounded up to a power of two (at least 16, Triton's smallest block);
    a volume (slices of H rows) holds that many rows in each of at most
    min(depth, ceil((slope*(H-1) + W) / depth_slope)) slices at once."""
    rows = triton.next_power_of_2(min(H, -(-W // slope)))
    if depth == 1:
        return max(16, rows), rows
    slices = triton.next_power_of_2(min(depth, -(-(slope * (H - 1) + W) // depth_slope)))
    return max(16, rows * slices), rows


def warps_for(lanes: int) -> int:
    """One lane per thread: 1 warp up to 32 lanes (its barrier is a warp's), at most 4 up to 1024
    lanes (8 per thread: 148-168 registers at 4096x4096 radius 3, no spill), then 8 lanes per
    thread: at 4096 lanes (8192 wide) 4 warps sat at 255 registers and spilled 184 bytes
    (tools/triton_aot.py, sm_90)."""
    return max(1, min(4, lanes // 32)) if lanes <= 1024 else lanes // 256


def volume_lanes(total: int, S: int, nch: int) -> tuple:
    """(lanes a pass, warps) for a volume's wavefront of ``total`` lanes: its 3-D lane index and
    neighbour test hold more registers a lane than an image's. At 8 lanes a thread (the image
    policy) the 64^3 radius-1 solve sat at 255 registers and spilled 28 bytes, and 128^3 (8,192
    lanes on 32 warps, 64 registers a thread at most) spilled 1,096; so 4 lanes a thread, or 1
    with coupled channels or S > 24 (2 a thread spilled 96 bytes at 32^3 radius 2, C = 2), on at
    most 8 warps, the rest of the wavefront in further passes (tools/triton_aot.py, sm_90)."""
    per_thread = 1 if nch > 1 or S > 24 else 4
    lanes = min(total, 256 * per_thread)
    return lanes, max(1, min(8, lanes // (32 * per_thread)))


def launch(rhs, log_diag, off_diag, offsets, transposed: bool, cross=None):
    B, C, H, W = rhs.shape
    rhs, log_diag, off_diag = (planes_contiguous(t) for t in (rhs, log_diag, off_diag))
    cross = planes_contiguous(cross) if cross is not None else None
    out = empty(rhs.shape, rhs.dtype, rhs.device)
    meta = stencil_meta(offsets)
    slope, zslope = wavefront_slopes(offsets)
    hs = meta["HS"] if meta["VOL"] else H
    nch = cross_meta(cross, C)
    total, ylanes = lanes_for(hs, W, slope, H // hs, zslope)
    lanes, warps = (total, warps_for(total)) if not meta["VOL"] else volume_lanes(total, meta["S"], nch)
    xs = cross_strides(cross, log_diag)
    solve_upper_kernel[(B * C // nch,)](
        rhs, log_diag, off_diag, xs[0], out, C, H, W, meta.pop("HS"), log_diag.shape[0],
        wavefront_steps(H, W, offsets), total // lanes, *plane_strides(rhs), *plane_strides(log_diag), *plane_strides(off_diag),
        *xs[1:], SLOPE=slope, ZSLOPE=zslope, **meta, TRANSPOSED=transposed, ACC=acc_dtype(rhs), LANES=lanes,
        YLANES=ylanes, NCH=nch, NCH_P2=triton.next_power_of_2(nch), num_warps=warps)
    return out
