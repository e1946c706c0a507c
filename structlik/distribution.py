"""``StructuredNormal``: the structured Gaussian as a torch.distributions.Distribution."""
from __future__ import annotations

import math

import torch
from torch._guards import detect_fake_mode
from torch.distributions import Distribution, constraints

from . import _checks, backends, ops
from .basis import check_basis, expand_basis
from .stencil import Stencil

__all__ = ["StructuredNormal", "standard_normal"]


def standard_normal(shape, dtype, device) -> torch.Tensor:
    """z ~ N(0, I) for ``rsample``. On CPU tensors the extension's vectorised generator
    (csrc/standard_normal.cpp: ATen's float64 ``normal_`` is scalar code, and cost more than
    the solve that uses z), seeded by one draw from torch's generator so ``torch.manual_seed``
    reproduces it; ``torch.randn`` elsewhere, while compiling, under fake tensors and inside torch.func
    transforms."""
    device = torch.device(device)
    if (device.type == "cpu" and dtype in (torch.float32, torch.float64) and backends.available("cpu")
            and not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is None
            and detect_fake_mode() is None):        # the seed is read from a tensor: not under fake tensors
        seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64))
        return ops.standard_normal_op(list(shape), seed, dtype)
    return torch.randn(shape, dtype=dtype, device=device)


class StructuredNormal(Distribution):
    r"""Gaussian over images with sparse upper-triangular precision factor U.

    ``x ~ N(loc, (U^T U)^{-1})`` with, per channel and in raster order,
    ``(U r)_p = exp(log_diag_p) r_p + sum_i off_diag_{p,i} r_{p+delta_i}``
    (docs/contract.md §1). Channels are independent; the event is one image.

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
        coef = "off_diag"
        for name, t, layout in (("loc", loc, "(*batch, C, H, W)"), ("log_diag", log_diag, "(*batch, C, H, W)"),
                                (coef, off_diag, "(*batch, C*S, H, W)" if basis is None else
                                 "(*batch, C*n_b, H, W)")):
            _checks.check_float_tensor(name, t, layout, min_dim=3)
        if basis is not None:
            check_basis(basis, stencil)
        per_channel = stencil.S if basis is None else basis.shape[1]
        what = "C*S" if basis is None else "C*n_b"
        event = tuple(loc.shape[-3:])
        C, H, W = event
        if tuple(log_diag.shape[-3:]) != event:
            raise ValueError(f"log_diag: expected shape (*batch, C, H, W) with (C, H, W) = {event}, "
                             f"got {tuple(log_diag.shape)}")
        if tuple(off_diag.shape[-3:]) != (C * per_channel, H, W):
            raise ValueError(f"{coef}: expected shape (*batch, {what}, H, W) = (*batch, {C * per_channel}, {H}, {W}) "
                             f"with {what[2:]}={per_channel}, got {tuple(off_diag.shape)}")
        try:
            batch = torch.broadcast_shapes(loc.shape[:-3], log_diag.shape[:-3], off_diag.shape[:-3])
        except RuntimeError:
            raise ValueError(f"loc, log_diag, {coef}: batch shapes {tuple(loc.shape[:-3])}, "
                             f"{tuple(log_diag.shape[:-3])}, {tuple(off_diag.shape[:-3])} do not broadcast") from None
        _checks.check_consistent(loc=loc, log_diag=log_diag, off_diag=off_diag,
                                 **({} if basis is None else {"basis": basis}))
        if min(event) == 0:
            raise ValueError(f"loc: expected a non-empty event (C, H, W), got {tuple(loc.shape)}")
        self.stencil = stencil
        self.basis = basis
        self.loc = loc.expand(batch + event)
        self.log_diag = log_diag.expand(batch + event)
        self.off_diag = off_diag.expand(batch + off_diag.shape[-3:])
        # Not Distribution's own parameter validation: it reads every parameter and syncs on
        # construction. The ops find NaN/inf from their results instead (structlik._checks).
        super().__init__(batch_shape=batch, event_shape=torch.Size(event), validate_args=False)
        self._validate_args = (torch.distributions.Distribution._validate_args if validate_args is None
                               else bool(validate_args))

    # -- helpers --------------------------------------------------------------

    def _value_checks(self):
        """This instance's validate_args decides, whatever the global default is now."""
        return _checks.validation(self._validate_args)

    def _blame(self):
        """The user's tensors to name when a result is not finite."""
        out = {"log_diag": self.log_diag, "off_diag": self.off_diag}
        if self.basis is not None:
            out["basis"] = self.basis
        return out

    def _flat_params(self, materialise: bool = True):
        """log_diag and off_diag flattened over the batch to (N, ...): views, also for
        broadcast batch dims (stride 0); with a basis, off_diag is formed from it
        unless ``materialise`` is False."""
        ld = self.log_diag.reshape(-1, *self.log_diag.shape[-3:])
        od = self.off_diag.reshape(-1, *self.off_diag.shape[-3:])
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
        z = standard_normal(shape, self.loc.dtype, self.loc.device)
        ld, od = self._flat_params()
        # One solve for every sample: the kernels read sample r*N + b's parameters at b,
        # so the parameters are never copied per sample.
        with _checks.validation(False):
            eps = ops.image_op(ops.solve_upper_op, "z", z.reshape(-1, *self.event_shape), ld, od, self.stencil,
                               params_repeat=True)
        sample = self.loc + eps.reshape(shape)
        with self._value_checks():
            _checks.check_result(sample, loc=self.loc, **self._blame())
        return sample

    def _validate_sample(self, value):
        """Shape only: NaN/inf in ``value`` are found from the NLL the kernel computes."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"value: expected a torch.Tensor of shape (*sample, *batch, C, H, W), "
                            f"got {type(value).__name__}")
        event = tuple(self.event_shape)
        if value.dim() < 3 or tuple(value.shape[-3:]) != event:
            raise ValueError(f"value: expected shape (*sample, *batch, C, H, W) with (C, H, W) = {event}, "
                             f"got {tuple(value.shape)}")
        try:
            torch.broadcast_shapes(value.shape, self.loc.shape)
        except RuntimeError:
            raise ValueError(f"value: shape {tuple(value.shape)} does not broadcast with the distribution's "
                             f"{tuple(self.loc.shape)}") from None

    def log_prob(self, value):
        self._validate_sample(value)
        if value.dtype != self.loc.dtype or value.device != self.loc.device:
            raise TypeError(f"value: expected a {self.loc.dtype} tensor on {self.loc.device} of shape "
                            f"(*sample, *batch, C, H, W) = (*, {', '.join(map(str, self.event_shape))})")
        shape = torch.broadcast_shapes(value.shape, self.loc.shape)
        lead = shape[:-3]
        ld = self.log_diag.expand(lead + self.event_shape).reshape(-1, *self.event_shape)
        od = self.off_diag.expand(lead + self.off_diag.shape[-3:]).reshape(-1, *self.off_diag.shape[-3:])
        x = value.expand(shape).reshape(-1, *self.event_shape)
        loc = self.loc.expand(shape).reshape(-1, *self.event_shape)
        with self._value_checks():
            nll = ops.checked_nll("value", x, loc, ld, od, self.stencil, basis=self.basis)
        return -nll.reshape(lead)

    def entropy(self):
        """(batch,) in the parameters' dtype, float32 for float16/bfloat16 (like log_prob)."""
        n = self.event_shape.numel()
        dtype = torch.float32 if self.log_diag.dtype in (torch.float16, torch.bfloat16) else self.log_diag.dtype
        out = 0.5 * n * (1.0 + math.log(2.0 * math.pi)) - self.log_diag.sum((-3, -2, -1), dtype=dtype)
        with self._value_checks():
            _checks.check_result(out, log_diag=self.log_diag)
        return out

    def precision_diagonal(self):
        """Diagonal of the precision ``U^T U``, shape batch_shape + (C, H, W)."""
        ld, od = self._flat_params()
        with self._value_checks():
            out = ops.precision_diagonal(ld, od, self.stencil, blame=self._blame())
        return out.reshape(self.batch_shape + self.event_shape)
