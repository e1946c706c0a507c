"""The tests' dense float64 oracle: M built entry by entry from the formula of docs/contract.md §1,
for images (B, C, H, W) and volumes (B, C, D, H, W), with cross weights,

  (M r)_{c,p} = d_{c,p} r_{c,p} + sum_i w_{c*S+i,p} r_{c,p+delta_i} + sum_{j>c} xi_{kappa(c,j),p} r_{j,p}

over the C*n unknowns in channel-major order c*n + p, a neighbour taken only inside the image or
volume. Nothing of structlik builds it (reference.to_dense_upper is checked against it), and it is
differentiable in every parameter, so gradients can be checked against autograd of dense formulas."""
import itertools

import torch
from torch.distributions import MultivariateNormal


def dense_m(log_diag, off_diag, cross, stencil):
    """M of each image or volume: (B, C*n, C*n), float64 if the parameters are."""
    if stencil.ndim == 2:                          # an image is a volume of one slice
        from structlik import Stencil
        volume = Stencil.of_offsets([(0, *o) for o in stencil.offsets])
        return dense_m(log_diag.unsqueeze(2), off_diag.unsqueeze(2),
                       None if cross is None else cross.unsqueeze(2), volume)
    B, C, D, H, W = log_diag.shape
    n, S = D * H * W, stencil.S
    rows, cols, params = [], [], []        # M[row, col] = the parameter at flat index params (in one list)
    flat_w = off_diag.reshape(B, -1)
    for c, (z, y, x) in itertools.product(range(C), itertools.product(range(D), range(H), range(W))):
        p = (z * H + y) * W + x
        for i, (dz, dy, dx) in enumerate(stencil.offsets):
            qz, qy, qx = z + dz, y + dy, x + dx
            if 0 <= qz < D and 0 <= qy < H and 0 <= qx < W:
                rows.append(c * n + p)
                cols.append(c * n + (qz * H + qy) * W + qx)
                params.append((c * S + i) * n + p)
    M = torch.diag_embed(log_diag.reshape(B, -1).exp())
    index = torch.tensor(rows, dtype=torch.long) * (C * n) + torch.tensor(cols, dtype=torch.long)
    M = M.reshape(B, -1).index_add(1, index, flat_w[:, torch.tensor(params, dtype=torch.long)])
    M = M.reshape(B, C * n, C * n)
    if cross is not None and C > 1:
        for k, (c, j) in enumerate((c, j) for c in range(C) for j in range(c + 1, C)):
            block = torch.diag_embed(cross[:, k].reshape(B, n))
            M = M + torch.nn.functional.pad(block, (j * n, (C - 1 - j) * n, c * n, (C - 1 - c) * n))
    return M


def dense_normal(dist):
    """A StructuredNormal as torch's MultivariateNormal over its C*n pixels, channel-major (one
    batch dimension); with cov_factor W, Sigma = W W^T + (M^T M)^-1."""
    ld = dist.log_diag.reshape(-1, *dist.log_diag.shape[-dist._E:])
    od = dist.off_diag if dist.basis is None else dist._flat_params()[1]
    od = od.reshape(-1, *od.shape[-dist._E:])
    cross = dist._flat_cross()
    M = dense_m(ld, od, cross, dist.stencil)
    loc = dist.loc.reshape(ld.shape[0], -1)
    if getattr(dist, "cov_factor", None) is None:
        return MultivariateNormal(loc, precision_matrix=M.mT @ M)
    # low-rank modes: Sigma = W W^T + (M^T M)^-1, formed densely (no Woodbury)
    W = dist.cov_factor.reshape(ld.shape[0], dist.cov_factor.shape[-dist._E - 1], -1).mT      # (B, n, R)
    eye = torch.eye(M.shape[-1], dtype=M.dtype).expand_as(M)
    M_inv = torch.linalg.solve_triangular(M, eye, upper=True)
    return MultivariateNormal(loc, covariance_matrix=M_inv @ M_inv.mT + W @ W.mT)


def dense_diagonal(normal_loc, normal_scale):
    """Independent(Normal(loc, scale)) over (B, *event) as a MultivariateNormal over the flat event."""
    B = normal_loc.shape[0]
    return MultivariateNormal(normal_loc.reshape(B, -1), scale_tril=torch.diag_embed(normal_scale.reshape(B, -1)))
