"""The differentiable primitives of docs/contract.md §1, validated and dispatched.

Shapes: images (``r``, ``y``, ``z``, ``g``, ``x``, ``loc``) and ``log_diag`` are
(B, C, H, W); ``off_diag`` is (B, C*S, H, W), channel c / offset i at c*S + i.
Each H x W plane must be contiguous; batch and channel strides are free, so
views of one decoder head (``head.split``) are read in place. Other layouts
are copied once. float32 and float64 compute in their own dtype; float16 and
bfloat16 are computed in float32 and cast back (the NLL stays float32). The
Triton NLL kernels read float16/bfloat16 themselves; other backends and ops
get float32 copies.

Validation: the image operand (x, or r/y/z/g) is the reference for shapes,
dtype and device, so an error names the argument that disagrees with it.
NaN/inf are found from each op's result (see ``_checks.check_result``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from . import _checks
from . import reference
from .backends import backend_for
from .basis import check_basis
from .stencil import Stencil

__all__ = [
    "apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t",
    "nll", "nll_basis", "precision_diagonal", "to_dense_upper",
]

_HALF = (torch.float16, torch.bfloat16)


def _upcast(*tensors):
    if tensors[0].dtype in _HALF:
        return tuple(t.float() for t in tensors)
    return tensors


def _nll_args(backend, *tensors):
    """The NLL's inputs for that backend: float16/bfloat16 upcast unless its kernels read them."""
    return tensors if getattr(backend, "half_nll", False) else _upcast(*tensors)


def _params(stencil, log_diag, off_diag, off_name="off_diag"):
    return (("log_diag", log_diag, 1, "(B, C, H, W)"),
            (off_name, off_diag, stencil.S, f"(B, C*S, H, W) with S={stencil.S}"))


def image_op(name: str, image_name: str, image, log_diag, off_diag, stencil, *, params_repeat: bool = False,
             blame: Optional[Dict[str, torch.Tensor]] = None):
    """One of the four primitives. ``params_repeat``: log_diag and off_diag may hold fewer
    images than ``image`` (image b uses parameters b % their batch; the distribution's
    samples). ``blame``: the tensors to name when the result is not finite (default:
    the op's own arguments)."""
    _checks.check_stencil(stencil)
    _checks.check_against_image(image_name, image, stencil, _params(stencil, log_diag, off_diag), params_repeat)
    args = _upcast(image, log_diag, off_diag)
    out = getattr(backend_for(image.device), name)(*args, stencil).to(image.dtype)
    _checks.check_result(out, **(blame or {image_name: image, "log_diag": log_diag, "off_diag": off_diag}))
    return out


def apply_upper(r: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """``U r``: ``(U r)_p = exp(log_diag_p) r_p + sum_i off_diag_{p,i} r_{p+delta_i}``; (B, C, H, W)."""
    return image_op("apply_upper", "r", r, log_diag, off_diag, stencil)


def apply_upper_t(y: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """``U^T y``, the transposed stencil; (B, C, H, W)."""
    return image_op("apply_upper_t", "y", y, log_diag, off_diag, stencil)


def solve_upper(z: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """``U^-1 z`` (back-substitution in reverse raster order); (B, C, H, W).

    With ``z ~ N(0, I)``, ``loc + solve_upper(z, ...)`` is a sample of the
    structured Gaussian. Differentiable in all three tensors.
    """
    return image_op("solve_upper", "z", z, log_diag, off_diag, stencil)


def solve_upper_t(g: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """``U^-T g`` (forward substitution in raster order); (B, C, H, W)."""
    return image_op("solve_upper_t", "g", g, log_diag, off_diag, stencil)


def nll(x: torch.Tensor, loc: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor,
        stencil: Stencil) -> torch.Tensor:
    """Per-image negative log-likelihood, shape (B,):

    ``0.5 * ||U (x - loc)||^2 - sum(log_diag) + (C*H*W / 2) * log(2 pi)``.
    """
    return checked_nll("x", x, loc, log_diag, off_diag, stencil)


def head_of(loc, log_diag, off_diag):
    """(head, c0) when loc, log_diag and off_diag are channels [c0, c0 + C), [c0 + C, c0 + 2C)
    and [c0 + 2C, c0 + (2 + S)C) of one tensor that needs a gradient (what ``head.split``
    gives), else None. The NLL then takes the head itself, and its backward writes the
    head's gradient in one piece instead of three gradients that autograd's backward of
    the split copies into one (a pass over all of them: 1.6 ms of 4.1 at B64 64x64 radius 3
    on a 2-core CPU, benchmarks/RESULTS.md)."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(loc):
        return None         # plain views there: a transformed view's _base is not the transformed head
    head = loc._base
    if (head is None or log_diag._base is not head or off_diag._base is not head or head.dim() != 4
            or not head.requires_grad or not torch.is_grad_enabled()
            or head.dtype not in (torch.float32, torch.float64)):
        return None
    B, C, H, W = loc.shape
    if head.shape[0] != B or tuple(head.shape[2:]) != (H, W) or any(
            t.stride() != head.stride() for t in (loc, log_diag, off_diag)):
        return None
    step = head.stride(1)
    c0, rest = divmod(loc.storage_offset() - head.storage_offset(), step) if step > 0 else (0, 1)
    if (rest or log_diag.storage_offset() != loc.storage_offset() + C * step
            or off_diag.storage_offset() != loc.storage_offset() + 2 * C * step):
        return None
    return head, c0


def checked_nll(x_name: str, x, loc, log_diag, off_diag, stencil, *, basis=None):
    """The NLL (``basis``: with a learned basis, off_diag then being its coefficients),
    with the data tensor called ``x_name`` in errors (``value`` for log_prob)."""
    _checks.check_stencil(stencil)
    off_name = "off_diag" if basis is None else "coeffs"
    if basis is None:
        per_channel, layout = stencil.S, f"(B, C*S, H, W) with S={stencil.S}"
    else:
        _checks.check_float_tensor(x_name, x, "(B, C, H, W)")
        per_channel = check_basis(basis, stencil, x.dtype, x.device)
        layout = f"(B, C*n_b, H, W) with n_b={per_channel}"
    _checks.check_against_image(x_name, x, stencil, (("loc", loc, 1, "(B, C, H, W)"),
                                                     ("log_diag", log_diag, 1, "(B, C, H, W)"),
                                                     (off_name, off_diag, per_channel, layout)))
    backend = backend_for(x.device)
    inputs = {x_name: x, "loc": loc, "log_diag": log_diag, off_name: off_diag}
    head = head_of(loc, log_diag, off_diag) if basis is None else None
    if head is not None:
        out = backend.nll_head(x, *head, stencil)
    elif basis is None:
        out = backend.nll(*_nll_args(backend, x, loc, log_diag, off_diag), stencil)
    else:
        out = backend.nll_basis(*_nll_args(backend, x, loc, log_diag, off_diag, basis), stencil)
        inputs["basis"] = basis
    _checks.check_result(out, **inputs)
    return out


def nll_basis(x: torch.Tensor, loc: torch.Tensor, log_diag: torch.Tensor, coeffs: torch.Tensor, basis: torch.Tensor,
              stencil: Stencil) -> torch.Tensor:
    """Per-image NLL, (B,), with ``off_diag = expand_basis(coeffs, basis)`` formed inside the kernel.

    coeffs: (B, C*n_b, H, W); basis: (S, n_b), shared by all images and channels.
    Differentiable in every tensor, the basis included (its gradient is a
    reduction over all pixels). Equivalent to ``nll(x, loc, log_diag,
    expand_basis(coeffs, basis), stencil)`` without the (B, C*S, H, W) tensor.
    """
    return checked_nll("x", x, loc, log_diag, coeffs, stencil, basis=basis)


def precision_diagonal(log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil, *,
                       blame: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Diagonal of ``Lambda = U^T U``: ``exp(2 log_diag_p) + sum_i off_diag_{p-delta_i,i}^2``; (B, C, H, W)."""
    _checks.check_params(log_diag, off_diag, stencil)
    args = _upcast(log_diag, off_diag)
    out = backend_for(log_diag.device).precision_diagonal(*args, stencil).to(log_diag.dtype)
    _checks.check_result(out, **(blame or {"log_diag": log_diag, "off_diag": off_diag}))
    return out


def to_dense_upper(log_diag: torch.Tensor, off_diag: torch.Tensor, stencil: Stencil) -> torch.Tensor:
    """Dense U, (B, C, n, n) with n = H*W in raster order; differentiable.

    O(n^2) memory: for small images, tests and teaching.
    """
    _checks.check_params(log_diag, off_diag, stencil)
    return reference.to_dense_upper(log_diag, off_diag, stencil)
