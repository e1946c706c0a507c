"""Input validation shared by every public entry point.

Shape, dtype and device checks are free (metadata only) and always run. Value
checks (NaN/inf) cost nothing on the success path: every op's output is
non-finite wherever an input it reads is, so :func:`check_result` reads only
the op's result (the NLL's B values, or one pass over a solve's output), and
scans the inputs only when that result is bad, to name the culprit. That is
one small device-to-host read per call on CUDA. The checks follow
``torch.distributions.Distribution``'s global switch (on by default, off with
``Distribution.set_default_validate_args(False)``), and are skipped while
``torch.compile`` traces and for meta, fake and ``torch.func``-transformed
tensors, whose values cannot be read.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from .stencil import Stencil

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def broadcast_shapes(*shapes) -> torch.Size:
    """torch.broadcast_shapes, with equal shapes (the common case) returned as they are:
    torch's costs about 37 us a call on a 2-core EPYC (its symbolic-shape guards), 3 calls being
    a third of from_head(...).log_prob's Python time at small sizes."""
    first = shapes[0]
    if all(s == first for s in shapes[1:]):
        return torch.Size(first)
    return torch.broadcast_shapes(*shapes)


def check_stencil(stencil) -> Stencil:
    if not isinstance(stencil, Stencil):
        raise TypeError(f"stencil: expected a structlik.Stencil, got {type(stencil).__name__}")
    return stencil


def spatial(stencil) -> str:
    """The spatial dimensions' names: "H, W" for images, "D, H, W" for volumes (Stencil(ndim=3))."""
    return "D, H, W" if getattr(stencil, "ndim", 2) == 3 else "H, W"


def layout(stencil, channels: str = "C", batch: str = "B") -> str:
    """The layout string of a tensor of ``channels`` channels per image: (B, C, H, W) or (B, C, D, H, W)."""
    return f"({batch}, {channels}, {spatial(stencil)})"


def _dims_words(stencil) -> str:
    return "C, D, H and W" if getattr(stencil, "ndim", 2) == 3 else "C, H and W"


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_float_tensor(name: str, t, layout: str, min_dim: int = 0) -> torch.Tensor:
    """``t`` is a floating-point tensor with ``len(layout)`` dimensions (at least ``min_dim``
    if that is given: leading batch dimensions)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64) "
            f"of shape {layout}, got dtype {t.dtype}"
        )
    ndim = layout.count(",") + 1
    if (t.dim() < min_dim) if min_dim else (t.dim() != ndim):
        hint = (f"; for one {'volume' if 'D, H, W' in layout else 'image'} add the batch dimension: "
                f"{name}.unsqueeze(0)"
                if layout.startswith("(B, ") and t.dim() == ndim - 1 else "")
        raise ValueError(f"{name}: expected shape {layout}, got {_shape(t)}{hint}")
    return t


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, shape, layout: str) -> None:
    """``t`` has ``shape`` and the device of ``ref`` (floating dtypes may differ: :func:`promote`)."""
    if tuple(t.shape) != tuple(shape):
        expected = "(" + ", ".join(str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {layout} = {expected}, got {_shape(t)}")
    if t.device != ref.device:
        raise ValueError(f"{name}: device {t.device} does not match {ref_name}'s device {ref.device}")


def promote(*tensors):
    """The tensors in their common floating dtype, ``torch.result_type``'s (as
    ``F.gaussian_nll_loss`` and ``Normal.log_prob`` promote: a bfloat16 head under autocast
    with a float32 target computes in float32). Integer tensors were refused before this."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def check_consistent(**tensors) -> None:
    """One device for all: the argument that differs from the others (the first listed, on a
    tie) is named. Floating dtypes may differ (:func:`promote`)."""
    devices = [t.device for t in tensors.values()]
    common = max(devices, key=devices.count)            # the first of the most frequent
    for name, t in tensors.items():
        if t.device != common:
            others = ", ".join(n for n, u in tensors.items() if u.device == common)
            raise ValueError(f"{name}: device {t.device} does not match the device {common} of {others}")


def param_layouts(stencil, log_diag, off_diag) -> tuple:
    """``check_against_image``'s description of U's parameters."""
    return (("log_diag", log_diag, 1, layout(stencil)),
            ("off_diag", off_diag, stencil.S, f"{layout(stencil, 'C*S')} with S={stencil.S}"))


def check_params(log_diag, off_diag, stencil, cross=None) -> tuple:
    """Validate the parameters of U (and the cross weights, if given) when no image goes with
    them; returns log_diag's shape, (B, C, H, W) or, for a volume's stencil, (B, C, D, H, W)."""
    check_stencil(stencil)
    check_float_tensor("log_diag", log_diag, layout(stencil))
    if min(log_diag.shape[1:]) == 0:
        raise ValueError(f"log_diag: expected {_dims_words(stencil)} of at least 1 in {layout(stencil)}, "
                         f"got {_shape(log_diag)}")
    check_float_tensor("off_diag", off_diag, layout(stencil, "C*S"))
    B, C, *rest = log_diag.shape
    check_same("off_diag", off_diag, "log_diag", log_diag, (B, C * stencil.S, *rest),
               f"{layout(stencil, 'C*S')} with S={stencil.S}")
    if cross is not None:
        check_cross(cross, "log_diag", log_diag)
    return tuple(log_diag.shape)


def check_against_image(image_name: str, image, stencil, params, params_repeat: bool = False) -> tuple:
    """Validate an image (the data x, a value, or an operand of U) and then each of
    ``params`` against it: the image is the reference for shape, dtype and device, so
    the message names the argument that disagrees with it. ``params`` holds
    (name, tensor, channels per image channel, layout) for log_diag, loc, off_diag or
    coeffs. With ``params_repeat`` the parameters' batch may divide the image's (many
    samples of one distribution). Returns the image's shape, (B, C, H, W) or, for a volume's
    stencil, (B, C, D, H, W)."""
    check_stencil(stencil)
    check_float_tensor(image_name, image, layout(stencil))
    B, C, *rest = image.shape
    if min(C, *rest) == 0:      # an empty batch is fine (B = 0: empty results, as torch's losses)
        raise ValueError(f"{image_name}: expected {_dims_words(stencil)} of at least 1 in {layout(stencil)}, "
                         f"got {_shape(image)}")
    for name, t, per_channel, t_layout in params:
        check_float_tensor(name, t, t_layout)
        batch = (t.shape[0] if params_repeat and t.dim() == image.dim() and t.shape[0] and B % t.shape[0] == 0
                 else B)
        check_same(name, t, image_name, image, (batch, C * per_channel, *rest), t_layout)
    return tuple(image.shape)


def cross_layout(C: int, ndim: int = 2) -> str:
    return f"(B, C(C-1)/2, {'D, H, W' if ndim == 3 else 'H, W'}) with C={C}"


def check_cross(cross, image_name: str, image, params_repeat: bool = False):
    """The cross weights of coupled channels (docs/contract.md §1), validated against the image
    (B, C, H, W) or volume (B, C, D, H, W): None, or a (B, C(C-1)/2, ...) tensor on its device. One
    channel has no pairs: a (B, 0, ...) tensor is accepted and stands for no coupling (None is returned)."""
    if cross is None:
        return None
    B, C, *rest = image.shape
    layout = cross_layout(C, len(rest))
    check_float_tensor("cross", cross, layout)
    batch = cross.shape[0] if params_repeat and cross.shape[0] and B % cross.shape[0] == 0 else B
    check_same("cross", cross, image_name, image, (batch, C * (C - 1) // 2, *rest), layout)
    return cross if C > 1 else None


def promote_optional(*tensors):
    """:func:`promote` of the tensors that are given; None stays None."""
    given = promote(*(t for t in tensors if t is not None))
    it = iter(given)
    return tuple(None if t is None else next(it) for t in tensors)


_override = threading.local()


@contextlib.contextmanager
def validation(on: bool):
    """Value checks on or off inside, whatever the global default: a distribution built
    with ``validate_args=True`` or ``False`` runs its ops in this."""
    previous = getattr(_override, "on", None)
    _override.on = on
    try:
        yield
    finally:
        _override.on = previous


_traced = {"warned": False}


def values_checked() -> bool:
    if torch.compiler.is_compiling():
        return False
    if torch.jit.is_tracing():
        # a trace records tensor ops, not the Python that reads a result: checks made while
        # tracing would be absent from the traced graph, so none are made (as under compile)
        if not _traced["warned"] and _validation_wanted():
            _traced["warned"] = True
            warnings.warn("structlik: torch.jit.trace records no value checks (NaN/inf): the traced module "
                          "runs without them; torch.export and torch.compile keep the op, and eager calls "
                          "check", torch.jit.TracerWarning, stacklevel=3)
        return False
    return _validation_wanted()


def _validation_wanted() -> bool:
    on = getattr(_override, "on", None)
    return bool(torch.distributions.Distribution._validate_args) if on is None else on


def _readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read: not meta, fake or wrapped by a torch.func transform."""
    return (t.device.type != "meta" and not is_fake(t)
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def check_result(out: torch.Tensor, inputs: dict, *, op: str, overflow: Optional[Callable[[], str]] = None,
                 inf_ok: bool = True) -> None:
    """Raise a ValueError if ``out`` (computed by ``op`` from ``inputs``, name -> tensor) is
    not finite: naming the first input with NaN/inf, else saying that finite inputs gave
    NaN (never the rounding of a true value) or, where ``inf_ok`` is False (the solves, whose
    infinite values come with NaN elsewhere), inf. ``overflow`` gives the reason then (the
    weight ratio of an ill-conditioned U); by default, that an intermediate overflowed.
    With ``inf_ok`` an infinite result of finite inputs is an overflow of a huge true value
    (an NLL of a residual of 1e30) and is returned as it is. The inputs are read only when
    ``out`` is not finite."""
    if not values_checked() or not _readable(out):
        return
    # One read of out and one host read: the sum is non-finite exactly when some value is (or when a
    # finite sum overflows, and then the inputs are scanned and nothing finite is blamed).
    if bool(torch.isfinite(out.detach().sum())):
        return
    for name, t in inputs.items():
        if _readable(t) and not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    nan = bool(torch.isnan(out.detach()).any())
    if nan or (not inf_ok and not bool(torch.isfinite(out.detach()).all())):
        names = ", ".join(inputs)
        why = overflow() if overflow is not None else (
            f"an intermediate value overflowed {out.dtype} (largest {torch.finfo(out.dtype).max:.3g})")
        raise ValueError(f"{op}: the result has {'NaN' if nan else 'infinite'} values although {names} "
                         f"{'are' if len(inputs) > 1 else 'is'} finite: {why}")


REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction
