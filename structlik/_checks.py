"""Input validation shared by every public entry point.

Shape, dtype and device checks are free (metadata only) and always run. Value
checks (finiteness) read the data, i.e. cost a device sync, so they follow
``torch.distributions.Distribution``'s global switch (on by default, off with
``Distribution.set_default_validate_args(False)``) and are skipped while
``torch.compile`` traces.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from .stencil import Stencil

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_stencil(stencil) -> Stencil:
    if not isinstance(stencil, Stencil):
        raise TypeError(f"stencil: expected a structlik.Stencil, got {type(stencil).__name__}")
    return stencil


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_float_tensor(name: str, t, layout: str) -> torch.Tensor:
    """``t`` is a floating-point tensor with ``len(layout)`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64) "
            f"of shape {layout}, got dtype {t.dtype}"
        )
    ndim = layout.count(",") + 1
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected shape {layout}, got {_shape(t)}")
    return t


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, shape, layout: str) -> None:
    """``t`` has ``shape`` and the dtype and device of ``ref``."""
    if tuple(t.shape) != tuple(shape):
        expected = "(" + ", ".join(str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {layout} = {expected}, got {_shape(t)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} does not match {ref_name}'s dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: device {t.device} does not match {ref_name}'s device {ref.device}")


def check_params(log_diag, off_diag, stencil) -> tuple:
    """Validate the parameters of U; returns (B, C, H, W)."""
    check_stencil(stencil)
    check_float_tensor("log_diag", log_diag, "(B, C, H, W)")
    check_float_tensor("off_diag", off_diag, "(B, C*S, H, W)")
    B, C, H, W = log_diag.shape
    check_same("off_diag", off_diag, "log_diag", log_diag, (B, C * stencil.S, H, W),
               f"(B, C*S, H, W) with S={stencil.S}")
    if min(B, C, H, W) == 0:
        raise ValueError(f"log_diag: expected non-empty (B, C, H, W), got {_shape(log_diag)}")
    return B, C, H, W


def check_image(name: str, t, log_diag) -> None:
    """An image-shaped operand of U: same shape, dtype and device as log_diag."""
    check_float_tensor(name, t, "(B, C, H, W)")
    check_same(name, t, "log_diag", log_diag, log_diag.shape, "(B, C, H, W)")


_skip = threading.local()


@contextlib.contextmanager
def values_unchecked():
    """Skip value checks inside (a distribution built with validate_args=False)."""
    previous = getattr(_skip, "on", False)
    _skip.on = True
    try:
        yield
    finally:
        _skip.on = previous


def values_checked() -> bool:
    if torch.compiler.is_compiling() or getattr(_skip, "on", False):
        return False
    return bool(torch.distributions.Distribution._validate_args)


def check_finite(**tensors) -> None:
    if not values_checked():
        return
    flags = [torch.isfinite(t.detach()).all() for t in tensors.values()]
    if bool(torch.stack(flags).all()):          # one host sync for all of them
        return
    for name, ok in zip(tensors, flags):
        if not bool(ok):
            raise ValueError(f"{name}: contains NaN or infinite values")


REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction
