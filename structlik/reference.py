"""The reference backend: docs/contract.md §1 in plain PyTorch, written for clarity.

Every fast path is tested against these functions, and these against a dense
float64 construction (``to_dense_upper``). Inputs are assumed validated by
``structlik.ops``: ``log_diag`` (B, C, H, W), ``off_diag`` (B, C*S, H, W),
images (B, C, H, W), all of one dtype and device.

The stencil terms are shifts of zero-padded tensors, one line per term of
``(U r)_p = d_p r_p + sum_i w_{p,i} r_{p+delta_i}``. Autograd differentiates
them directly. The two triangular solves cannot be written as shifts; they
run wavefront by wavefront (see ``_schedule``), which autograd differentiates
too (slowly). These functions are also the kernels of ``torch.ops.structlik``
for devices without a kernel of their own (structlik/ops/_library.py).
"""
from __future__ import annotations

import functools
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from .stencil import Stencil

__all__ = [
    "apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t",
    "nll", "nll_and_u", "nll_basis", "expand_basis", "precision_diagonal", "weight_grad", "to_dense_upper",
    "cross_pairs", "cross_apply", "cross_apply_t", "cross_grad",
]

LOG_2PI = math.log(2.0 * math.pi)


def shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., y, x] = t[..., y + dy, x + dx]``, zero where that is outside."""
    H, W = t.shape[-2:]
    pad_y, pad_x = abs(dy), abs(dx)
    padded = F.pad(t, (pad_x, pad_x, pad_y, pad_y))
    return padded[..., pad_y + dy: pad_y + dy + H, pad_x + dx: pad_x + dx + W]


def cached_unless_tracing(maxsize: int):
    """``functools.lru_cache`` for index tensors built from shapes, bypassed while tracing
    (torch.compile, fake tensors): a traced tensor must not be kept, or a later eager call of the
    same shape gets a fake tensor back."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling() or detect_fake_mode() is not None:
                return fn(*args)
            return cached(*args)
        call.cache_clear = cached.cache_clear
        return call
    return wrap


def _coordinates(stencil: Stencil, H: int, device=None):
    """Each row's slice z and row y in its slice, (H,): (0, y) for images; for a volume's tall
    view (H = D * slice_height rows) (row // slice_height, row % slice_height)."""
    rows = torch.arange(H, device=device)
    hs = stencil.slice_height or H
    return rows // max(hs, 1), rows % max(hs, 1), max(H // max(hs, 1), 1), hs


@cached_unless_tracing(maxsize=64)
def read_mask(stencil: Stencil, H: int, W: int, device: torch.device) -> torch.Tensor:
    """(S, H, W): True where offset i of pixel p lands inside the image (a weight of U). For a
    volume (H = D * slice_height rows of its tall view) inside the volume: z + dz < D and
    0 <= y + dy < slice_height, not merely inside the tall image."""
    z, y, D, hs = _coordinates(stencil, H, device)
    z, y = z.view(H, 1), y.view(H, 1)
    xs = torch.arange(W, device=device).view(1, W)
    masks = []
    for off in stencil.offsets:
        dz, dy, dx = (0, *off) if len(off) == 2 else off
        rows = (y + dy >= 0) & (y + dy < hs) & (z + dz < D)
        masks.append(rows & (xs + dx >= 0) & (xs + dx < W))
    return torch.stack(masks)


def times(stencil: Stencil, H: int, W: int) -> torch.Tensor:
    """(H*W,) each pixel's wavefront time, the order of the solves: t = a*(H-1-y) + (W-1-x)
    (a = wavefront_slope) for images; b*(D-1-z) + a*(h-1-y) + (W-1-x) for a volume's voxel
    (z, y, x) (b = depth_slope, h the slice height). Every pixel depends only on earlier times."""
    z, y, D, hs = _coordinates(stencil, H)
    t_row = stencil.depth_slope * (D - 1 - z) + stencil.wavefront_slope * (hs - 1 - y)
    return (t_row.view(H, 1) + (W - 1 - torch.arange(W)).view(1, W)).flatten()


def weights(off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """(B, C*S, H, W) -> (B, C, S, H, W), channel-major as docs/contract.md §3, with the weights
    that point outside the image set to 0: they are not part of U (contract §1), whatever they
    hold (a NaN there is 0 here, as in the kernels, which never read it)."""
    B, CS, H, W = off_diag.shape
    w = off_diag.reshape(B, CS // stencil.S, stencil.S, H, W)
    return torch.where(read_mask(stencil, H, W, off_diag.device), w, 0)


# --- coupled channels (docs/contract.md §1): the cross weights xi, (B, C(C-1)/2, H, W) ----------

@functools.lru_cache(maxsize=16)
def _pairs(C: int):
    pairs = [(c, j) for c in range(C) for j in range(c + 1, C)]
    return tuple(c for c, _ in pairs), tuple(j for _, j in pairs)


def cross_pairs(C: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The channel pairs (c, j), c < j, in the cross weights' order (0,1), (0,2), ..., (0,C-1),
    (1,2), ...: plane kappa(c, j) = c(2C-c-1)/2 + j-c-1 couples channel c's row to channel j."""
    cs, js = _pairs(int(C))       # int: a channel count is static (under dynamic shapes, a SymInt)
    return (torch.tensor(cs, dtype=torch.long, device=device), torch.tensor(js, dtype=torch.long, device=device))


def cross_index(c: int, j: int, C: int) -> int:
    """kappa(c, j), the plane of the cross weight from channel c's row to channel j (c < j)."""
    return c * (2 * C - c - 1) // 2 + j - c - 1


def _repeat_params(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Parameters of Bp images for ``batch`` = R*Bp images (image r*Bp + b uses parameters b)."""
    return t if t.shape[0] == batch else t.repeat(batch // max(t.shape[0], 1), *([1] * (t.dim() - 1)))


def cross_apply(r, cross):
    """(X r)_{c,p} = sum_{j>c} xi_{kappa(c,j),p} r_{j,p}: the cross weights' part of M r."""
    cs, js = cross_pairs(r.shape[1], r.device)
    cross = _repeat_params(cross, r.shape[0])
    return torch.zeros_like(r).index_add(1, cs, cross * r[:, js])


def cross_apply_t(y, cross):
    """(X^T y)_{j,p} = sum_{c<j} xi_{kappa(c,j),p} y_{c,p}."""
    cs, js = cross_pairs(y.shape[1], y.device)
    cross = _repeat_params(cross, y.shape[0])
    return torch.zeros_like(y).index_add(1, js, cross * y[:, cs])


def cross_grad(a, b):
    """d(a^T X b)/d xi_{kappa(c,j),p} = a_{c,p} b_{j,p}: (B, C(C-1)/2, H, W)."""
    cs, js = cross_pairs(a.shape[1], a.device)
    return a[:, cs] * b[:, js]


def apply_upper(r, log_diag, off_diag, stencil, cross=None):
    """``M r`` (``U r``, plus ``X r`` with cross weights): (B, C, H, W); r may hold R*B images
    (image r*B + b uses parameters b: the low-rank modes' columns)."""
    log_diag, off_diag = (_repeat_params(t, r.shape[0]) for t in (log_diag, off_diag))
    w = weights(off_diag, stencil)
    out = log_diag.exp() * r
    for i, (dy, dx) in enumerate(stencil.tall_offsets):
        out = out + w[:, :, i] * shift(r, dy, dx)
    return out if cross is None else out + cross_apply(r, cross)


def apply_upper_t(y, log_diag, off_diag, stencil, cross=None):
    """``M^T y``: row p gathers ``w_{p-delta_i,i} y_{p-delta_i}`` (and X^T y); y may hold R*B images."""
    log_diag, off_diag = (_repeat_params(t, y.shape[0]) for t in (log_diag, off_diag))
    w = weights(off_diag, stencil)
    out = log_diag.exp() * y
    for i, (dy, dx) in enumerate(stencil.tall_offsets):
        out = out + shift(w[:, :, i] * y, -dy, -dx)
    return out if cross is None else out + cross_apply_t(y, cross)


def weight_grad(a, b, stencil):
    """``out[:, c*S+i, p] = a_p * b_{p+delta_i}``: the gradient of ``a^T U b`` w.r.t. off_diag
    (0 where p + delta_i is outside: in a volume's tall view, outside the volume)."""
    B, C, H, W = a.shape
    terms = torch.stack([a * shift(b, dy, dx) for dy, dx in stencil.tall_offsets], dim=2)
    if stencil.ndim == 3:
        terms = torch.where(read_mask(stencil, H, W, a.device), terms, 0)
    return terms.reshape(B, C * stencil.S, H, W)


def nll_and_u(x, loc, log_diag, off_diag, stencil, cross=None):
    """Per-image ``-log N(x; loc, (M^T M)^-1)``, (B,), and u = M (x - loc), (B, C, H, W). The
    log-determinant is sum(log_diag) with cross weights too (M's diagonal is U's)."""
    u = apply_upper(x - loc, log_diag, off_diag, stencil, cross)
    n = math.prod(x.shape[1:])      # (not x[0]: B may be 0)
    return 0.5 * u.square().sum((1, 2, 3)) - log_diag.sum((1, 2, 3)) + 0.5 * n * LOG_2PI, u


def nll(x, loc, log_diag, off_diag, stencil, cross=None):
    """Per-image ``-log N(x; loc, (M^T M)^-1)``: (B,)."""
    return nll_and_u(x, loc, log_diag, off_diag, stencil, cross)[0]


def expand_basis(coeffs, basis):
    """off_diag[:, c*S + i] = sum_j basis[i, j] coeffs[:, c*n_b + j]: (B, C*S, H, W) from (B, C*n_b, H, W)
    (a volume's (B, C*S, D, H, W) from (B, C*n_b, D, H, W))."""
    B, _, *space = coeffs.shape
    S, n_b = basis.shape
    w = torch.einsum("ij,bcj...->bci...", basis, coeffs.reshape(B, -1, n_b, *space))
    return w.reshape(B, -1, *space)


def nll_basis(x, loc, log_diag, coeffs, basis, stencil):
    """The NLL with off_diag = expand_basis(coeffs, basis), materialised: (B,)."""
    return nll(x, loc, log_diag, expand_basis(coeffs, basis), stencil)


def precision_diagonal(log_diag, off_diag, stencil, cross=None):
    """``Lambda_pp = d_p^2 + sum_i w_{p-delta_i,i}^2`` (+ sum_{c<j} xi_{kappa(c,j),p}^2 at channel j):
    (B, C, H, W)."""
    w = weights(off_diag, stencil)
    out = (2.0 * log_diag).exp()
    for i, (dy, dx) in enumerate(stencil.tall_offsets):
        out = out + shift(w[:, :, i].square(), -dy, -dx)
    if cross is not None:
        cs, js = cross_pairs(log_diag.shape[1], log_diag.device)
        out = out.index_add(1, js, cross.square())
    return out


@cached_unless_tracing(maxsize=64)
def _dense_pattern(stencil: Stencil, H: int, W: int, device: torch.device):
    """Where each weight lands in dense U: (flat index p*n + q in U, flat index i*n + p in the weights)."""
    n = H * W
    slots, sources = [], []
    # every pixel, the ones whose neighbour p + delta_i is outside sent to slot n*n (dropped): masks,
    # not nonzero, because fake tensors (torch.compile, FakeTensorMode) have no values
    inside = read_mask(stencil, H, W, torch.device("cpu")).reshape(stencil.S, n)
    p = torch.arange(n)
    for i, (dy, dx) in enumerate(stencil.tall_offsets):
        slots.append(torch.where(inside[i], p * n + p + dy * W + dx, n * n))
        sources.append(i * n + p)
    return torch.cat(slots).to(device), torch.cat(sources).to(device)


def to_dense_upper(log_diag, off_diag, stencil, cross=None):
    """Dense U: (B, C, n, n) with n = H*W in raster order; with cross weights dense M over the C*n
    unknowns in channel-major order (c*n + p), (B, C*n, C*n). Small images only."""
    B, C, H, W = log_diag.shape
    n = H * W
    slots, sources = _dense_pattern(stencil, H, W, log_diag.device)
    dense = F.pad(torch.diag_embed(log_diag.exp().reshape(B, C, n)).reshape(B, C, n * n), (0, 1))
    values = weights(off_diag, stencil).reshape(B, C, stencil.S * n)[..., sources]
    dense = dense.scatter(-1, slots.expand(B, C, -1), values)[..., :n * n].reshape(B, C, n, n)
    if cross is None:
        return dense
    rows = [[dense[:, c] if c == j else dense.new_zeros(B, n, n) for j in range(C)] for c in range(C)]
    for c in range(C):
        for j in range(c + 1, C):
            rows[c][j] = torch.diag_embed(cross[:, cross_index(c, j, C)].reshape(B, n))
    return torch.cat([torch.cat(row, dim=2) for row in rows], dim=1)


# --- triangular solves -------------------------------------------------------

@cached_unless_tracing(maxsize=64)
def _schedule(stencil: Stencil, H: int, W: int, device: torch.device):
    """Wavefronts of the back-substitution, earliest first.

    Pixel (y, x) depends on (y+dy, x+dx) for every offset; with the stencil's
    slope a, its time t = a*(H-1-y) + (W-1-x) exceeds every dependency's, so
    each wavefront (pixels of equal t) can be solved at once: a*(H-1)+W steps
    instead of H*W. Each entry is (p, fwd, bwd): the wavefront's flat pixel
    indices (P,), and for each offset the flat index of p+delta_i and of
    p-delta_i, (S, P), with n (one past the image, a zero slot) where outside.
    """
    n = H * W
    ys = torch.arange(H).repeat_interleave(W)
    xs = torch.arange(W).repeat(H)
    t = times(stencil, H, W)

    def neighbours(p, sign):      # inside the tall image; a volume's weights outside it are 0
        out = []
        for dy, dx in stencil.tall_offsets:
            qy, qx = ys[p] + sign * dy, xs[p] + sign * dx
            inside = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
            out.append(torch.where(inside, qy * W + qx, torch.full_like(qy, n)))
        return torch.stack(out)

    fronts = []
    for step in range(int(t.max()) + 1):
        p = torch.nonzero(t == step).flatten()
        if p.numel():
            fronts.append(tuple(v.to(device) for v in (p, neighbours(p, +1), neighbours(p, -1))))
    return fronts


def _padded(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (..., n+1) with a zero in the last slot (the 'outside' pixel)."""
    return F.pad(t, (0, 1))


def repeats(image: torch.Tensor, params: torch.Tensor) -> int:
    """How many images share each set of parameters (the solves take R samples per image)."""
    return image.shape[0] // params.shape[0] if params.shape[0] else 1     # an empty batch: 0 images


def sum_repeats(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(R*batch, ...) -> (batch, ...): a parameter's gradient summed over the samples that share it."""
    return t if t.shape[0] == batch else t.reshape(-1, batch, *t.shape[1:]).sum(0)


def _solve_operands(rhs, log_diag, off_diag, stencil):
    """rhs as (R, B*C, n) and the parameters as (B*C, n) and (B*C, S, n): image r*B + b uses parameters b."""
    Bp, C, H, W = log_diag.shape
    n = H * W
    return (rhs.reshape(repeats(rhs, log_diag), Bp * C, n), log_diag.exp().reshape(Bp * C, n),
            weights(off_diag, stencil).reshape(Bp * C, stencil.S, n))


def _channel_params(log_diag, off_diag, stencil, c):
    S = stencil.S
    return log_diag[:, c:c + 1], off_diag[:, c * S:(c + 1) * S]


def solve_upper(z, log_diag, off_diag, stencil, cross=None):
    """``U^-1 z`` by back-substitution in reverse raster order, one wavefront at a time:
    (B, C, H, W); differentiable by autograd (slowly: for tests). With cross weights, M^-1 z by
    block back-substitution over the channels: r_c = U_c^-1 (z_c - sum_{j>c} xi_{kappa(c,j)} r_j),
    the last channel first."""
    if cross is not None and z.shape[1] > 1:
        C = z.shape[1]
        cross = _repeat_params(cross, z.shape[0])
        out = [None] * C
        for c in range(C - 1, -1, -1):
            rhs = z[:, c:c + 1]
            for j in range(c + 1, C):
                rhs = rhs - cross[:, cross_index(c, j, C)][:, None] * out[j]
            out[c] = solve_upper(rhs, *_channel_params(log_diag, off_diag, stencil, c), stencil)
        return torch.cat(out, dim=1)
    H, W = z.shape[-2:]
    rhs, d, w = _solve_operands(z, log_diag, off_diag, stencil)
    out = z.new_zeros(*rhs.shape[:2], H * W + 1)
    for p, fwd, _ in _schedule(stencil, H, W, z.device):
        acc = (w[:, :, p] * out[..., fwd]).sum(-2)      # sum_i w_{p,i} eps_{p+delta_i}
        out[..., p] = (rhs[..., p] - acc) / d[:, p]
    return out[..., :H * W].reshape(z.shape)


def solve_upper_t(g, log_diag, off_diag, stencil, cross=None):
    """``U^-T g`` by forward substitution in raster order: (B, C, H, W). With cross weights M^-T g:
    r_j = U_j^-T (g_j - sum_{c<j} xi_{kappa(c,j)} r_c), the first channel first."""
    if cross is not None and g.shape[1] > 1:
        C = g.shape[1]
        cross = _repeat_params(cross, g.shape[0])
        out = []
        for j in range(C):
            rhs = g[:, j:j + 1]
            for c in range(j):
                rhs = rhs - cross[:, cross_index(c, j, C)][:, None] * out[c]
            out.append(solve_upper_t(rhs, *_channel_params(log_diag, off_diag, stencil, j), stencil))
        return torch.cat(out, dim=1)
    H, W = g.shape[-2:]
    rhs, d, w = _solve_operands(g, log_diag, off_diag, stencil)
    w = _padded(w)
    out = g.new_zeros(*rhs.shape[:2], H * W + 1)
    for p, _, bwd in reversed(_schedule(stencil, H, W, g.device)):
        w_from = torch.gather(w, 2, bwd.expand(w.shape[0], -1, -1))   # w_{p-delta_i, i}
        acc = (w_from * out[..., bwd]).sum(-2)
        out[..., p] = (rhs[..., p] - acc) / d[:, p]
    return out[..., :H * W].reshape(g.shape)


# --- the covariance band (Sigma = Lambda^-1 = U^-1 U^-T) ---------------------------------------

def band_width(stencil: Stencil, W: int) -> int:
    """b, the band's half-width in raster order: the largest flat offset dy*W + dx. The entries
    Sigma_{p,q} with 0 <= q - p <= b are closed under the recurrence U Sigma = U^-T (docs/kernels.md
    §5); the op returns L = b + 1 per pixel."""
    return max(dy * W + dx for dy, dx in stencil.tall_offsets)


def _upper_blocks(log_diag, off_diag, stencil, scaled=False):
    """U as block rows of image rows: (B, C, H, M, W, W) with block [y, m] = U_{y, y+m} (m = 0..R,
    R the largest dy), the weights outside the image 0. Built with diag_embed, differentiable.
    ``scaled``: V = D^-1 U instead (unit diagonal, weights w/d; a pinned pixel's row, d = inf, is e_p)."""
    B, C, H, W = log_diag.shape
    w = weights(off_diag, stencil)
    if scaled:
        w = w * (-log_diag).exp().unsqueeze(2)
    R = max(dy for dy, _ in stencil.tall_offsets)
    blocks = [[] for _ in range(R + 1)]
    blocks[0].append(torch.diag_embed(torch.ones_like(log_diag) if scaled else log_diag.exp()))
    for i, (dy, dx) in enumerate(stencil.tall_offsets):
        lo, hi = max(0, -dx), min(W, W - dx)
        if hi <= lo or not stencil.reachable(i):         # |dx| >= W (|dy| >= a volume's slice height): never inside
            continue
        blocks[dy].append(torch.diag_embed(w[:, :, i, :, lo:hi], offset=dx))
    zero = log_diag.new_zeros(B, C, H, W, W)
    return torch.stack([sum(b) if b else zero for b in blocks], dim=3)


def covariance_band(log_diag, off_diag, stencil, diagonal_only=False):
    """Sigma's band: (B, C*L, H, W) with channel c*L + k at pixel p the entry Sigma_{p, p+k}
    (0 where p + k is past the image), L = band_width + 1; with ``diagonal_only`` the variances
    Sigma_pp, (B, C, H, W).

    Block-Takahashi on the image rows, for clarity and autograd: U_{yy} Sigma_{y,y+m} =
    [m = 0] U_{yy}^-T - sum_k U_{y,y+k} Sigma_{y+k,y+m}, from the last row up, with the blocks
    Sigma_{y,y+m} for m = 0..M (M = R + 1 because a band entry of the last columns reaches one row
    further; more on images narrower than the stencil); each step is a batch of W x W triangular solves."""
    B, C, H, W = log_diag.shape
    # V = D^-1 U (each row over its diagonal): V Sigma = D^-2 V^-T, so w/d meets Sigma, never w alone
    # (w * Sigma overflows float32 where d spans e^+-30 although Sigma fits: issue #39 item 2)
    inv_d = (-log_diag).exp()
    U = _upper_blocks(log_diag, off_diag, stencil, scaled=True)
    R = U.shape[3] - 1
    L = band_width(stencil, W) + 1
    # blocks kept per row, Sigma_{y, y+m} for m <= M: the band's entries reach (W - 1 + b) // W rows
    # down (R + 1, or more on images narrower than the stencil); the recurrence is closed for any M >= R
    M = R if diagonal_only else max(R, (W - 1 + L - 1) // W)
    eye = torch.eye(W, dtype=log_diag.dtype, device=log_diag.device)
    rows = [None] * H                                      # rows[y][m] = Sigma_{y, y+m}

    def block(a, c):                                       # Sigma_{a, c}, a, c >= y+1, |a - c| <= M
        return rows[a][c - a] if c >= a else rows[c][a - c].transpose(-1, -2)

    for y in range(H - 1, -1, -1):
        D = U[:, :, y, 0]
        ks = [k for k in range(1, R + 1) if y + k < H]
        row = [None] * (min(M, H - 1 - y) + 1)
        for m in range(len(row) - 1, 0, -1):
            rhs = sum(U[:, :, y, k] @ block(y + k, y + m) for k in ks)
            row[m] = -torch.linalg.solve_triangular(D, rhs, upper=True) if ks else torch.zeros_like(D)
        inv_t = torch.linalg.solve_triangular(D.transpose(-1, -2), eye.expand_as(D), upper=False)
        inv_t = inv_t * inv_d[:, :, y, :, None].square()       # D^-2 V_yy^-T
        rhs = inv_t - sum(U[:, :, y, k] @ row[k].transpose(-1, -2) for k in ks) if ks else inv_t
        row[0] = torch.linalg.solve_triangular(D, rhs, upper=True)
        rows[y] = row
    if diagonal_only:
        return torch.stack([r[0].diagonal(dim1=-2, dim2=-1) for r in rows], dim=2)
    # entry (y, x, k): q = y*W + x + k lies m = (x + k) // W rows down, at column (x + k) % W
    xs = torch.arange(W, device=log_diag.device).view(W, 1) + torch.arange(L, device=log_diag.device).view(1, L)
    m_of, col = (xs // W), xs % W                           # (W, L)
    out = []
    for y, r in enumerate(rows):
        blocks = torch.stack(r + [torch.zeros_like(r[0])] * (M + 1 - len(r)), dim=2)   # (B, C, M+1, W, W)
        values = blocks[:, :, m_of, torch.arange(W, device=xs.device).view(W, 1), col]     # (B, C, W, L)
        out.append(torch.where(y + m_of < H, values, 0))
    band = torch.stack(out, dim=2)                          # (B, C, H, W, L)
    return band.permute(0, 1, 4, 2, 3).reshape(B, C * L, H, W)


@cached_unless_tracing(maxsize=16)
def _band_levels(stencil: Stencil, H: int, W: int, device: torch.device):
    """The band's entries e = k*n + i (Sigma_{i, i+k}) grouped by level T = t(i) + t(i+k), highest
    first (the adjoint's order), each with the entries that read it: for offset s, the reader
    (i - delta_s, i+k) at band slot k + f_s and (i+k - delta_s, i) at slot f_s - k, as flat band
    indices (L*n where absent: a zero slot) and the index of their factor -w/d (S*n where absent)."""
    n, L, S = H * W, band_width(stencil, W) + 1, stencil.S
    t = times(stencil, H, W)
    inside = read_mask(stencil, H, W, torch.device("cpu")).reshape(S, n)
    k, i = torch.meshgrid(torch.arange(L), torch.arange(n), indexing="ij")
    keep = i + k < n
    k, i = k[keep], i[keep]
    c = i + k
    level = t[i] + t[c]
    src, fac = [], []
    def reads(s, r):          # pixel r's offset s lands inside (r + f_s the entry read)
        return (r >= 0) & (r < n) & inside[s, r.clamp(0, n - 1)]

    for s, (dy, dx) in enumerate(stencil.tall_offsets):
        f = dy * W + dx
        r1 = i - f
        ok1 = reads(s, r1) & (k + f < L)
        r2 = c - f
        ok2 = (k > 0) & (k <= f) & reads(s, r2)
        src += [torch.where(ok1, (k + f) * n + r1, L * n), torch.where(ok2, (f - k) * n + r2, L * n)]
        fac += [torch.where(ok1, s * n + r1, S * n), torch.where(ok2, s * n + r2, S * n)]
    src, fac = torch.stack(src), torch.stack(fac)
    order = torch.argsort(level, descending=True, stable=True)
    counts = torch.unique_consecutive(level[order], return_counts=True)[1].tolist()
    out = []
    for part in torch.split(order, counts):
        out.append(tuple(v.to(device) for v in (k[part] * n + i[part], src[:, part], fac[:, part])))
    return out


def covariance_band_backward(grad, log_diag, off_diag, band, stencil):
    """The gradients (log_diag, off_diag) of sum(grad * band), band = covariance_band(...): the
    adjoint of the recurrence, level by level (highest first: every entry's readers are final), each
    entry gathering from the entries that read it, then summed over each pixel's row of the band:
    d/ds_i = -sum_k A_{i,k} Sigma_{i,i+k} - A_{i,0}/d_i^2, d/dw_{i,s} = -(1/d_i) sum_k A_{i,k}
    Sigma_{i+f_s, i+k}."""
    B, C, H, W = log_diag.shape
    n, S = H * W, stencil.S
    L = band.shape[1] // C
    planes = B * C
    d = log_diag.exp().reshape(planes, n)
    w = weights(off_diag, stencil).reshape(planes, S, n)
    factor = F.pad((-w / d[:, None]).reshape(planes, S * n), (0, 1))
    G = grad.reshape(planes, L * n)
    A = grad.new_zeros(planes, L * n + 1)
    for entries, src, fac in _band_levels(stencil, H, W, grad.device):
        A[:, entries] = G[:, entries] + (A[:, src] * factor[:, fac]).sum(1)
    A = A[:, :L * n].reshape(planes, L, n)
    sigma = band.reshape(planes, L, n)
    inv = 1 / d
    grad_s = -(A * sigma).sum(1) - A[:, 0] * inv * inv
    k = torch.arange(L, device=grad.device).view(L, 1)
    i = torch.arange(n, device=grad.device).view(1, n)
    flat_sigma = sigma.reshape(planes, L * n)
    read = read_mask(stencil, H, W, grad.device).reshape(S, n)
    grad_w = []
    for s, (dy, dx) in enumerate(stencil.tall_offsets):
        f = dy * W + dx
        index = ((k - f).abs() * n + torch.minimum(i + f, i + k)).clamp(max=L * n - 1)   # Sigma_{i+f, i+k}
        term = (A * flat_sigma[:, index.flatten()].reshape(planes, L, n)).sum(1) * -inv
        grad_w.append(torch.where(read[s], term, 0))
    return grad_s.reshape(B, C, H, W), torch.stack(grad_w, 1).reshape(B, C * S, H, W)
