"""``StructuredNormal``: the structured Gaussian as a torch.distributions.Distribution."""
from __future__ import annotations

import math

import torch
from torch._guards import detect_fake_mode
from torch.distributions import Distribution, constraints

from . import _checks, low_rank, ops
from .basis import check_basis, expand_basis
from .conditional import ConditionalStructuredNormal
from .interleave import interleave, interleave_weights, interleaved_stencil
from .head import (DEFAULT_WEIGHT_BOUND, ILL_CONDITIONED, bound_weights, check_bound, split_head,
                   largest_weight_ratio, warn_ill_conditioned)
from .stencil import Stencil

__all__ = ["StructuredNormal", "standard_normal"]

# 1 / (1 - 0.9): no sample of weights bounded by from_head's default reaches it (see _check_sample)
AMPLIFICATION = 10.0


def standard_normal(shape, dtype, device) -> torch.Tensor:
    """z ~ N(0, I) for ``rsample``. On CPU tensors the extension's vectorised generator
    (csrc/standard_normal.cpp: ATen's float64 ``normal_`` is scalar code, and cost more than
    the solve that uses z), seeded by one draw from torch's generator so ``torch.manual_seed``
    reproduces it; ``torch.randn`` elsewhere (another backend serving CPU tensors: the reference
    forced, or no extension), while compiling, under fake tensors and inside torch.func transforms."""
    device = torch.device(device)
    if (device.type == "cpu" and dtype in (torch.float32, torch.float64) and ops.prepare(device) == "cpu"
            and not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is None
            and detect_fake_mode() is None):        # the seed is read from a tensor: not under fake tensors
        seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64))
        return ops.standard_normal_op(list(shape), seed, dtype)
    return torch.randn(shape, dtype=dtype, device=device)


class StructuredNormal(Distribution):
    r"""Gaussian over images with sparse upper-triangular precision factor U.

    ``x ~ N(loc, (U^T U)^{-1})`` with, per channel and in raster order,
    ``(U r)_p = exp(log_diag_p) r_p + sum_i off_diag_{p,i} r_{p+delta_i}``
    (docs/contract.md §1). Channels are independent unless ``cross`` couples them; the event
    is one image.

    Args:
        loc: (\*batch, C, H, W) mean.
        log_diag: (\*batch, C, H, W) log of U's diagonal.
        off_diag: (\*batch, C*S, H, W) weights of the stencil offsets,
            channel c / offset i at index c*S + i.
        stencil: the :class:`structlik.Stencil` that fixes the offsets.
        validate_args: as in torch.distributions; also switches off the
            (synchronising) finiteness checks of the kernels for this instance.
        basis: optional learned basis (S, n_b) (paper section 4.3); ``off_diag``
            then holds its coefficients, (\*batch, C*n_b, H, W). ``log_prob``
            forms the weights inside the kernel; sampling materialises them.
        cross: optional cross weights (\*batch, C(C-1)/2, H, W) coupling the channels of each
            pixel (supn_base's ``cross_ch``): U becomes M with
            ``(M r)_{c,p} = (U r)_{c,p} + sum_{j>c} cross_{kappa(c,j),p} r_{j,p}``, pairs in the
            order (0,1), (0,2), ..., (1,2), ... (docs/contract.md §1). The log-determinant, and so
            the entropy, is unchanged; ``variance``, ``stddev``, ``correlation``,
            ``kl_divergence`` and ``condition`` take them (through ``_interleaved``);
            ``covariance_band`` does not yet (it raises ``NotImplementedError``).
        cov_factor: optional low-rank global modes W (\*batch, R, C, H, W) (volumes
            (\*batch, R, C, D, H, W)), torch's name as in ``LowRankMultivariateNormal``: the covariance
            becomes ``W W^T + Lambda^-1`` (:mod:`structlik.low_rank`: Woodbury and the determinant
            lemma with the R x R capacitance ``I + (M W)^T (M W)``). ``log_prob``, ``rsample``,
            ``entropy``, ``variance``, ``stddev``, ``covariance``, ``correlation``,
            ``covariance_band``, ``precision_diagonal`` and ``kl_divergence`` take it; ``condition``
            raises ``NotImplementedError``.

    ``batch_shape`` is the broadcast of the three leading shapes and
    ``event_shape`` is (C, H, W) (a volume's (C, D, H, W) with ``Stencil(k, ndim=3)``): ``log_prob``
    and ``entropy`` return ``batch_shape``, ``rsample(sample_shape)`` returns
    ``sample_shape + batch_shape + event_shape``.
    """

    has_rsample = True

    @property
    def arg_constraints(self):
        """Real tensors over the event: (C, H, W), or a volume's (C, D, H, W)."""
        real = constraints.independent(constraints.real, self._E)
        return {"loc": real, "log_diag": real, "off_diag": real}

    @property
    def support(self):
        return constraints.independent(constraints.real, self._E)

    def __init__(self, loc, log_diag, off_diag, stencil: Stencil, validate_args=None, *, basis=None, cross=None,
                 cov_factor=None):
        _checks.check_stencil(stencil)
        coef = "off_diag"
        E = stencil.ndim + 1                       # event dimensions: (C, H, W) or (C, D, H, W)
        sp = _checks.spatial(stencil)
        for name, t, layout in (("loc", loc, f"(*batch, C, {sp})"), ("log_diag", log_diag, f"(*batch, C, {sp})"),
                                (coef, off_diag, f"(*batch, C*S, {sp})" if basis is None else
                                 f"(*batch, C*n_b, {sp})")):
            _checks.check_float_tensor(name, t, layout, min_dim=E)
        if basis is not None:
            check_basis(basis, stencil)
        per_channel = stencil.S if basis is None else basis.shape[1]
        what = "C*S" if basis is None else "C*n_b"
        event = tuple(loc.shape[-E:])
        C, *space = event
        space = tuple(space)
        if tuple(log_diag.shape[-E:]) != event:
            raise ValueError(f"log_diag: expected shape (*batch, C, {sp}) with (C, {sp}) = {event}, "
                             f"got {tuple(log_diag.shape)}")
        if tuple(off_diag.shape[-E:]) != (C * per_channel, *space):
            raise ValueError(f"{coef}: expected shape (*batch, {what}, {sp}) = "
                             f"(*batch, {', '.join(map(str, (C * per_channel, *space)))}) "
                             f"with {what[2:]}={per_channel}, got {tuple(off_diag.shape)}")
        if cross is not None:
            _checks.check_float_tensor("cross", cross, f"(*batch, C(C-1)/2, {sp})", min_dim=E)
            if tuple(cross.shape[-E:]) != (C * (C - 1) // 2, *space):
                raise ValueError(f"cross: expected shape (*batch, C(C-1)/2, {sp}) = "
                                 f"(*batch, {', '.join(map(str, (C * (C - 1) // 2, *space)))}) with C={C}, "
                                 f"got {tuple(cross.shape)}")
        if cov_factor is not None:
            _checks.check_float_tensor("cov_factor", cov_factor, f"(*batch, R, C, {sp})", min_dim=E + 1)
            if tuple(cov_factor.shape[-E:]) != event or cov_factor.shape[-E - 1] == 0:
                raise ValueError(f"cov_factor: expected shape (*batch, R, C, {sp}) with R >= 1 and (C, {sp}) = "
                                 f"{event}, got {tuple(cov_factor.shape)}")
        shapes = [loc.shape[:-E], log_diag.shape[:-E], off_diag.shape[:-E]] + ([] if cross is None else
                                                                               [cross.shape[:-E]])
        shapes += [] if cov_factor is None else [cov_factor.shape[:-E - 1]]
        try:
            batch = _checks.broadcast_shapes(*shapes)
        except RuntimeError:
            names = (f"loc, log_diag, {coef}" + ("" if cross is None else ", cross")
                     + ("" if cov_factor is None else ", cov_factor"))
            raise ValueError(f"{names}: batch shapes {', '.join(str(tuple(t)) for t in shapes)} "
                             f"do not broadcast") from None
        _checks.check_consistent(loc=loc, log_diag=log_diag, off_diag=off_diag,
                                 **({} if basis is None else {"basis": basis}),
                                 **({} if cross is None else {"cross": cross}),
                                 **({} if cov_factor is None else {"cov_factor": cov_factor}))
        if min(event) == 0:
            raise ValueError(f"loc: expected a non-empty event (C, {sp}), got {tuple(loc.shape)}")
        # one floating dtype, torch.result_type's (a bfloat16 head beside a float32 mean computes in float32)
        loc, log_diag, off_diag, basis, cross, cov_factor = _checks.promote_optional(loc, log_diag, off_diag, basis,
                                                                                     cross, cov_factor)
        self.stencil = stencil
        self.basis = basis
        self.loc = loc.expand(batch + event)
        self.log_diag = log_diag.expand(batch + event)
        self.off_diag = off_diag.expand(batch + off_diag.shape[-E:])
        # from_head's default: _off_diag holds the head's raw weights, _weight_bound their bound,
        # and _bounded the bounded weights once .off_diag has been read
        self._weight_bound, self._bounded = None, None
        # one channel has no pairs: a (*batch, 0, H, W) tensor is no coupling
        self.cross = cross.expand(batch + cross.shape[-E:]) if cross is not None and C > 1 else None
        self.cov_factor = None if cov_factor is None else cov_factor.expand(batch + cov_factor.shape[-E - 1:])
        # Not Distribution's own parameter validation: it reads every parameter and syncs on
        # construction. The ops find NaN/inf from their results instead (structlik._checks).
        super().__init__(batch_shape=batch, event_shape=torch.Size(event), validate_args=False)
        self._validate_args = (torch.distributions.Distribution._validate_args if validate_args is None
                               else bool(validate_args))

    @classmethod
    def from_head(cls, head: torch.Tensor, stencil: Stencil, *, weight_bound=DEFAULT_WEIGHT_BOUND,
                  validate_args=None, cross: bool = False, rank: int = 0) -> "StructuredNormal":
        """The distribution of a decoder head (B, C*(2+S), H, W): channels ``loc`` (C),
        ``log_diag`` (C, ``-log sigma``), raw weights (C*S), as :func:`structlik.split_head`;
        with ``cross=True`` (B, C*(2+S) + C(C-1)/2, H, W), the raw cross weights last. With
        ``rank=R`` the head has R*C channels more, last: ``cov_factor`` (B, R, C, H, W), channel
        r*C + c holding mode r of channel c (:func:`structlik.head_channels` counts them all).

        ``weight_bound`` (default 0.9) bounds the weights (:func:`structlik.bound_weights`:
        sum_i |w_{p,i}| < 0.9 d_p, cross weights included, so samples stay finite and a
        zero-initialised head starts at a diagonal Gaussian); ``None`` takes the raw weights as
        they are.
        """
        # Without cross weights the default bound is applied inside the NLL kernel: the raw weights
        # stay the head's views (the head's gradient written in one piece); .off_diag forms the
        # bounded weights when read.
        in_kernel = weight_bound is not None and not cross
        parts = list(split_head(head, stencil, weight_bound=None if in_kernel else weight_bound, cross=cross,
                                rank=rank))
        cov_factor = parts.pop() if rank else None
        out = cls(*parts[:3], stencil, validate_args=validate_args, cross=parts[3] if cross else None,
                  cov_factor=cov_factor)
        if in_kernel:
            out._weight_bound = check_bound(weight_bound, "weight_bound")
        return out

    @property
    def off_diag(self) -> torch.Tensor:
        """U's off-diagonal weights (*batch, C*S, H, W) (a basis's coefficients with a basis); from
        ``from_head``'s default bound, formed from the raw weights at the first read."""
        if self._weight_bound is None:
            return self._off_diag
        if self._bounded is None:
            E = self._E
            ld, raw = self.log_diag, self._off_diag
            self._bounded = bound_weights(ld.reshape(-1, *ld.shape[-E:]), raw.reshape(-1, *raw.shape[-E:]),
                                          self._weight_bound).reshape(raw.shape)
        return self._bounded

    @off_diag.setter
    def off_diag(self, value: torch.Tensor) -> None:
        self._off_diag, self._weight_bound = value, None

    # -- helpers --------------------------------------------------------------

    @property
    def _E(self) -> int:
        """The event's dimensions: (C, H, W), or (C, D, H, W) for volumes."""
        return self.stencil.ndim + 1

    def _value_checks(self):
        """This instance's validate_args decides, whatever the global default is now."""
        return _checks.validation(self._validate_args)

    def _blame(self):
        """The user's tensors to name when a result is not finite."""
        out = {"log_diag": self.log_diag, "off_diag": self.off_diag}
        if self.basis is not None:
            out["basis"] = self.basis
        if self.cross is not None:
            out["cross"] = self.cross
        return out

    def _flat_cross(self):
        """The cross weights flattened over the batch to (N, C(C-1)/2, H, W), or None."""
        return None if self.cross is None else self.cross.reshape(-1, *self.cross.shape[-self._E:])

    def _uncoupled(self, what: str) -> None:
        if self.cross is not None:
            raise NotImplementedError(f"StructuredNormal.{what}: not implemented with cross weights (coupled "
                                      f"channels) yet; variance, stddev, covariance(index), correlation(index), "
                                      f"kl_divergence and condition are exact with them")

    def _interleaved(self) -> "StructuredNormal":
        """This distribution with its C channels laid out as one channel of width C*W (column
        C*x + c holds channel c of pixel x; :mod:`structlik.interleave`): the same Gaussian up to
        a permutation of its pixels, with cross weights as a one-channel stencil's weights. Its
        ``log_prob`` of ``interleave(value)`` equals this ``log_prob(value)``, and so do its KL,
        entropy and (interleaved) variances."""
        ld, od = self._flat_params()
        C, nd = self.event_shape[0], self.stencil.ndim
        lead = self.batch_shape

        def batched(t):
            return t.reshape(lead + t.shape[1:])

        loc = self.loc.reshape(-1, *self.event_shape)
        W = None
        if self.cov_factor is not None:     # each mode an image, interleaved like the mean
            W = low_rank.flat_factor(self)
            W = interleave(W.flatten(0, 1), nd).unflatten(0, W.shape[:2])
            W = W.reshape(lead + W.shape[1:])
        return StructuredNormal(batched(interleave(loc, nd)), batched(interleave(ld, nd)),
                                batched(interleave_weights(od, self._flat_cross(), C, self.stencil)),
                                interleaved_stencil(self.stencil, C), validate_args=self._validate_args,
                                cov_factor=W)

    def _structured_part(self) -> "StructuredNormal":
        """This distribution without its low-rank modes (cov_factor dropped): N(loc, Lambda^-1)."""
        out = self.expand(self.batch_shape)
        out.cov_factor = None
        return out

    def _flat_params(self, materialise: bool = True):
        """log_diag and off_diag flattened over the batch to (N, ...): views, also for
        broadcast batch dims (stride 0); with a basis, off_diag is formed from it
        unless ``materialise`` is False."""
        ld = self.log_diag.reshape(-1, *self.log_diag.shape[-self._E:])
        od = self.off_diag.reshape(-1, *self.off_diag.shape[-self._E:])
        if self.basis is not None and materialise:
            od = expand_basis(od, self.basis)
        return ld, od

    # -- Distribution API -----------------------------------------------------

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StructuredNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.stencil = self.stencil
        new.basis = self.basis
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.log_diag = self.log_diag.expand(batch_shape + self.event_shape)
        new.off_diag = self._off_diag.expand(batch_shape + self._off_diag.shape[-self._E:])
        new._weight_bound, new._bounded = self._weight_bound, None     # the raw weights, expanded
        new.cross = None if self.cross is None else self.cross.expand(batch_shape + self.cross.shape[-self._E:])
        new.cov_factor = (None if self.cov_factor is None else
                          self.cov_factor.expand(batch_shape + self.cov_factor.shape[-self._E - 1:]))
        super(StructuredNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self):
        return self.loc

    @property
    def mode(self):
        return self.loc

    @property
    def variance(self):
        """The exact marginal variances diag(Lambda^-1), batch_shape + (C, H, W), differentiable: one
        sweep of the band recurrence (docs/kernels.md §4), not 1 / precision_diagonal() (the variance
        of a pixel given all the others: smaller)."""
        ld, od = self._flat_params()
        with self._value_checks():
            out = ops.variance(ld, od, self.stencil, self._flat_cross())
        out = out.reshape(self.batch_shape + self.event_shape)
        return out if self.cov_factor is None else out + low_rank.variance_correction(self)

    @property
    def stddev(self):
        return self.variance.sqrt()

    def covariance_band(self):
        """Sigma's band, batch_shape + (C*L, H, W): channel c*L + k at pixel p holds
        Cov(x_p, x_{p+k}) (raster order, 0 past the image), L = b + 1 with b the stencil's largest
        flat offset dy*W + dx (:func:`structlik.ops.covariance_band`)."""
        self._uncoupled("covariance_band")
        ld, od = self._flat_params()
        with self._value_checks():
            out = ops.covariance_band(ld, od, self.stencil)
        if self.cov_factor is not None:
            W = low_rank.flat_factor(self)
            out = out + low_rank.band_correction(W, out.shape[1] // W.shape[2])
        return out.reshape(self.batch_shape + out.shape[1:])

    def _pixel(self, index):
        """(channel, pixel) of ``index``: a pixel (y, x) ((z, y, x) for volumes) with channel None,
        or (c, y, x) ((c, z, y, x)) naming one channel's pixel; checked against the event."""
        space = tuple(self.event_shape[1:])
        names = "(z, y, x)" if len(space) == 3 else "(y, x)"
        if (not isinstance(index, (tuple, list)) or len(index) not in (len(space), len(space) + 1)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in index)):
            raise TypeError(f"index: expected a pixel {names} of {len(space)} integers, or (c, {names[1:]} with a "
                            f"channel, got {index!r}")
        dims = space if len(index) == len(space) else tuple(self.event_shape)
        at = tuple(i + n if i < 0 else i for i, n in zip(index, dims))
        if not all(0 <= i < n for i, n in zip(at, dims)):
            what = (_checks.spatial(self.stencil).join("()") if len(index) == len(space)
                    else f"(C, {_checks.spatial(self.stencil)})")
            which = "pixel" if len(index) == len(space) else "channel and pixel"
            raise IndexError(f"index: {which} {tuple(index)} is outside the {what} = {dims} "
                             f"{'volume' if len(space) == 3 else 'image'}")
        return (None, at) if len(index) == len(space) else (at[0], at[1:])

    def covariance(self, index):
        """A column of Sigma as an image, batch_shape + (C, H, W), differentiable (two solves,
        M^-1 (M^-T e)):

        - ``index = (y, x)`` ((z, y, x) for volumes): Cov(x_{c,q}, x_{c,index}) for every pixel q
          of each channel c (channel c holds channel c's column at that pixel);
        - ``index = (c, y, x)``: the whole column Sigma e_{(c, index)}, Cov(x_{c',q}, x_{c,index})
          over every channel c' and pixel q: with cross weights (coupled channels) the other
          channels' entries are the cross-channel covariances; without them they are zero.

        With cross weights and a pixel alone, the C columns are solved as C right-hand sides."""
        channel, at = self._pixel(index)
        ld, od = self._flat_params()
        cross = self._flat_cross()
        N, C = ld.shape[:2]
        space = ld.shape[2:]
        pixel = torch.zeros(space, dtype=ld.dtype, device=ld.device)
        pixel[at] = 1
        # unit vectors built from the identity, not by index assignment, which vmap's batched tensors refuse
        if channel is not None:
            one = torch.zeros(C, dtype=ld.dtype, device=ld.device)
            one[channel] = 1
            e = (one.reshape(C, *(1,) * len(space)) * pixel).expand(N, C, *space).contiguous()
        elif cross is None:
            e = (ld.new_ones(C).reshape(C, *(1,) * len(space)) * pixel).expand(N, C, *space).contiguous()
        else:       # right-hand side c*N + b: the unit vector at (c, y, x) of image b
            eye = torch.eye(C, dtype=ld.dtype, device=ld.device).reshape(C, 1, C, *(1,) * len(space))
            e = (eye * pixel).expand(C, N, C, *space).reshape(C * N, C, *space)
        with self._value_checks():
            v = ops.image_op(ops.solve_upper_t_op, "solve_upper_t", e, ld, od, self.stencil, cross=cross,
                             params_repeat=True)
            out = ops.image_op(ops.solve_upper_op, "solve_upper", v, ld, od, self.stencil, cross=cross,
                               params_repeat=True)
        if cross is not None and channel is None:    # channel c of right-hand side c
            out = out.reshape(C, N, C, *ld.shape[2:]).diagonal(dim1=0, dim2=2).movedim(-1, 1)
        out = out.reshape(self.batch_shape + self.event_shape)
        return out if self.cov_factor is None else out + low_rank.covariance_correction(self, channel, at)

    def correlation(self, index):
        """Corr(x_q, x_index) for every pixel q: ``covariance(index)`` over sigma_q sigma_index,
        batch_shape + (C, H, W), 1 at ``index``; ``index = (c, y, x)`` correlates every channel
        with channel c's pixel (cross-channel correlations with cross weights)."""
        channel, at = self._pixel(index)
        std = self.stddev
        pick = (*(slice(i, i + 1) for i in at),)
        ref = std[(..., *pick)] if channel is None else std[(..., slice(channel, channel + 1), *pick)]
        return self.covariance(index) / (std * ref)

    def _noise(self, shape, dtype) -> torch.Tensor:
        """z ~ N(0, I) of ``shape`` on this distribution's device (the fast generator on CPU tensors)."""
        return standard_normal(shape, dtype, self.loc.device)

    def condition(self, value, mask, *, tol=None, max_iter=1000) -> ConditionalStructuredNormal:
        """This distribution given ``value`` where ``mask`` (bool, broadcastable to (*batch, C, H, W))
        is True: a :class:`structlik.ConditionalStructuredNormal` over whole images (inpainting,
        posterior samples), with the conditional ``mean``, exact ``rsample``/``sample`` (observed pixels
        equal to ``value``), ``log_prob`` of the missing pixels and ``observed_log_prob``, log p(x_O). With
        ``cov_factor`` the modes are conditioned too (exact: structlik/conditional.py's docstring)."""
        return ConditionalStructuredNormal(self, value, mask, tol=tol, max_iter=max_iter)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        z = standard_normal(shape, self.loc.dtype, self.loc.device)
        ld, od = self._flat_params()
        # One solve for every sample: the kernels read sample r*N + b's parameters at b,
        # so the parameters are never copied per sample.
        cross = self._flat_cross()
        with _checks.validation(False):
            eps = ops.image_op(ops.solve_upper_op, "solve_upper", z.reshape(-1, *self.event_shape), ld, od,
                               self.stencil, cross=cross, params_repeat=True)
        sample = self.loc + eps.reshape(shape)
        if self.cov_factor is not None:          # + W eps_1, eps_1 ~ N(0, I_R) per sample and image
            R = self.cov_factor.shape[-self._E - 1]
            modes = standard_normal(shape[:-self._E] + (R,), self.loc.dtype, self.loc.device)
            sample = sample + (modes.reshape(modes.shape + (1,) * self._E) * self.cov_factor).sum(-self._E - 1)
        with self._value_checks():
            self._check_sample(sample, eps, z, ld, od, cross)
        return sample

    def _check_sample(self, sample, eps, z, ld, od, cross=None):
        """NaN/inf in the sample, named; and the ill-conditioning warning. Bounded weights
        (sum|w| <= b d, b < 1) give max|eps| * min d <= max|z| / (1 - b) (Varah's bound on
        ||U^-1||_inf), so a sample past ``AMPLIFICATION`` times that (b = 0.9, with max|z| taken
        as sqrt(2 ln n) + 1, the size of n normal draws) is where the exact ratio is computed and
        named. The success path reads the sample and eps once and log_diag (three reductions and
        one host read) and never the S weight planes, which cost a quarter of the solve."""
        if not _checks.values_checked() or not _checks._readable(sample) or sample.numel() == 0:
            return
        # aminmax: 9 us at 65,536 values on a 2-core CPU, where vector_norm(inf) took 100 and abs().amax() 15
        e_min, e_max, ld_min, total = torch.stack([*torch.aminmax(eps.detach()), ld.detach().amin().to(eps.dtype),
                                                   sample.detach().sum().to(eps.dtype)]).tolist()
        e_max = max(e_max, -e_min)
        if not (math.isfinite(total) and math.isfinite(e_max)):
            # names a non-finite input, else the ratio that made U^-1 z overflow
            _checks.check_result(sample, {"loc": self.loc, **self._blame()}, op="rsample", inf_ok=False,
                                 overflow=lambda: ops.ill_conditioned(ld, od, self.stencil, cross=cross))
            return
        z_max = math.sqrt(2 * math.log(max(z.numel(), 2))) + 1
        if e_max * math.exp(min(ld_min, 700.0)) > AMPLIFICATION * z_max:
            ratio = largest_weight_ratio(ld.detach(), od.detach(), self.stencil.S,
                                         None if cross is None else cross.detach())
            if ratio >= 1:
                warn_ill_conditioned(f"rsample: samples up to {e_max:.3g} from the mean "
                                     f"({ILL_CONDITIONED.format(ratio=ratio)})")

    def _validate_sample(self, value):
        """Shape only: NaN/inf in ``value`` are found from the NLL the kernel computes."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"value: expected a torch.Tensor of shape (*sample, *batch, C, H, W), "
                            f"got {type(value).__name__}")
        event = tuple(self.event_shape)
        if value.dim() < self._E or tuple(value.shape[-self._E:]) != event:
            raise ValueError(f"value: expected shape (*sample, *batch, C, H, W) with (C, H, W) = {event}, "
                             f"got {tuple(value.shape)}")
        try:
            _checks.broadcast_shapes(value.shape, self.loc.shape)
        except RuntimeError:
            raise ValueError(f"value: shape {tuple(value.shape)} does not broadcast with the distribution's "
                             f"{tuple(self.loc.shape)}") from None

    def log_prob(self, value):
        return self._log_prob(value, "value")

    def _log_prob(self, value, name: str):
        """log_prob, with ``name`` for the data in the NaN/inf message (YCbCrStructuredNormal's
        luminance comes from the user's ``rgb``)."""
        self._validate_sample(value)
        _checks.check_float_tensor("value", value, "(*sample, *batch, C, H, W)", min_dim=self._E)
        if value.device != self.loc.device:
            raise ValueError(f"value: expected a tensor on {self.loc.device} (the distribution's device) of shape "
                             f"(*sample, *batch, C, H, W) = (*, {', '.join(map(str, self.event_shape))}), "
                             f"got one on {value.device}")
        if self.cov_factor is not None:
            return low_rank.log_prob(self, value)
        shape = _checks.broadcast_shapes(value.shape, self.loc.shape)
        lead = shape[:-self._E]
        raw = self._weight_bound is not None            # from_head's raw weights, bounded in the kernel
        weights = self._off_diag if raw else self.off_diag
        params = (value, self.loc, self.log_diag, weights, self.cross)
        if len(lead) == 1 and value.shape == self.loc.shape:
            # one batch dimension, the value's: the tensors as they are (expand and reshape cost
            # 2-3 us each, a tenth of a small image's log_prob)
            x, loc, ld, od, cross = params
        else:
            def flat(t, like):
                return None if t is None else t.expand(like + t.shape[-self._E:]).reshape(-1, *t.shape[-self._E:])
            x, loc = flat(value, lead), flat(self.loc, lead)
            ld, od, cross = (flat(t, lead) for t in params[2:])
        with self._value_checks():
            nll = ops.checked_nll(name, x, loc, ld, od, self.stencil, basis=self.basis, cross=cross,
                                  weight_bound=self._weight_bound if raw else None)
        return -nll.reshape(lead)

    def entropy(self):
        """(batch,) in the parameters' dtype, float32 for float16/bfloat16 (like log_prob)."""
        n = self.event_shape.numel()
        dtype = torch.float32 if self.log_diag.dtype in (torch.float16, torch.bfloat16) else self.log_diag.dtype
        out = 0.5 * n * (1.0 + math.log(2.0 * math.pi)) - self.log_diag.sum(tuple(range(-self._E, 0)), dtype=dtype)
        with self._value_checks():
            _checks.check_result(out, {"log_diag": self.log_diag}, op="entropy")
        return out if self.cov_factor is None else out + low_rank.entropy_correction(self).to(out.dtype)

    def precision_diagonal(self):
        """Diagonal of the precision ``U^T U`` (``M^T M`` with cross weights; with ``cov_factor``, of
        Sigma^-1 = (W W^T + Lambda^-1)^-1), shape batch_shape + (C, H, W)."""
        ld, od = self._flat_params()
        with self._value_checks():
            out = ops.precision_diagonal(ld, od, self.stencil, self._flat_cross(), blame=self._blame())
        out = out.reshape(self.batch_shape + self.event_shape)
        # Sigma^-1's diagonal: with low-rank modes, Lambda's less G K^-1 G^T's (Woodbury)
        return out if self.cov_factor is None else out - low_rank.precision_correction(self).to(out.dtype)
