"""``StructuredNormal``: the structured Gaussian as a torch.distributions.Distribution."""
from __future__ import annotations

import contextlib
import math

import torch
from torch.distributions import Distribution, constraints

from . import _checks, ops
from .basis import check_basis, expand_basis
from .stencil import Stencil

__all__ = ["StructuredNormal"]


class StructuredNormal(Distribution):
    r"""Gaussian over images with sparse upper-triangular precision factor U.

    ``x ~ N(loc, (U^T U)^{-1})`` with, per channel and in raster order,
    ``(U r)_p = exp(log_diag_p) r_p + sum_i off_diag_{p,i} r_{p+delta_i}``
    (SPEC section 1). Channels are independent; the event is one image.

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

    ``batch_shape`` is the broadcast of the three leading shapes and
    ``event_shape`` is (C, H, W): ``log_prob`` and ``entropy`` return
    ``batch_shape``, ``rsample(sample_shape)`` returns
    ``sample_shape + batch_shape + (C, H, W)``.
    """

    arg_constraints = {
        "loc": constraints.independent(constraints.real, 3),
        "log_diag": constraints.independent(constraints.real, 3),
        "off_diag": constraints.independent(constraints.real, 3),
    }
    support = constraints.independent(constraints.real, 3)
    has_rsample = True

    def __init__(self, loc, log_diag, off_diag, stencil: Stencil, validate_args=None, *, basis=None):
        _checks.check_stencil(stencil)
        if basis is not None:
            _checks.check_float_tensor("basis", basis, "(S, n_b)")
            if basis.shape[0] != stencil.S or basis.shape[1] == 0:
                raise ValueError(f"basis: expected shape (S, n_b) with S={stencil.S}, got {tuple(basis.shape)}")
        per_channel = stencil.S if basis is None else basis.shape[1]
        what = "C*S" if basis is None else "C*n_b"
        for name, t, layout in (("loc", loc, "(*batch, C, H, W)"), ("log_diag", log_diag, "(*batch, C, H, W)"),
                                ("off_diag", off_diag, "(*batch, C*S, H, W)")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(t).__name__}")
            if t.dim() < 3:
                raise ValueError(f"{name}: expected shape {layout}, got {tuple(t.shape)}")
        event = tuple(loc.shape[-3:])
        C, H, W = event
        if tuple(log_diag.shape[-3:]) != event:
            raise ValueError(f"log_diag: expected shape (*batch, C, H, W) with (C, H, W) = {event}, "
                             f"got {tuple(log_diag.shape)}")
        if tuple(off_diag.shape[-3:]) != (C * per_channel, H, W):
            raise ValueError(f"off_diag: expected shape (*batch, {what}, H, W) = (*batch, {C * per_channel}, {H}, {W}) "
                             f"with {what[2:]}={per_channel}, got {tuple(off_diag.shape)}")
        try:
            batch = torch.broadcast_shapes(loc.shape[:-3], log_diag.shape[:-3], off_diag.shape[:-3])
        except RuntimeError:
            raise ValueError(f"loc, log_diag, off_diag: batch shapes {tuple(loc.shape[:-3])}, "
                             f"{tuple(log_diag.shape[:-3])}, {tuple(off_diag.shape[:-3])} do not broadcast") from None
        def first(t):   # one image is enough to check dtype, device and emptiness
            return t.reshape(-1, *t.shape[-3:])[:1]

        if basis is None:
            _checks.check_params(first(log_diag), first(off_diag), stencil)
        else:
            check_basis(first(off_diag), basis, stencil, first(log_diag))
        _checks.check_image("loc", first(loc), first(log_diag))
        self.stencil = stencil
        self.basis = basis
        self.loc = loc.expand(batch + event)
        self.log_diag = log_diag.expand(batch + event)
        self.off_diag = off_diag.expand(batch + off_diag.shape[-3:])
        super().__init__(batch_shape=batch, event_shape=torch.Size(event), validate_args=validate_args)

    # -- helpers --------------------------------------------------------------

    def _value_checks(self):
        return contextlib.nullcontext() if self._validate_args else _checks.values_unchecked()

    def _flat_params(self, lead: torch.Size, materialise: bool = True):
        """log_diag and off_diag broadcast to ``lead`` and flattened to (N, ...); with a
        basis, off_diag is formed from it unless ``materialise`` is False."""
        ld = self.log_diag.expand(lead + self.log_diag.shape[-3:])
        od = self.off_diag.expand(lead + self.off_diag.shape[-3:])
        ld, od = ld.reshape(-1, *ld.shape[-3:]), od.reshape(-1, *od.shape[-3:])
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
        new.off_diag = self.off_diag.expand(batch_shape + self.off_diag.shape[-3:])
        super(StructuredNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self):
        return self.loc

    @property
    def mode(self):
        return self.loc

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        z = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        ld, od = self._flat_params(shape[:-3])
        with self._value_checks():
            eps = ops.solve_upper(z.reshape(-1, *self.event_shape), ld, od, self.stencil)
        return self.loc + eps.reshape(shape)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        if not isinstance(value, torch.Tensor) or value.dtype != self.loc.dtype or value.device != self.loc.device:
            raise TypeError(f"value: expected a {self.loc.dtype} tensor on {self.loc.device} of shape "
                            f"(*sample, *batch, C, H, W) = (*, {', '.join(map(str, self.event_shape))})")
        shape = torch.broadcast_shapes(value.shape, self.loc.shape)
        lead = shape[:-3]
        ld, od = self._flat_params(lead, materialise=False)
        x = value.expand(shape).reshape(-1, *self.event_shape)
        loc = self.loc.expand(shape).reshape(-1, *self.event_shape)
        with self._value_checks():
            if self.basis is None:
                nll = ops.nll(x, loc, ld, od, self.stencil)
            else:
                nll = ops.nll_basis(x, loc, ld, od, self.basis, self.stencil)
        return -nll.reshape(lead)

    def entropy(self):
        n = self.event_shape.numel()
        return 0.5 * n * (1.0 + math.log(2.0 * math.pi)) - self.log_diag.sum((-3, -2, -1))

    def precision_diagonal(self):
        """Diagonal of the precision ``U^T U``, shape batch_shape + (C, H, W)."""
        ld, od = self._flat_params(self.batch_shape)
        with self._value_checks():
            out = ops.precision_diagonal(ld, od, self.stencil)
        return out.reshape(self.batch_shape + self.event_shape)
