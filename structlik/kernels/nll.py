"""The fused NLL (forward) and its backward, for both weight sources: off_diag's planes, or
(``BASIS``, a constexpr: the learned basis of paper section 4.3)
w_{p,i} = sum_j basis[i, j] coeffs_j(p), formed in registers from a (NB, BLOCK) tile of
coefficients and never stored.

Forward: each program reads its tile of x, loc, log_diag and off_diag (the
neighbours of x - loc come through the cache) and writes one partial sum of
0.5 u^2 - s; the host adds the partials of each image (a deterministic sum, no
atomics) and the normaliser.

Backward, one pass: d/ds = g (u r d - 1) and d/dw_{p,i} = g u_p r_{p+delta_i} need
u at the pixel, d/dloc = -g (d u + sum_i w_{p-delta_i,i} u_{p-delta_i}) needs u at the
neighbours, which other programs compute. So the training forward (``store_u``) also
stores u = U r, one plane, and the backward reads it; d/dx is the negative of d/dloc,
formed by the caller only when x needs a gradient (data never does).

Bytes per pixel, in planes of the input dtype (u counts as one; float32 at S = 24,
docs/kernels.md has the model and the figures for each S):
  forward (eval)          reads x, loc, s, w: 3 + S                    = 27
  forward (training)      same, writes u: 3 + S + 1                     = 28
  backward                reads x, loc, s, w, u; writes dloc, ds, dw:
                          (4 + S) + (2 + S)                             = 54
  training step           28 + 54 = 10 + 3S                             = 82
(Before: forward 27, then a backward in two passes, 27 + 26 and 26 + 1, and a
negation pass of 2: 109 planes.) Neighbours' values are counted once: they come
through L1/L2, each plane's tile being read by one program and its halo by the
programs beside it.

With a basis the backward also writes d/dcoeffs_j = sum_i basis_ij gw_i and each program's
partial d/dbasis_ij = sum_p gw_{p,i} c_j(p) (summed on the host, deterministically), and
gathers w_{p-delta_i,i} from the coefficients at p - delta_i.

Inputs are read through their batch and channel strides (``xs``, ``ls``, ``ss``,
``ws``: (batch, channel) pairs; common.plane_start), so split-head views are
never copied; u and the gradients are contiguous.

Coupled channels (cross weights, ``NCH`` = C): u_c adds sum_{j>c} xi_{kappa(c,j)} r_j at the pixel
(x and loc of the image's other channels: 2 (C-1-c) + (C-1-c) more loads per pixel); the backward
adds sum_{j<c} xi_{kappa(j,c)} u_j to M^T u (the stored u of the other channels) and writes
d/dxi_{kappa(c,j)} = g u_c r_j for j > c from plane c's program. Per pixel of a C-channel image,
C(C-1)/2 more planes read in each pass and written once by the backward (docs/kernels.md §1).
"""
import triton
import triton.language as tl

from .._dtypes import compute_dtype
from .common import (acc_dtype, block_for, cross_index, cross_meta, cross_strides, cross_terms, empty, finish_nll,
                     stencil_meta,
                     grid, neighbour, plane_start, plane_strides, planes_contiguous, tile)


# --- the weight source: off_diag's planes, or a learned basis times coefficients (BASIS) ---------

@triton.jit
def _coeff_tile(coeffs, cb, csc, q, ok, NB: tl.constexpr, NB_P2: tl.constexpr, ACC: tl.constexpr):
    """(NB_P2, BLOCK) coefficients of the plane starting at cb at pixels q (zero where masked or j >= NB)."""
    j = tl.arange(0, NB_P2)
    ptrs = coeffs + cb + j[:, None] * csc + q[None, :]
    return tl.load(ptrs, (j[:, None] < NB) & ok[None, :], 0.0).to(ACC)


@triton.jit
def _basis_row(basis, i, NB: tl.constexpr, NB_P2: tl.constexpr, ACC: tl.constexpr):
    j = tl.arange(0, NB_P2)
    return tl.load(basis + i * NB + j, j < NB, 0.0).to(ACC)


@triton.jit
def _weight(weights, basis, wb, wsc, c, i, q, ok, NB: tl.constexpr, NB_P2: tl.constexpr, ACC: tl.constexpr,
            BASIS: tl.constexpr):
    """w_{q,i}: off_diag's value at q, or sum_j basis[i, j] c_j with c the (NB_P2, BLOCK) coefficients at q."""
    if BASIS:
        w = tl.sum(_basis_row(basis, i, NB, NB_P2, ACC)[:, None] * c, axis=0)
    else:
        w = tl.load(weights + wb + i * wsc + q, ok, 0.0).to(ACC)
    return w


@triton.jit
def _residual_and_u(x, loc, log_diag, weights, basis, k, p, y, xx, valid, C, H, W, HS, xsb, xsc, lsb, lsc, ssb,
                    ssc, wsb, wsc, OFFS: tl.constexpr, S: tl.constexpr, VOL: tl.constexpr, NB: tl.constexpr,
                    NB_P2: tl.constexpr, ACC: tl.constexpr, BASIS: tl.constexpr):
    xb = plane_start(k, C, xsb, xsc)
    lb = plane_start(k, C, lsb, lsc)
    wb = plane_start(k, C, wsb, wsc * (NB if BASIS else S))
    r = tl.load(x + xb + p, valid, 0.0).to(ACC) - tl.load(loc + lb + p, valid, 0.0).to(ACC)
    s = tl.load(log_diag + plane_start(k, C, ssb, ssc) + p, valid, 0.0).to(ACC)
    d = tl.exp(s)
    u = d * r
    c = _coeff_tile(weights, wb, wsc, p, valid, NB, NB_P2, ACC) if BASIS else 0.0
    for i in tl.static_range(S):
        q, ok = neighbour(y, xx, H, W, HS, OFFS[3 * i], OFFS[3 * i + 1], OFFS[3 * i + 2], valid, VOL)
        r_q = tl.load(x + xb + q, ok, 0.0).to(ACC) - tl.load(loc + lb + q, ok, 0.0).to(ACC)
        # the weight at the pixel itself, under the tile's mask (contiguous, vectorisable);
        # where the neighbour is outside, the term is dropped rather than multiplied by 0
        w = _weight(weights, basis, wb, wsc, c, i, p, valid, NB, NB_P2, ACC, BASIS)
        u += tl.where(ok, w * r_q, 0.0)
    return r, s, d, u


@triton.jit
def _cross_residual(u, x, loc, cross, k, p, valid, C, xsb, xsc, lsb, lsc, csb, csc, NCH: tl.constexpr,
                    ACC: tl.constexpr):
    """u + sum_{j>c} xi_{kappa(c,j)} (x_j - loc_j) at pixels p of plane k = (b, c)."""
    b = k // C
    c = k % C
    for j in tl.static_range(NCH):
        partner = valid & (j > c)
        xi = tl.load(cross + b * csb + tl.maximum(cross_index(c, j, NCH), 0) * csc + p, partner, 0.0).to(ACC)
        r_j = (tl.load(x + b * xsb + j * xsc + p, partner, 0.0).to(ACC)
               - tl.load(loc + b * lsb + j * lsc + p, partner, 0.0).to(ACC))
        u += xi * r_j
    return u


@triton.jit
def nll_kernel(x, loc, log_diag, weights, basis, cross, partial, u_out, C, H, W, HS, xsb, xsc, lsb, lsc, ssb, ssc,
               wsb, wsc, csb, csc, OFFS: tl.constexpr, S: tl.constexpr, VOL: tl.constexpr, NB: tl.constexpr,
               NB_P2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, STORE_U: tl.constexpr, BASIS: tl.constexpr,
               NCH: tl.constexpr):
    program, k, p, y, xx, valid = tile(H, W, BLOCK)
    r, s, d, u = _residual_and_u(x, loc, log_diag, weights, basis, k, p, y, xx, valid, C, H, W, HS, xsb, xsc, lsb,
                                 lsc, ssb, ssc, wsb, wsc, OFFS, S, VOL, NB, NB_P2, ACC, BASIS)
    if NCH > 1:
        u = _cross_residual(u, x, loc, cross, k, p, valid, C, xsb, xsc, lsb, lsc, csb, csc, NCH, ACC)
    term = tl.where(valid, 0.5 * u * u - s, 0.0)
    tl.store(partial + program, tl.sum(term, axis=0))
    if STORE_U:      # training: one more plane written here saves the backward recomputing U r
        tl.store(u_out + k * H * W + p, u, valid)


@triton.jit
def nll_backward_kernel(grad, x, loc, log_diag, weights, basis, cross, u, grad_loc, grad_s, grad_w, grad_cross,
                        basis_partial, C, H, W, HS, xsb, xsc, lsb, lsc, ssb, ssc, wsb, wsc, csb, csc, glsb, glsc,
                        gssb, gssc, gwsb, gwsc, gcsb, gcsc, OFFS: tl.constexpr, S: tl.constexpr, VOL: tl.constexpr,
                        NB: tl.constexpr, NB_P2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BASIS: tl.constexpr,
                        NCH: tl.constexpr):
    """All gradients in one pass, from the u the forward stored. With BASIS, grad_w is d/dcoeffs and
    each program writes its partial d/dbasis (summed on the host, deterministically)."""
    program, k, p, y, xx, valid = tile(H, W, BLOCK)
    ub = k * H * W
    xb = plane_start(k, C, xsb, xsc)
    lb = plane_start(k, C, lsb, lsc)
    PER: tl.constexpr = NB if BASIS else S
    wb = plane_start(k, C, wsb, wsc * PER)
    gwb = plane_start(k, C, gwsb, gwsc * PER)
    g = tl.load(grad + k // C).to(ACC)
    u_p = tl.load(u + ub + p, valid, 0.0).to(ACC)
    r = tl.load(x + xb + p, valid, 0.0).to(ACC) - tl.load(loc + lb + p, valid, 0.0).to(ACC)
    s = tl.load(log_diag + plane_start(k, C, ssb, ssc) + p, valid, 0.0).to(ACC)
    d = tl.exp(s)
    tl.store(grad_s + plane_start(k, C, gssb, gssc) + p, (g * (u_p * r * d - 1.0)).to(grad_s.dtype.element_ty),
             valid)
    acc = d * u_p
    j = tl.arange(0, NB_P2)
    c = _coeff_tile(weights, wb, wsc, p, valid, NB, NB_P2, ACC) if BASIS else 0.0
    gc = tl.zeros([NB_P2, BLOCK], ACC) if BASIS else 0.0
    for i in tl.static_range(S):
        # d/dw_{p,i} = g u_p r_{p+delta_i} (residual at the neighbour, through the cache) ...
        q, ok = neighbour(y, xx, H, W, HS, OFFS[3 * i], OFFS[3 * i + 1], OFFS[3 * i + 2], valid, VOL)
        r_q = tl.load(x + xb + q, ok, 0.0).to(ACC) - tl.load(loc + lb + q, ok, 0.0).to(ACC)
        gw = g * u_p * r_q
        if BASIS:        # ... into d/dcoeffs_j = sum_i basis_ij gw_i and d/dbasis_ij = sum_p gw_i c_j
            gw = tl.where(ok, gw, 0.0)
            gc += _basis_row(basis, i, NB, NB_P2, ACC)[:, None] * gw[None, :]
            tl.store(basis_partial + (program * S + i) * NB_P2 + j, tl.sum(c * gw[None, :], axis=1))
        else:
            tl.store(grad_w + gwb + i * gwsc + p, gw.to(grad_w.dtype.element_ty), valid)
        # ... and (U^T u)_p gathers w_{p-delta_i,i} u_{p-delta_i}
        q, ok = neighbour(y, xx, H, W, HS, -OFFS[3 * i], -OFFS[3 * i + 1], -OFFS[3 * i + 2], valid, VOL)
        c_q = _coeff_tile(weights, wb, wsc, q, ok, NB, NB_P2, ACC) if BASIS else 0.0
        w_q = _weight(weights, basis, wb, wsc, c_q, i, q, ok, NB, NB_P2, ACC, BASIS)
        acc += w_q * tl.load(u + ub + q, ok, 0.0).to(ACC)
    if NCH > 1:      # (X^T u)_c from the stored u of the channels before c; d/dxi of the pairs (c, j > c)
        b = k // C
        ch = k % C
        acc = cross_terms(acc, cross, u, b * C * H * W, b * csb, ch, p, valid, H * W, csc, NCH, True, ACC)
        for jj in tl.static_range(NCH):
            partner = valid & (jj > ch)
            r_j = (tl.load(x + b * xsb + jj * xsc + p, partner, 0.0).to(ACC)
                   - tl.load(loc + b * lsb + jj * lsc + p, partner, 0.0).to(ACC))
            tl.store(grad_cross + b * gcsb + tl.maximum(cross_index(ch, jj, NCH), 0) * gcsc + p,
                     (g * u_p * r_j).to(grad_cross.dtype.element_ty), partner)
    tl.store(grad_loc + plane_start(k, C, glsb, glsc) + p, (-g * acc).to(grad_loc.dtype.element_ty), valid)
    if BASIS:
        ptrs = grad_w + gwb + j[:, None] * gwsc + p[None, :]
        tl.store(ptrs, gc.to(grad_w.dtype.element_ty), (j[:, None] < NB) & valid[None, :])


def _meta(offsets, H, W, x, basis=None):
    if basis is None:
        return dict(**stencil_meta(offsets), NB=1, NB_P2=2, ACC=acc_dtype(x),
                    BLOCK=block_for(H * W), BASIS=False)
    # The coefficient tile and its gradient are NB_P2 x BLOCK each. 128 pixels for 4 warps puts one
    # pixel's NB coefficients in one thread (the sums over the basis stay in registers); at 256 pixels
    # the backward spilled at NB=6, and below 128 the basis axis is split across warps (sums through
    # shared memory) and spilled more (tools/triton_aot.py).
    nb = basis.shape[1]
    return dict(**stencil_meta(offsets), NB=nb, NB_P2=max(2, triton.next_power_of_2(nb)),
                ACC=acc_dtype(x), BLOCK=min(block_for(H * W), 128), BASIS=True)


def _strides(*tensors):
    return [v for t in tensors for v in plane_strides(t)]


def _coupled(cross, C):
    """The cross weights, planes contiguous, or None (none given, or one channel: no pairs)."""
    return planes_contiguous(cross) if cross is not None and C > 1 else None


def nll(x, loc, log_diag, weights, basis, offsets, store_u, cross=None):
    """The op ``structlik::nll``: the per-image NLL, and u = M (x - loc) (contiguous, in the
    compute dtype) for the backward when ``store_u``, else an empty (0,) tensor. ``weights``:
    off_diag, or with ``basis`` the coefficients; ``cross``: the cross weights, or None."""
    B, C, H, W = x.shape
    x, loc, log_diag, weights = (planes_contiguous(t) for t in (x, loc, log_diag, weights))
    basis = basis.contiguous() if basis is not None else None
    cross = _coupled(cross, C)
    meta = _meta(offsets, H, W, x, basis)
    tiles = triton.cdiv(H * W, meta["BLOCK"])
    partial = empty((B * C, tiles), compute_dtype(x), x.device)
    # without store_u the kernel never stores u (STORE_U is a constexpr); any pointer will do
    u = empty(x.shape, compute_dtype(x), x.device) if store_u else x.new_empty(0, dtype=compute_dtype(x))
    xs = cross_strides(cross, partial)
    nll_kernel[grid(B * C, tiles)](
        x, loc, log_diag, weights, partial if basis is None else basis, xs[0], partial, u if store_u else partial,
        C, H, W, meta.pop("HS"), *_strides(x, loc, log_diag, weights), *xs[1:], STORE_U=store_u, NCH=cross_meta(cross, C), **meta)
    return finish_nll(partial, x), u


def _backward_into(grad, x, loc, log_diag, weights, basis, u, offsets, out, cross=None, grad_cross=None):
    """The gradients written into ``out`` (d/dloc, d/dlog_diag, d/doff_diag or d/dcoeffs: any
    plane-contiguous strides, the slices of one head's gradient too) and d/dcross into
    ``grad_cross``; returns d/dbasis or None. ``u``: what ``nll(..., store_u=True)`` returned;
    formed here first (one more pass) if empty."""
    B, C, H, W = x.shape
    x, loc, log_diag, weights = (planes_contiguous(t) for t in (x, loc, log_diag, weights))
    basis = basis.contiguous() if basis is not None else None
    cross = _coupled(cross, C)
    if u.numel() == 0:
        u = nll(x, loc, log_diag, weights, basis, offsets, True, cross)[1]
    grad = grad.contiguous()
    meta = _meta(offsets, H, W, x, basis)
    tiles = triton.cdiv(H * W, meta["BLOCK"])
    grad_loc, grad_s, grad_w = out
    # never written without a basis (BASIS is a constexpr); any pointer will do
    basis_partial = u if basis is None else empty((B * C * tiles, meta["S"], meta["NB_P2"]), compute_dtype(x),
                                                  x.device)
    xs, gxs = cross_strides(cross, u), cross_strides(grad_cross if cross is not None else None, u)
    nll_backward_kernel[grid(B * C, tiles)](
        grad, x, loc, log_diag, weights, u if basis is None else basis, xs[0], u, grad_loc, grad_s, grad_w, gxs[0],
        basis_partial, C, H, W, meta.pop("HS"), *_strides(x, loc, log_diag, weights), *xs[1:],
        *_strides(grad_loc, grad_s, grad_w), *gxs[1:], NCH=cross_meta(cross, C), **meta)
    return None if basis is None else basis_partial.sum(0)[:, :meta["NB"]].to(basis.dtype).contiguous()


def nll_backward(grad, x, loc, log_diag, weights, basis, u, offsets, cross=None):
    """The op ``structlik::nll_backward``: (d/dloc, d/dlog_diag, d/doff_diag or d/dcoeffs, d/dbasis,
    d/dcross), contiguous; d/dbasis and d/dcross empty (0,) tensors without a basis, cross weights."""
    out = tuple(empty(t.shape, t.dtype, x.device) for t in (loc, log_diag, weights))
    grad_cross = None if cross is None else empty(cross.shape, cross.dtype, x.device)
    grad_basis = _backward_into(grad, x, loc, log_diag, weights, basis, u, offsets, out, cross, grad_cross)
    return (*out, weights.new_empty(0) if grad_basis is None else grad_basis,
            x.new_empty(0) if grad_cross is None else grad_cross)


def head_slices(head, c0, C, S, cross=False):
    """loc, log_diag, off_diag (and the cross weights, or None) as head.split gives them: channels
    from c0 of one decoder head."""
    return (head.narrow(1, c0, C), head.narrow(1, c0 + C, C), head.narrow(1, c0 + 2 * C, S * C),
            head.narrow(1, c0 + (2 + S) * C, C * (C - 1) // 2) if cross else None)


def nll_head_backward(grad, x, head, c0, u, offsets, cross=False):
    """The op ``structlik::nll_head_backward``: the head's whole gradient, its slices written in
    place, its other channels zero (autograd's backward of head.split, a cat of the slices'
    gradients, never runs)."""
    C, S = x.shape[1], stencil_meta(offsets)["S"]
    used = (2 + S) * C + (C * (C - 1) // 2 if cross else 0)
    grad_head = empty(head.shape, head.dtype, head.device)
    grad_head[:, :c0].zero_()
    grad_head[:, c0 + used:].zero_()
    loc, log_diag, off_diag, xi = head_slices(head, c0, C, S, cross)
    *grads, grad_xi = head_slices(grad_head, c0, C, S, cross)
    _backward_into(grad, x, loc, log_diag, off_diag, None, u, offsets, tuple(grads), xi, grad_xi)
    return grad_head
