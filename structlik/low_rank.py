"""Low-rank global modes on top of the structured precision: Sigma = W W^T + Lambda^-1, Lambda = M^T M.

``StructuredNormal(..., cov_factor=W)`` with W (*batch, R, C, H, W) (volumes (*batch, R, C, D, H, W)),
column r of W an image; torch's name, as in ``LowRankMultivariateNormal``. Every formula needs M
only as products (``apply_upper``, ``apply_upper_t``) and solves, the R x R capacitance

    K = I_R + V^T V,   V = M W   (R images, one call of the image op),

and its Cholesky factor, so nothing n x n or n x R x R is formed:

    Sigma^-1 = Lambda - G K^-1 G^T,  G = Lambda W = M^T V          (Woodbury)
    log det Sigma = log det K - 2 sum log d                         (the determinant lemma)
    r^T Sigma^-1 r = ||M r||^2 - ||L^-1 V^T M r||^2,  K = L L^T

Every function takes the distribution and works for cross weights, volumes, dilations and the
basis alike, because it reaches U only through the image ops (which take all of them).
"""
from __future__ import annotations

import math

import torch

from . import _checks, ops

LOG_2PI = math.log(2 * math.pi)


def flat_factor(dist) -> torch.Tensor:
    """W flattened over the batch to (N, R, C, *space)."""
    W = dist.cov_factor
    return W.reshape(-1, *W.shape[-dist._E - 1:])


def columns(W: torch.Tensor) -> torch.Tensor:
    """(N, R, C, *space) as R*N images, image r*N + b = column r of image b (the ops' ``params_repeat``
    order: image k uses parameters k % N)."""
    return W.transpose(0, 1).reshape(-1, *W.shape[2:])


def uncolumns(t: torch.Tensor, N: int) -> torch.Tensor:
    """R*N images back to (N, R, n), n the event's size."""
    return t.reshape(-1, N, t[0].numel()).transpose(0, 1)


def _apply(dist, images, ld, od, *, transpose=False):
    name = "apply_upper_t" if transpose else "apply_upper"
    op = ops.apply_upper_t_op if transpose else ops.apply_upper_op
    return ops.image_op(op, name, images, ld, od, dist.stencil, cross=dist._flat_cross(), params_repeat=True,
                        blame={**dist._blame(), "cov_factor": dist.cov_factor})


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half inputs compute in float32 (the capacitance's Cholesky has no half kernel)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def capacitance(dist, ld, od, images=None):
    """(V, chol K) of ``dist``, V (N, R, n); with ``images`` (k*N images) also M applied to them.
    Two calls of the image op (the columns', the images'): one call on their concatenation measured
    the same (16.5 against 16.7 ms, B32 64x64 r2 rank 10, benchmarks/bench_low_rank.py, 2-core Xeon)
    and needs the copy."""
    W = flat_factor(dist)
    N, R = W.shape[:2]
    V = uncolumns(_apply(dist, columns(W).to(ld.dtype), ld, od), N)
    mapped = None if images is None else _apply(dist, images, ld, od)
    K = torch.baddbmm(torch.eye(R, dtype=V.dtype, device=V.device).expand(N, R, R), V, V.transpose(1, 2))
    # K = I + V V^T is positive definite; NaN in W or U gives NaN in L, named by the result checks
    return V, torch.linalg.cholesky_ex(K).L, mapped


def log_det_capacitance(L: torch.Tensor) -> torch.Tensor:
    return 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def woodbury_quadratic(z: torch.Tensor, V: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """||z||^2 - ||L^-1 V z||^2 per image: r^T Sigma^-1 r for z = M r; z (k, N, n), V (N, R, n)."""
    a = torch.einsum("knj,nrj->knr", z, V)
    y = torch.linalg.solve_triangular(L, a.movedim(0, -1), upper=False)      # (N, R, k)
    return z.square().sum(-1) - y.square().sum(-2).movedim(-1, 0)


def log_prob(dist, value: torch.Tensor) -> torch.Tensor:
    """log N(value; loc, W W^T + Lambda^-1), the sample and batch dimensions of ``value`` kept."""
    E = dist._E
    shape = _checks.broadcast_shapes(value.shape, dist.loc.shape)
    lead = shape[:-E]
    ld, od = dist._flat_params()
    dtype = compute_dtype(torch.promote_types(value.dtype, ld.dtype))
    ld, od = ld.to(dtype), od.to(dtype)
    N = ld.shape[0]
    r = (value.to(dtype) - dist.loc.to(dtype)).expand(shape).reshape(-1, *dist.event_shape)
    with dist._value_checks():
        V, L, z = capacitance(dist, ld, od, r)
        z = z.reshape(-1, N, V.shape[-1])
        maha = woodbury_quadratic(z, V, L)
        n = V.shape[-1]
        out = -0.5 * (maha + log_det_capacitance(L) + n * LOG_2PI) + ld.flatten(1).sum(1)
        _checks.check_result(out, {"value": value, "loc": dist.loc, **dist._blame(), "cov_factor": dist.cov_factor},
                             op="log_prob")
    return out.reshape(lead)


def entropy_correction(dist) -> torch.Tensor:
    """1/2 log det K: the low-rank modes' share of the entropy, batch_shape."""
    ld, od = dist._flat_params()
    dtype = compute_dtype(ld.dtype)
    with dist._value_checks():
        _, L, _ = capacitance(dist, ld.to(dtype), od.to(dtype))
    return 0.5 * log_det_capacitance(L).reshape(dist.batch_shape)


def variance_correction(dist) -> torch.Tensor:
    """sum_r W_r^2: the modes' share of diag(Sigma), batch_shape + event_shape."""
    return dist.cov_factor.square().sum(-dist._E - 1)


def covariance_correction(dist, channel, at) -> torch.Tensor:
    """(W W^T) e for the column of :meth:`StructuredNormal.covariance` at (channel, pixel ``at``)."""
    W = dist.cov_factor                                       # (*batch, R, C, *space)
    E = dist._E
    pick = W[(..., *at)]                                      # (*batch, R, C)
    if channel is None:           # channel c's column at the pixel: W_r[c, q] W_r[c, at]
        return (W * pick.reshape(*pick.shape, *(1,) * (E - 1))).sum(-E - 1)
    return (W * pick[..., channel].reshape(*pick.shape[:-1], *(1,) * E)).sum(-E - 1)


def precision_correction(dist) -> torch.Tensor:
    """diag(G K^-1 G^T), G = Lambda W: what the modes take from diag(Lambda), batch_shape + event."""
    ld, od = dist._flat_params()
    dtype = compute_dtype(ld.dtype)
    ld, od = ld.to(dtype), od.to(dtype)
    N = ld.shape[0]
    with dist._value_checks():
        V, L, _ = capacitance(dist, ld, od)
        G = uncolumns(_apply(dist, columns(V.reshape(N, -1, *dist.event_shape)), ld, od, transpose=True), N)
    P = torch.cholesky_solve(G, L)                            # K^-1 G, (N, R, n)
    return (G * P).sum(1).reshape(dist.batch_shape + dist.event_shape)


def band_correction(W: torch.Tensor, L: int) -> torch.Tensor:
    """The band of W W^T in covariance_band's layout: (N, R, C, *space) -> (N, C*L, *space), entry k
    at flat (raster) pixel p = sum_r W_r(p) W_r(p + k), 0 past the image."""
    N, R, C = W.shape[:3]
    space = W.shape[3:]
    f = W.flatten(3)
    n = f.shape[-1]
    out = f.new_zeros(N, C, L, n)
    for k in range(min(L, n)):
        out[:, :, k, :n - k] = (f[..., :n - k] * f[..., k:]).sum(1)
    return out.reshape(N, C * L, *space)


def kl_correction(p, q) -> torch.Tensor:
    """KL(p || q) minus the KL of their structured parts (cov_factor dropped), p and q over one batch:

        1/2 [ ||M_q W_p||^2 - tr(K_q^-1 G_q^T Sigma_p G_q) - a^T K_q^-1 a + log det K_q - log det K_p ],

    G_q = Lambda_q W_q, G_q^T Sigma_p G_q = ||M_p^-T G_q||^2 + ||W_p^T G_q||^2, a = V_q^T M_q (mu_p - mu_q)."""
    ld_p, od_p = p._flat_params()
    ld_q, od_q = q._flat_params()
    dtype = compute_dtype(torch.promote_types(ld_p.dtype, ld_q.dtype))
    ld_p, od_p, ld_q, od_q = (t.to(dtype) for t in (ld_p, od_p, ld_q, od_q))
    N = ld_p.shape[0]
    event = p.event_shape
    total = ld_p.new_zeros(N)
    Wp = None if p.cov_factor is None else flat_factor(p).to(dtype)
    if Wp is not None:
        _, Lp, _ = capacitance(p, ld_p, od_p)
        total = total - log_det_capacitance(Lp)
        qW = _apply(q, columns(Wp), ld_q, od_q)                          # M_q W_p
        total = total + qW.reshape(-1, N, event.numel()).square().sum((0, 2))
    if q.cov_factor is not None:
        diff = (p.loc - q.loc).to(dtype).reshape(N, *event)
        Vq, Lq, z = capacitance(q, ld_q, od_q, diff)
        total = total + log_det_capacitance(Lq)
        a = torch.einsum("nj,nrj->nr", z.reshape(N, -1), Vq)
        total = total - torch.cholesky_solve(a.unsqueeze(-1), Lq).squeeze(-1).mul(a).sum(-1)
        G = _apply(q, columns(Vq.reshape(N, -1, *event)), ld_q, od_q, transpose=True)     # M_q^T V_q
        P = uncolumns(ops.image_op(ops.solve_upper_t_op, "solve_upper_t", G, ld_p, od_p, p.stencil,
                                   cross=p._flat_cross(), params_repeat=True), N)        # M_p^-T G_q
        gram = P @ P.transpose(1, 2)
        if Wp is not None:
            Q = Wp.flatten(2) @ uncolumns(G, N).transpose(1, 2)                   # W_p^T G_q, (N, R_p, R_q)
            gram = gram + Q.transpose(1, 2) @ Q
        total = total - torch.cholesky_solve(gram, Lq).diagonal(dim1=-2, dim2=-1).sum(-1)
    return 0.5 * total
