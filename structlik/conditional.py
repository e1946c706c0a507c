"""A StructuredNormal conditioned on observed pixels: inpainting and posterior samples.

For the precision Lambda = U^T U, observed pixels O and missing pixels M,
``x_M | x_O ~ N(mu_M - Lambda_MM^-1 Lambda_MO (x_O - mu_O), Lambda_MM^-1)`` with
``Lambda_MM = A^T A``, ``A = U[:, M]``. Samples are exact by perturb-and-MAP:
``x_M - mu_M = Lambda_MM^-1 A^T (z - U[:, O] (x_O - mu_O))``, z ~ N(0, I) over every pixel
(z = 0 gives the conditional mean). ``Lambda_MM`` is solved by conjugate gradients
preconditioned with ``U_MM^T U_MM``, whose inverse is the two triangular solves with
``log_diag = +inf`` on the observed pixels (d = inf pins a pixel to 0, docs/contract.md §1).
That preconditioner is exact (one iteration) when nothing is observed, when everything
observed comes after the missing pixels in raster order, and when everything is observed.

Every step is one of the library's ops (U r, U^T y, the two solves), so this runs on every
backend, batched over images and samples, and differentiates by autograd through the
iterations (the sample is reparameterised in loc, log_diag, off_diag and the observed values).

The log-determinant ``log det Lambda_MM`` (for ``log_prob`` and ``observed_log_prob``) is exact
by the matrix determinant lemma: ``2 sum_M log d_p + log det(I + K K^T)`` with
``K = U[R, M] U_MM^-1`` over the rows R of observed pixels whose stencil reaches a missing pixel
(a hole's rim; every observed row near a missing one for scattered masks), R solves in one call.
The variances diag(Lambda_MM^-1) reuse them by Woodbury (``variance``): the band recurrence of
U_MM (U without the weights that touch an observed pixel) less the rim's rank-R correction.

Coupled channels (cross weights) are conditioned as the one-channel model of width C*W that is the
same Gaussian up to a permutation (``structlik.interleave``): a mask per channel and pixel.

Low-rank modes (``cov_factor`` W, x = mu + W zeta + e, zeta ~ N(0, I_R), e ~ N(0, Lambda^-1)) stay
exact through the R latent coordinates: given zeta, x_M | x_O is the structured conditional with its
mean moved by B zeta, B = Lambda_MM^-1 (Lambda W)_M (one solve of R right-hand sides); zeta | x_O is
N(Q^-1 Wh^T Lambda e, Q^-1) with Q = I + ||U Wh||^2, Wh = W - B (W filled in by the structured
conditional) and e the structured fill of x - mu. So x_M | x_O has mean mu_M|O + B zeta_hat and
covariance Lambda_MM^-1 + F F^T, F = B L_Q^-T: the structured conditional plus R modes again, whose
variance adds sum_r F_r^2 and whose log-determinant and log_prob take the determinant lemma and
Woodbury with the R x R capacitance I + F^T Lambda_MM F = I + L_Q^-1 B^T (Lambda W)_M L_Q^-T.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.distributions import Distribution, constraints

from . import _checks, ops, reference
from ._dtypes import upcast
from .interleave import deinterleave, interleave
from .stencil import Stencil

__all__ = ["ConditionalStructuredNormal"]


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` without torch.func's wrappers (vmap's batching, grad's tracking): the convergence test
    reads the values of every vmapped slice at once, which a wrapped tensor refuses (.item())."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _per_sample(t: torch.Tensor, images: int) -> torch.Tensor:
    """Per-image tensor ``t`` (N, ...) for ``images`` = R * N images (R samples of each): U r and U^T y
    read one set of parameters per image (only the solves read image k's at k % N)."""
    times = images // t.shape[0] if t.shape[0] else 1
    return t if times == 1 else t.repeat(times, 1, 1, 1)


def _dot(a, b):
    """Per-plane inner products, (K, C, 1, 1): channels are independent, and conjugate gradients run
    on each plane with its own step sizes (so no channel's iterate depends on another's)."""
    return (a * b).sum((2, 3), keepdim=True)


class ConditionalStructuredNormal(Distribution):
    r"""``prior`` (a :class:`structlik.StructuredNormal`) given ``value`` where ``mask`` is True.

    A distribution over whole images: observed pixels equal ``value``, missing ones follow the
    conditional Gaussian. Build it with ``StructuredNormal.condition(value, mask)``.

    Args:
        prior: the StructuredNormal, batch shape ``batch``.
        value: (\*batch, C, H, W) image whose observed pixels are conditioned on (the rest is ignored).
        mask: bool, broadcastable to (\*batch, C, H, W): True where observed.
        tol: relative residual ``|b - Lambda_MM x| / |b|`` conjugate gradients stop at, per plane
            (default 1e-5 in float32, 1e-10 in float64).
        max_iter: iterations at most (default 1000); a solve that has not reached ``tol`` by
            then raises a RuntimeError naming the residual it reached.

    ``iterations`` and ``residual`` (the largest over planes) say how the last solve went.
    """

    arg_constraints = {}
    has_rsample = True

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def __init__(self, prior, value, mask, *, tol: Optional[float] = None, max_iter: int = 1000,
                 validate_args=None):
        event = tuple(prior.event_shape)
        E = len(event)                      # (C, H, W), or a volume's (C, D, H, W)
        sp = _checks.spatial(prior.stencil)
        _checks.check_float_tensor("value", value, f"(*batch, C, {sp})", min_dim=E)
        if tuple(value.shape[-E:]) != event:
            raise ValueError(f"value: expected shape (*batch, C, {sp}) with (C, {sp}) = {event}, "
                             f"got {tuple(value.shape)}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor broadcastable to (*batch, C, H, W), True where observed, "
                            f"got {mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        for name, t in (("value", value), ("mask", mask)):
            if t.device != prior.loc.device:
                raise ValueError(f"{name}: expected a tensor on {prior.loc.device} (the distribution's device), "
                                 f"got one on {t.device}")
        try:
            full = _checks.broadcast_shapes(prior.loc.shape, value.shape, mask.shape)
        except RuntimeError:
            raise ValueError(f"value, mask: shapes {tuple(value.shape)} and {tuple(mask.shape)} do not broadcast with "
                             f"the distribution's {tuple(prior.loc.shape)}") from None
        if tuple(full[-E:]) != event:
            raise ValueError(f"mask: shape {tuple(mask.shape)} changes the event (C, {sp}) = {event}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter: expected a positive integer, got {max_iter!r}")
        if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol: expected a number in (0, 1), got {tol!r}")
        batch = full[:-E]
        self.prior = prior.expand(batch)
        # coupled channels: the same Gaussian as one channel of width C*W (structlik.interleave), whose
        # conditional this one's is up to the permutation of the pixels; every public method delegates
        self._inner = None
        if prior.cross is not None and event[0] > 1:
            nd = prior.stencil.ndim
            self._inner = ConditionalStructuredNormal(
                self.prior._interleaved(), interleave(value.expand(full), nd), interleave(mask.expand(full), nd),
                tol=tol, max_iter=max_iter, validate_args=validate_args)
        # the ops' view of the event: an image's (C, H, W), a volume's tall (C, D*H, W) (contract §3)
        self._event = (event[0], math.prod(event[1:-1]), event[-1])
        self._offsets = prior.stencil.op_offsets(event[-2])
        self._stencil = Stencil.from_flat_offsets(self._offsets)
        dtype = torch.promote_types(value.dtype, prior.loc.dtype)
        self.value = value.to(dtype).expand(full)
        self.mask = mask.expand(full)
        self.tol = tol if tol is not None else (1e-10 if dtype == torch.float64 else 1e-5)
        self.max_iter = max_iter
        self.iterations, self.residual = 0, 0.0
        self._mean = None
        self._modes_cache = None
        super().__init__(batch_shape=batch, event_shape=prior.event_shape, validate_args=False)
        self._validate_args = self.prior._validate_args if validate_args is None else bool(validate_args)

    # -- the operators, on (K, C, H, W) images whose parameters are image k % N's -------------------

    def _flat(self):
        """loc, log_diag, off_diag (materialised), value and the missing mask as (N, ...) in the
        compute dtype, and the log_diag that pins the observed pixels."""
        p = self.prior
        loc = p.loc.reshape(-1, *self._event)
        ld, od = (t.reshape(t.shape[0], t.shape[1], *self._event[1:]) for t in p._flat_params())
        value = self.value.reshape(-1, *self._event)
        loc, ld, od, value = upcast(*_checks.promote(loc, ld, od, value))
        missing = (~self.mask).reshape(-1, *self._event)
        pinned = torch.where(missing, ld, torch.full_like(ld, math.inf))
        return loc, ld, od, value, missing.to(loc.dtype), pinned

    def _solve(self, b, ld, od, pinned, m):
        """x with Lambda_MM x = b (b zero on observed pixels), by preconditioned conjugate gradients."""
        offsets = self._offsets
        ld_r, od_r, m_r = (_per_sample(t, b.shape[0]) for t in (ld, od, m))

        def lam(v):
            return m_r * ops.apply_upper_t_op(ops.apply_upper_op(m_r * v, ld_r, od_r, offsets), ld_r, od_r, offsets)

        def precondition(r):       # (U_MM^T U_MM)^-1 r: two solves with the observed pixels pinned
            return ops.solve_upper_op(ops.solve_upper_t_op(r, pinned, od, offsets), pinned, od, offsets)
        b_norm = _dot(b, b).sqrt()
        live = b_norm > 0           # a zero right-hand side (every pixel observed) has solution 0
        scale = torch.where(live, b_norm, torch.ones_like(b_norm))
        x = torch.zeros_like(b)
        r = b
        z = precondition(r)
        p = z
        rz = _dot(r, z)
        residual = 1.0
        for it in range(1, self.max_iter + 1):
            lp = lam(p)
            curvature = _dot(p, lp)
            alpha = torch.where(live & (curvature > 0), rz / torch.where(curvature > 0, curvature, 1), 0)
            x = x + alpha * p
            r = r - alpha * lp
            rel = _plain((_dot(r, r).sqrt() / scale).detach())
            residual = float(rel.max()) if rel.numel() else 0.0
            if residual <= self.tol or not math.isfinite(residual):
                break
            z = precondition(r)
            rz_new = _dot(r, z)
            p = z + torch.where(rz != 0, rz_new / torch.where(rz != 0, rz, 1), 0) * p
            rz = rz_new
        self.iterations, self.residual = it, residual
        if not math.isfinite(residual) or residual > self.tol:
            raise RuntimeError(f"ConditionalStructuredNormal: conjugate gradients reached a relative residual of "
                               f"{residual:.3g} after {it} iterations, above tol={self.tol:g}; raise max_iter or tol "
                               f"(a U far from diagonally dominant converges slowly: bound its weights, "
                               f"structlik.bound_weights)")
        return x

    def _draw(self, z):
        """value where observed, loc + Lambda_MM^-1 A^T (z - U[:, O] (value - loc)_O) elsewhere; z: (R*N, C, H, W)
        noise, or None for the conditional mean."""
        loc, ld, od, value, m, pinned = self._flat()
        if z is not None and loc.shape[0] == 0:         # an empty batch: empty samples
            return z.reshape(0, *loc.shape[1:]).to(loc.dtype)
        offsets = self._offsets
        # U[:, O] (x_O - mu_O): value's missing pixels are never read (NaN there, the usual "unknown", is fine)
        observed = m == 0
        pull = ops.apply_upper_op(torch.where(observed, value - loc, 0), ld, od, offsets)
        rhs = -pull if z is None else z.reshape(-1, *pull.shape).sub(pull).reshape(z.shape)
        K = rhs.shape[0]
        b = _per_sample(m, K) * ops.apply_upper_t_op(rhs, _per_sample(ld, K), _per_sample(od, K), offsets)
        with self.prior._value_checks():      # NaN/inf named before any iteration
            _checks.check_result(b, {"value (observed pixels)": torch.where(observed, value, 0), "loc": loc,
                                     "log_diag": ld, "off_diag": od}, op="condition")
        with _checks.validation(False):
            x = self._solve(b, ld, od, pinned, m)
        return torch.where(_per_sample(m, K) > 0, _per_sample(loc, K) + x, _per_sample(value, K))

    # -- Distribution API -----------------------------------------------------

    def _coupled(self, t: torch.Tensor) -> torch.Tensor:
        """An interleaved result of the inner conditional in this one's layout (C channels); its
        solve's iterations and residual too."""
        self.iterations, self.residual = self._inner.iterations, self._inner.residual
        return deinterleave(t, self.prior.event_shape[0], self.prior.stencil.ndim)

    @property
    def mean(self):
        """The conditional mean (``value`` where observed), (\\*batch, C, H, W); one solve, kept when
        no parameter needs a gradient."""
        if self._inner is not None:
            return self._coupled(self._inner.mean)
        if self._mean is not None:
            return self._mean
        mean = self._draw(None) if self.prior.cov_factor is None else self._modes_mean(self._modes())
        mean = mean.reshape(self.batch_shape + self.event_shape).to(self.value.dtype)
        if not self._needs_grad():
            self._mean = mean
        return mean

    def _needs_grad(self):
        p = self.prior
        return any(t is not None and t.requires_grad
                   for t in (p.loc, p.log_diag, p.off_diag, p.basis, p.cross, p.cov_factor, self.value))

    @staticmethod
    def _modes_mean(modes):
        """The conditional mean with the modes, (N, C, H, W): the structured one moved by B zeta_hat."""
        x0 = modes["structured_mean"]
        return torch.where(modes["missing"], x0 + modes["shift"].reshape(x0.shape), x0)

    def _modes(self):
        """The low-rank modes given the observed pixels (module docstring), per image of the flat batch:
        ``shift`` (N, n) = B zeta_hat, ``F`` (N, R, n) the conditional's factor's columns, ``G`` (N, R, n)
        = (Lambda W)_M, ``LQ`` and ``Lc`` (N, R, R) the Cholesky factors of Q and of I + F^T Lambda_MM F,
        ``structured_mean`` (N, C, H, W) the structured conditional's mean (value where observed) and
        ``missing`` its mask. Kept when nothing needs a gradient, as the mean is; otherwise formed once
        per method call (it holds two conjugate-gradient solves) and passed along."""
        if self._modes_cache is not None:
            return self._modes_cache
        loc, ld, od, value, m, pinned = self._flat()
        N, offsets = ld.shape[0], self._offsets
        W = self.prior.cov_factor.reshape(N, -1, *self._event).to(loc.dtype)
        R = W.shape[1]
        cols = W.transpose(0, 1).reshape(R * N, *self._event)          # image r*N + b: column r of image b
        ld_r, od_r, m_r = (_per_sample(t, R * N) for t in (ld, od, m))

        def rows(t):                                                    # R*N images -> (N, R, n)
            return t.reshape(R, N, -1).transpose(0, 1)
        G = m_r * ops.apply_upper_t_op(ops.apply_upper_op(cols, ld_r, od_r, offsets), ld_r, od_r, offsets)
        with self.prior._value_checks():      # NaN/inf named before any iteration
            _checks.check_result(G, {**self.prior._blame(), "cov_factor": self.prior.cov_factor}, op="condition")
        with _checks.validation(False):
            B = self._solve(G, ld, od, pinned, m) if N else G
        UWh = rows(ops.apply_upper_op(cols - B, ld_r, od_r, offsets))   # U (W - B)
        x0 = self._draw(None)
        Ue = ops.apply_upper_op(x0 - loc, ld, od, offsets).reshape(N, -1, 1)   # e: x - mu, structured fill
        eye = torch.eye(R, dtype=loc.dtype, device=loc.device)
        LQ = torch.linalg.cholesky(eye + UWh @ UWh.mT)
        zeta = torch.cholesky_solve(UWh @ Ue, LQ)                       # (N, R, 1)
        Bn, Gn = rows(B), rows(G)
        F = torch.linalg.solve_triangular(LQ, Bn, upper=False)         # F^T = L_Q^-1 B^T
        BGB = Bn @ Gn.mT                                                # B^T Lambda_MM B (Lambda_MM B = G)
        BGB = 0.5 * (BGB + BGB.mT)                                      # symmetric up to the solve's tol
        inner = torch.linalg.solve_triangular(LQ, torch.linalg.solve_triangular(LQ, BGB, upper=False).mT,
                                              upper=False)
        Lc = torch.linalg.cholesky(eye + inner)
        # (no check of the results: G was checked, and _solve raises on a non-finite residual)
        out = {"shift": (Bn * zeta).sum(1), "F": F, "G": Gn, "LQ": LQ, "Lc": Lc, "structured_mean": x0,
               "missing": m > 0}
        if not self._needs_grad():
            self._modes_cache = out
        return out

    @property
    def mode(self):
        return self.mean

    def rsample(self, sample_shape=torch.Size()):
        if self._inner is not None:
            return self._coupled(self._inner.rsample(sample_shape))
        shape = self._extended_shape(sample_shape)
        dtype = torch.float64 if self.value.dtype == torch.float64 else torch.float32
        z = self.prior._noise(shape, dtype)
        out = self._draw(z.reshape(-1, *self._event))
        if self.prior.cov_factor is not None:       # + B zeta_hat + F eps_1, eps_1 ~ N(0, I_R) per sample
            modes = self._modes()
            F = modes["F"].to(out.dtype)
            N, R = F.shape[:2]
            eps = self.prior._noise((out.shape[0] // max(N, 1), N, R), out.dtype)
            out = out + (modes["shift"].to(out.dtype) + torch.einsum("snr,nrj->snj", eps, F)).reshape(out.shape)
        return out.reshape(shape).to(self.value.dtype)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return ConditionalStructuredNormal(self.prior, self.value.expand(batch_shape + self.event_shape),
                                           self.mask.expand(batch_shape + self.event_shape), tol=self.tol,
                                           max_iter=self.max_iter, validate_args=self._validate_args)

    def _rim(self, flat):
        """The rim's part of Lambda_MM = U_MM^T U_MM + V^T V, V = U[R, M] over the rows R of observed
        pixels whose stencil reaches a missing pixel: K = U_MM^-T V^T as (R, N*C, n) (zero off M)
        and the Cholesky factor of I + K^T K per plane, (N*C, R, R); None, None when R = 0. ``flat``:
        what :meth:`_flat` returned (the caller's, not formed twice)."""
        loc, ld, od, value, m, pinned = flat
        stencil = self._stencil                  # the ops' (a volume's: its tall view's, contract §3)
        N, C, H, W = ld.shape
        n, S = H * W, stencil.S
        missing = m > 0
        w = reference.weights(od, stencil).reshape(N * C, S, n)          # 0 where pointing outside
        miss = missing.reshape(N * C, n)
        touches = []         # (N*C, S, n): observed p whose offset i lands on a missing pixel
        for dy, dx in stencil.tall_offsets:
            lands = reference.shift(m, dy, dx).reshape(N * C, n) > 0
            touches.append(lands & ~miss)
        touch = torch.stack(touches, 1) & reference.read_mask(stencil, H, W, ld.device).reshape(1, S, n)
        rows = touch.any(1)                                              # R per plane
        count = rows.sum(1)
        R = int(count.max()) if count.numel() else 0
        if R == 0:
            return None, None
        plane, pos = rows.nonzero(as_tuple=True)
        rank = torch.cumsum(rows.to(torch.int64), 1)[plane, pos] - 1
        rhs = ld.new_zeros(R, N * C, n)
        for i, (dy, dx) in enumerate(stencil.tall_offsets):
            hit = touch[plane, i, pos]
            p_, q_, r_ = plane[hit], pos[hit] + dy * W + dx, rank[hit]
            rhs = rhs.index_put((r_, p_, q_), w[p_, i, pos[hit]], accumulate=True)
        K = ops.solve_upper_t_op(rhs.reshape(R * N, C, H, W), pinned, od, self._offsets)
        K = K.reshape(R, N * C, n)
        gram = torch.einsum("rpn,spn->prs", K, K)
        eye = torch.eye(R, dtype=gram.dtype, device=gram.device)
        return K, torch.linalg.cholesky(eye + gram)

    def log_det_missing(self, _modes=None):
        """``log det Lambda_MM`` per image, (\\*batch,): the determinant lemma over the observed rows
        that reach a missing pixel (module docstring); with cov_factor the conditional precision's,
        less log det(I + F^T Lambda_MM F). (``_modes``: this call's :meth:`_modes`, when the caller
        has formed it.)"""
        if self._inner is not None:
            return self._inner.log_det_missing()
        flat = self._flat()
        _, ld, _, _, m, _ = flat
        logdet = (2 * ld * m).sum((1, 2, 3))
        K, L = self._rim(flat)
        if K is None:
            return self._log_det_modes(logdet, _modes).reshape(self.batch_shape)
        extra = 2 * torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)
        return self._log_det_modes(logdet + extra.reshape(ld.shape[:2]).sum(1), _modes).reshape(self.batch_shape)

    def _log_det_modes(self, logdet, modes=None):
        """``logdet`` (N,), log det Lambda_MM, less log det(I + F^T Lambda_MM F): the conditional
        precision's log-determinant with the modes (the determinant lemma)."""
        if self.prior.cov_factor is None:
            return logdet
        Lc = (modes or self._modes())["Lc"]
        return logdet - 2 * torch.diagonal(Lc, dim1=-2, dim2=-1).log().sum(-1).to(logdet.dtype)

    @property
    def variance(self):
        """The exact conditional variances diag(Lambda_MM^-1) of the missing pixels (0 where observed),
        batch_shape + event_shape, differentiable. Woodbury over the rim (module docstring):
        Lambda_MM^-1 = A^-1 - A^-1 V^T (I + K^T K)^-1 V A^-1 with A = U_MM^T U_MM, whose diagonal is
        the band recurrence's variance of U_MM (U with every weight that touches an observed pixel
        dropped and the observed pixels' d = 1: U_MM plus an identity block), and the correction
        sum_r (L^-1 U_MM^-1 K)_rp^2 from the R rim solves the log-determinant makes anyway."""
        if self._inner is not None:
            return self._coupled(self._inner.variance)
        flat = self._flat()
        loc, ld, od, value, m, pinned = flat
        N, C, H, W = ld.shape
        stencil = self._stencil
        if N == 0:
            return self.value.new_zeros(self.batch_shape + self.event_shape)
        # weight i of pixel p is U_MM's when both p and p + offset_i are missing
        keep = torch.stack([(m * reference.shift(m, dy, dx)) > 0 for dy, dx in stencil.tall_offsets], 2)
        od_mm = torch.where(keep, od.reshape(N, C, stencil.S, H, W), 0).reshape(od.shape)
        with _checks.validation(False):
            out = ops.covariance_band_op(ld * m, od_mm, self._offsets, True)
        K, L = self._rim(flat)
        if K is not None:
            R = K.shape[0]
            a = ops.solve_upper_op(K.reshape(R * N, C, H, W), pinned, od, self._offsets)     # A^-1 V^T
            a = a.reshape(R, N * C, H * W).permute(1, 0, 2)                               # (N*C, R, n)
            y = torch.linalg.solve_triangular(L, a, upper=False)
            out = out - y.square().sum(1).reshape(N, C, H, W)
        if self.prior.cov_factor is not None:        # + sum_r F_r^2 (F is 0 where observed)
            out = out + self._modes()["F"].square().sum(1).reshape(out.shape).to(out.dtype)
        out = out * m
        with self.prior._value_checks():
            _checks.check_result(out, {"loc": loc, "log_diag": ld, "off_diag": od}, op="variance")
        return out.reshape(self.batch_shape + self.event_shape).to(self.value.dtype)

    @property
    def stddev(self):
        return self.variance.sqrt()

    def entropy(self):
        """The differential entropy of the missing pixels, (\\*batch,): k/2 (1 + log 2 pi) - log det(Lambda_MM)/2
        over the k missing pixels (the observed ones are fixed: no entropy)."""
        if self._inner is not None:
            return self._inner.entropy()
        log_det = self.log_det_missing()
        k = (~self.mask).flatten(-len(self.event_shape)).sum(-1).to(log_det.dtype)
        out = 0.5 * k * (1.0 + reference.LOG_2PI) - 0.5 * log_det
        return out.to(self.value.dtype)

    def log_prob(self, value):
        """log p(x_M | x_O) of ``value``'s missing pixels (its observed ones are ignored), for value of
        shape (\\*sample, \\*batch, C, H, W): (\\*sample, \\*batch)."""
        lead = self._check_value(value)
        if self._inner is not None:
            return self._inner.log_prob(interleave(value, self.prior.stencil.ndim))
        dtype = torch.promote_types(value.dtype, self.value.dtype)
        if dtype != self.value.dtype:      # a float64 value of a float32 conditional: solved in float64
            return self._in(dtype).log_prob(value)
        if self.batch_shape.numel() == 0:
            return value.new_zeros(lead)
        loc, ld, od, _, m, _ = self._flat()
        modes = None if self.prior.cov_factor is None else self._modes()       # formed once for this call
        mean = upcast(self.mean.reshape(-1, *self._event))[0] if modes is None else self._modes_mean(modes)
        x = upcast(value.reshape(-1, *mean.shape))[0].to(mean.dtype)           # (R, N, C, H, W)
        R = x.shape[0]
        missing = m > 0
        # the observed pixels of value are ignored, NaN there too (0 * NaN would not be)
        e = torch.where(missing, x - mean, 0).reshape(-1, *self._event)
        params = [_per_sample(t, e.shape[0]) for t in (ld, od)]
        u = ops.apply_upper_op(e, *params, self._offsets).reshape(R, *mean.shape)
        k = m.sum((1, 2, 3))
        quadratic = u.square().sum((2, 3, 4))                               # (R, N)
        if modes is not None:       # Woodbury: less ||Lc^-1 F^T Lambda_MM e||^2, = L_Q^-1 G^T e
            a = torch.einsum("nrj,knj->nrk", modes["G"], e.reshape(R, *modes["G"].shape[::2]))
            a = torch.linalg.solve_triangular(modes["Lc"], torch.linalg.solve_triangular(modes["LQ"], a, upper=False),
                                              upper=False)
            quadratic = quadratic - a.square().sum(1).transpose(0, 1)
        out = 0.5 * self.log_det_missing(modes).reshape(-1) - 0.5 * k * reference.LOG_2PI - 0.5 * quadratic
        with self.prior._value_checks():
            _checks.check_result(out, {"value (missing pixels)": torch.where(missing, x, 0)}, op="log_prob")
        return out.reshape(lead).to(dtype)

    def _in(self, dtype) -> "ConditionalStructuredNormal":
        """This conditional computed in ``dtype`` (its value cast; the prior's parameters promote to it)."""
        tol = None if self.tol == (1e-10 if self.value.dtype == torch.float64 else 1e-5) else self.tol
        return ConditionalStructuredNormal(self.prior, self.value.to(dtype), self.mask, tol=tol,
                                           max_iter=self.max_iter, validate_args=self._validate_args)

    def observed_log_prob(self):
        """The marginal likelihood log p(x_O) of the observed pixels, (\\*batch,): the prior's density
        at the conditional mean over the conditional's density there."""
        if self._inner is not None:
            return self._inner.observed_log_prob()
        modes = None if self.prior.cov_factor is None else self._modes()       # formed once for this call
        mean = self.mean if modes is None else \
            self._modes_mean(modes).reshape(self.batch_shape + self.event_shape).to(self.value.dtype)
        k = (~self.mask).flatten(-len(self.event_shape)).sum(-1).to(mean.dtype)
        at_mean = 0.5 * self.log_det_missing(modes) - 0.5 * k * reference.LOG_2PI
        return self.prior.log_prob(mean) - at_mean

    def _check_value(self, value) -> torch.Size:
        """value's leading shape, (*sample, *batch), once its trailing shape is (*batch, C, H, W)."""
        E = len(self.event_shape)
        sp = _checks.spatial(self.prior.stencil)
        _checks.check_float_tensor("value", value, f"(*sample, *batch, C, {sp})", min_dim=E)
        tail = tuple(self.batch_shape + self.event_shape)
        if value.dim() < len(tail) or tuple(value.shape[value.dim() - len(tail):]) != tail:
            raise ValueError(f"value: expected shape (*sample, *batch, C, {sp}) = (*sample, "
                             f"{', '.join(map(str, tail))}), got {tuple(value.shape)}")
        if value.device != self.value.device:
            raise ValueError(f"value: expected a tensor on {self.value.device}, got one on {value.device}")
        return value.shape[:value.dim() - E]
