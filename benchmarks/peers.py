"""How people compute the structured NLL and sample it today, for comparison.

- ``onehot_conv_nll``: the SUPN PyTorch code and the authors' TensorFlow code:
  a grouped convolution with one one-hot filter per offset gathers every
  neighbour into a (B, C*S, H, W) tensor, then a per-pixel weighted sum.
- ``unfold_einsum_nll``: ``F.unfold`` of the whole window, the S forward
  offsets picked out, then ``einsum`` with the weights.
- ``scipy_sample``: the CSR form of U, solved image by image with
  ``scipy.sparse.linalg.spsolve_triangular`` (as the authors' code samples).
- ``dense_sample``: dense U from ``to_dense_upper`` and
  ``torch.linalg.solve_triangular``, in chunks of planes that fit a memory budget.
All follow docs/contract.md §1 exactly; the benchmarks check them against the reference.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from structlik import Stencil, ops

LOG_2PI = math.log(2 * math.pi)


def _window(stencil: Stencil):
    """Half-sizes of the smallest centred kernel that holds every offset."""
    return max(dy for dy, _ in stencil.offsets), max(abs(dx) for _, dx in stencil.offsets)


def onehot_filters(stencil: Stencil, C: int, dtype, device) -> torch.Tensor:
    ry, rx = _window(stencil)
    filt = torch.zeros(stencil.S, 1, 2 * ry + 1, 2 * rx + 1, dtype=dtype, device=device)
    for i, (dy, dx) in enumerate(stencil.offsets):
        filt[i, 0, ry + dy, rx + dx] = 1.0
    return filt.repeat(C, 1, 1, 1)          # (C*S, 1, kh, kw), for groups=C


def onehot_conv_nll(x, loc, log_diag, off_diag, stencil, filters):
    B, C, H, W = x.shape
    r = x - loc
    ry, rx = _window(stencil)
    neighbours = F.conv2d(r, filters, padding=(ry, rx), groups=C)          # (B, C*S, H, W)
    u = log_diag.exp() * r + (off_diag * neighbours).view(B, C, stencil.S, H, W).sum(2)
    return 0.5 * u.square().sum((1, 2, 3)) - log_diag.sum((1, 2, 3)) + 0.5 * C * H * W * LOG_2PI


def unfold_einsum_nll(x, loc, log_diag, off_diag, stencil):
    B, C, H, W = x.shape
    r = x - loc
    ry, rx = _window(stencil)
    kw = 2 * rx + 1
    cols = F.unfold(r, (2 * ry + 1, kw), padding=(ry, rx)).view(B, C, -1, H * W)
    pick = torch.tensor([(ry + dy) * kw + (rx + dx) for dy, dx in stencil.offsets], device=x.device)
    neighbours = cols.index_select(2, pick)                                   # (B, C, S, H*W)
    w = off_diag.view(B, C, stencil.S, H * W)
    u = log_diag.exp().view(B, C, H * W) * r.view(B, C, H * W) + torch.einsum("bcsp,bcsp->bcp", w, neighbours)
    return 0.5 * u.square().sum((1, 2)) - log_diag.sum((1, 2, 3)) + 0.5 * C * H * W * LOG_2PI


class CSRPattern:
    """Row pointers and column indices of U for one plane; values filled per image."""

    def __init__(self, stencil: Stencil, H: int, W: int):
        import scipy.sparse  # noqa: F401
        n = H * W
        rows, cols, src = [], [], []
        ys, xs = np.divmod(np.arange(n), W)
        rows.append(np.arange(n)); cols.append(np.arange(n)); src.append(np.arange(n))   # diagonal: slot p
        for i, (dy, dx) in enumerate(stencil.offsets):
            ok = (ys + dy < H) & (xs + dx >= 0) & (xs + dx < W)
            p = np.nonzero(ok)[0]
            rows.append(p); cols.append(p + dy * W + dx); src.append(n + i * n + p)  # off_diag: slot n + i*n + p
        rows, cols, src = map(np.concatenate, (rows, cols, src))
        order = np.lexsort((cols, rows))
        self.n, self.cols, self.src = n, cols[order], src[order]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])

    def matrix(self, d: np.ndarray, w: np.ndarray):
        import scipy.sparse
        values = np.concatenate([d, w.reshape(-1)])[self.src]
        return scipy.sparse.csr_matrix((values, self.cols, self.indptr), shape=(self.n, self.n))


def scipy_sample(z, log_diag, off_diag, stencil, pattern: CSRPattern):
    from scipy.sparse.linalg import spsolve_triangular
    B, C, H, W = z.shape
    S = stencil.S
    d = log_diag.exp().reshape(B * C, H * W).numpy()
    w = off_diag.reshape(B * C, S, H * W).numpy()
    zz = z.reshape(B * C, H * W).numpy()
    out = np.empty_like(zz)
    for k in range(B * C):
        out[k] = spsolve_triangular(pattern.matrix(d[k], w[k]), zz[k], lower=False)
    return torch.from_numpy(out).reshape(B, C, H, W)


def dense_sample(z, log_diag, off_diag, stencil, budget_bytes=1 << 30):
    """U^-1 z through dense triangular solves, planes chunked to stay under ``budget_bytes``."""
    B, C, H, W = z.shape
    n = H * W
    per_plane = n * n * z.element_size()
    chunk = max(1, budget_bytes // per_plane)
    s = log_diag.reshape(B * C, 1, H, W)
    w = off_diag.reshape(B * C, stencil.S, H, W)
    zz = z.reshape(B * C, n, 1)
    out = []
    for k in range(0, B * C, chunk):
        U = ops.to_dense_upper(s[k:k + chunk], w[k:k + chunk], stencil)[:, 0]
        out.append(torch.linalg.solve_triangular(U, zz[k:k + chunk], upper=True))
    return torch.cat(out).reshape(B, C, H, W)


def torch_csr_sample(z, log_diag, off_diag, stencil, pattern: CSRPattern):
    """U^-1 z plane by plane with ``torch.triangular_solve`` on a sparse CSR U (cuSPARSE on CUDA)."""
    B, C, H, W = z.shape
    n, device = H * W, z.device
    crow = torch.as_tensor(pattern.indptr, device=device)
    col = torch.as_tensor(pattern.cols, device=device)
    src = torch.as_tensor(pattern.src, device=device)
    d = log_diag.exp().reshape(B * C, n)
    w = off_diag.reshape(B * C, stencil.S * n)
    values = torch.cat([d, w], dim=1)[:, src]
    zz = z.reshape(B * C, n, 1)
    out = torch.empty_like(zz)
    for k in range(B * C):
        U = torch.sparse_csr_tensor(crow, col, values[k], (n, n))
        out[k] = torch.triangular_solve(zz[k], U, upper=True).solution
    return out.reshape(B, C, H, W)
