"""``torch.distributions.kl_divergence`` for StructuredNormal against StructuredNormal and against a
diagonal Gaussian (``Independent(Normal(loc, scale), 3)``), both ways; exact.

For Gaussians p, q over n pixels,
    KL(p || q) = 1/2 [tr(Lambda_q Sigma_p) + ||U_q (mu_p - mu_q)||^2 - n] + log|U_p| - log|U_q|,
with log|U| = sum(log_diag). tr(Lambda_q Sigma_p) = sum_k (U_q Sigma_p U_q^T)_kk needs Sigma_p only at
pairs (k + f_a, k + f_b) of U_q's row k, all within Sigma_p's band (structlik.ops.covariance_band)
of a stencil holding both distributions' offsets; against a diagonal q it needs Sigma_p's diagonal
(ops.variance), and a diagonal p against a structured q needs Lambda_q's (ops.precision_diagonal).
Coupled channels (cross weights, M = U + X): between two structured distributions the KL of their
one-channel interleaved forms (structlik.interleave: the same Gaussians, pixels permuted); with a
diagonal side, the coupled variances and precision diagonal and ||M (mu_p - mu_q)||^2.
Low-rank modes (cov_factor): the KL of the structured parts plus structlik.low_rank.kl_correction;
a diagonal side then enters as a StructuredNormal with zero weights.
"""
from __future__ import annotations

import torch
from torch.distributions import Independent, Normal, register_kl

from . import _checks, low_rank, ops, reference
from .distribution import StructuredNormal
from .stencil import Stencil

__all__ = ["trace_precision_covariance"]


def _union(p: Stencil, q: Stencil) -> Stencil:
    """p's offsets, then q's that p lacks: a stencil whose band holds every entry q's rows need."""
    if p == q:
        return p
    extra = [o for o in q.offsets if o not in set(p.offsets)]
    return Stencil.of_offsets((*p.offsets, *extra)) if extra else p


def _widen(off_diag, C: int, stencil: Stencil, wide: Stencil):
    """off_diag of ``stencil`` as the weights of ``wide`` (its offsets first): zeros for the rest."""
    if wide is stencil:
        return off_diag
    w = off_diag.unflatten(1, (C, stencil.S))                 # (B, C, S, H, W) or (B, C, S, D, H, W)
    pad = w.new_zeros(*w.shape[:2], wide.S - stencil.S, *w.shape[3:])
    return torch.cat([w, pad], dim=2).flatten(1, 2)


def trace_precision_covariance(band, log_diag, off_diag, stencil: Stencil, band_stencil: Stencil):
    """tr(U Sigma U^T) per image, (B,): Sigma from its band (B, C*L, H, W) of ``band_stencil``
    (ops.covariance_band), U from log_diag (B, C, H, W) and off_diag (B, C*S, H, W) of ``stencil``,
    whose offsets ``band_stencil``'s band must cover. Volumes (B, C, D, H, W) as their tall view."""
    from .ops import _library
    stencil = Stencil.from_flat_offsets(_library.op_offsets(stencil, log_diag))   # a volume's: tall offsets
    band, log_diag, off_diag = (_library.fold(t) for t in (band, log_diag, off_diag))
    B, C, H, W = log_diag.shape
    L = band.shape[1] // C
    if max(dy * W + dx for dy, dx in stencil.tall_offsets) >= L:
        raise ValueError("band: narrower than the stencil's largest offset")
    band = band.unflatten(1, (C, L))
    w = reference.weights(off_diag, stencil)                     # (B, C, S, H, W), 0 outside
    # an offset with |dx| >= W never lands inside (its flat offset dy*W + dx can be <= 0: no band entry)
    rows = [((0, 0), log_diag.exp())] + [(o, w[:, :, i]) for i, o in enumerate(stencil.tall_offsets)
                                          if stencil.reachable(i) and abs(o[1]) < W]
    rows.sort(key=lambda r: r[0][0] * W + r[0][1])               # ascending flat offset
    total = 0
    for a, (da, ua) in enumerate(rows):
        fa = da[0] * W + da[1]
        for db, ub in rows[a:]:
            fb = db[0] * W + db[1]
            # Sigma[k + f_a, k + f_b] = band[f_b - f_a] at pixel k + delta_a (inside wherever u_a(k) != 0)
            term = ua * ub * reference.shift(band[:, :, fb - fa], *da)
            total = total + (term if fb == fa else 2 * term)
    return total.sum((1, 2, 3))


def _flat(dist: StructuredNormal, batch):
    d = dist.expand(batch)
    ld, od = d._flat_params()
    return d, ld, od


def _mahalanobis(dist: StructuredNormal, ld, od, diff, blame):
    """||M (mu_p - mu_q)||^2 per image, with M of ``dist`` (its cross weights too); ``blame``: the
    user's tensors to name when it is not finite (the difference of the means is no argument)."""
    u = ops.image_op(ops.apply_upper_op, "apply_upper", diff.reshape(ld.shape), ld, od, dist.stencil,
                     cross=dist._flat_cross(), blame=blame)
    return u.square().flatten(1).sum(1)


def _diagonal_normal(dist: Independent, other: StructuredNormal, side: str):
    """The Normal inside ``dist`` when it is a diagonal Gaussian over ``other``'s event (C, H, W)."""
    E = other._E
    if not isinstance(dist.base_dist, Normal) or dist.reinterpreted_batch_ndims != E \
            or dist.event_shape != other.event_shape:
        raise NotImplementedError(
            f"kl_divergence: the {side} distribution must be Independent(Normal(loc, scale), {E}) with event "
            f"shape ({_checks.spatial(other.stencil).join(('C, ', ''))}) = {tuple(other.event_shape)}, got {dist}")
    return dist.base_dist


def _as_structured(normal: Normal, like: StructuredNormal) -> StructuredNormal:
    """A diagonal Gaussian as a StructuredNormal of ``like``'s stencil with zero weights."""
    scale = normal.scale.expand(normal.loc.shape) if normal.scale.dim() < normal.loc.dim() else normal.scale
    loc = normal.loc.expand(scale.shape)
    C = loc.shape[-like._E]
    weights = loc.new_zeros(*loc.shape[:-like._E], C * like.stencil.S, *loc.shape[-like._E + 1:])
    return StructuredNormal(loc, -scale.log(), weights, like.stencil, validate_args=like._validate_args)


def _kl_low_rank(p: StructuredNormal, q: StructuredNormal):
    """KL(p || q) with low-rank modes on either side: the structured parts' KL plus the modes' terms."""
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    p, q = p.expand(batch), q.expand(batch)
    base = _kl_structured_structured(p._structured_part(), q._structured_part())
    with p._value_checks():
        extra = low_rank.kl_correction(p, q).reshape(batch).to(base.dtype)
    inputs = {name: t for name, t in (("p.cov_factor", p.cov_factor), ("q.cov_factor", q.cov_factor)) if t is not None}
    return _checked_kl(base + extra, p, inputs)


@register_kl(StructuredNormal, StructuredNormal)
def _kl_structured_structured(p: StructuredNormal, q: StructuredNormal):
    if p.event_shape != q.event_shape:
        raise ValueError(f"kl_divergence: event shapes {tuple(p.event_shape)} and {tuple(q.event_shape)} differ")
    if p.cov_factor is not None or q.cov_factor is not None:
        return _kl_low_rank(p, q)
    if p.cross is not None or q.cross is not None:
        # The KL is invariant under a permutation of the pixels applied to both: coupled channels
        # as one channel of width C*W (structlik.interleave), where M is a plain stencil factor.
        return _kl_structured_structured(p._interleaved(), q._interleaved())
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    p, ld_p, od_p = _flat(p, batch)
    q, ld_q, od_q = _flat(q, batch)
    ld_p, od_p, ld_q, od_q = _checks.promote(ld_p, od_p, ld_q, od_q)
    C = ld_p.shape[1]
    wide = _union(p.stencil, q.stencil)
    with p._value_checks():
        band = ops.covariance_band(ld_p, _widen(od_p, C, p.stencil, wide), wide)
    trace = trace_precision_covariance(band, ld_q, od_q, q.stencil, wide)
    blame = {"p.loc": p.loc, "q.loc": q.loc, "q.log_diag": q.log_diag, "q.off_diag": q.off_diag}
    with q._value_checks():
        maha = _mahalanobis(q, ld_q, od_q, p.loc - q.loc, blame)
    n = p.event_shape.numel()
    kl = 0.5 * (trace + maha - n) + ld_p.flatten(1).sum(1) - ld_q.flatten(1).sum(1)
    return kl.reshape(batch)


def _checked_kl(kl, dist: StructuredNormal, inputs: dict):
    """NaN/inf in the KL named by the input that holds them (the structured side's validate_args)."""
    with dist._value_checks():
        _checks.check_result(kl, inputs, op="kl_divergence")
    return kl


@register_kl(StructuredNormal, Independent)
def _kl_structured_diagonal(p: StructuredNormal, q: Independent):
    normal = _diagonal_normal(q, p, "second")
    if p.cov_factor is not None:
        return _kl_low_rank(p, _as_structured(normal, p))
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    p = p.expand(batch)
    precision = normal.scale.expand(batch + p.event_shape).pow(-2)
    diff = (p.loc - normal.loc).expand(batch + p.event_shape)
    n = p.event_shape.numel()
    dims = tuple(range(-p._E, 0))
    inner = (p.variance * precision).sum(dims) + (diff.square() * precision).sum(dims) - n
    kl = 0.5 * inner + normal.scale.log().expand(batch + p.event_shape).sum(dims) + p.log_diag.sum(dims)
    return _checked_kl(kl, p, {"p.loc": p.loc, "q.loc": normal.loc, "q.scale": normal.scale})


@register_kl(Independent, StructuredNormal)
def _kl_diagonal_structured(p: Independent, q: StructuredNormal):
    normal = _diagonal_normal(p, q, "first")
    if q.cov_factor is not None:
        return _kl_low_rank(_as_structured(normal, q), q)
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    q, ld_q, od_q = _flat(q, batch)
    event = q.event_shape
    dims = tuple(range(-q._E, 0))
    variance = normal.scale.expand(batch + event).square()
    with q._value_checks():
        trace = (q.precision_diagonal() * variance).sum(dims)
        maha = _mahalanobis(q, ld_q, od_q, (normal.loc - q.loc).expand(batch + event),
                            {"p.loc": normal.loc, "q.loc": q.loc, "q.log_diag": q.log_diag,
                             "q.off_diag": q.off_diag}).reshape(batch)
    n = event.numel()
    kl = 0.5 * (trace + maha - n) - q.log_diag.sum(dims) - normal.scale.log().expand(batch + event).sum(dims)
    return _checked_kl(kl, q, {"p.scale": normal.scale})
