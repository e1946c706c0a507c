"""What the C++ kernels check of a raw ``torch.ops.structlik`` call, for the kernels that read
memory without bounds of their own: the Triton launches (a GPU's illegal address, or the
interpreter's heap) and the reference. One function, driven by the ops' argument names, so every
op's launch is checked the same way and in the same words as csrc/stencil.h, csrc/cross.h and
csrc/nll.cpp (RuntimeError, as ``STD_TORCH_CHECK`` raises).

Rules by argument name, against log_diag (B, C, H, W) (the tall view of a volume) and the S
offsets (issue #39 item 1):

  offsets                  parsed as the C++ parse_offsets does; a volume's rows a multiple of its H
  log_diag                 4-D floating
  off_diag                 (B, C*S, H, W), or (B, C*n_b, H, W) with a basis (S, n_b)
  r, y, z, g (solves etc.) (k*B, C, H, W): the distribution's samples repeat the parameters
  x, loc, u                (B, C, H, W); u (a saved residual) empty when not stored, float32 for half inputs
  cross                    (B, C(C-1)/2, H, W)
  band, and grad beside it (B, C*L, H, W), L = covariance band length
  grad of an NLL           (B,)
  a, b (weight_grad)       b like a, 4-D floating; batch (the output's) a divisor of a's batch
  head                     (B, K, H, W) with c0 + C*(2+S) (+ C(C-1)/2) <= K

and every tensor on log_diag's device with its dtype. Only shapes, dtypes and devices are read:
no synchronisation, nothing of the values.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..stencil import Stencil

_REPEATED = ("r", "y", "z", "g")          # image operands whose batch may be a multiple of the parameters'
_IMAGES = ("x", "loc", "b")


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _fail(message: str):
    raise RuntimeError(message)


def _check_like(name: str, t, ref_name: str, ref: torch.Tensor, shape, layout: str, batch_multiple: bool = False,
                cast: bool = False):
    if not isinstance(t, torch.Tensor):
        _fail(f"{name}: expected a tensor of shape {layout}, got {type(t).__name__}")
    if t.device != ref.device:
        _fail(f"{name}: expected a tensor on {ref.device} ({ref_name}'s device), got one on {t.device}")
    if t.dim() != len(shape):
        _fail(f"{name}: expected shape {layout} = {tuple(shape)}, got {_shape(t)}")
    batch_ok = (t.shape[0] % shape[0] == 0) if batch_multiple and shape[0] > 0 else t.shape[0] == shape[0]
    if not batch_ok or tuple(t.shape[1:]) != tuple(shape[1:]):
        more = " (or a multiple of its B)" if batch_multiple else ""
        _fail(f"{name}: expected shape {layout} = {tuple(shape)}{more}, got {_shape(t)}")
    if t.dtype != ref.dtype and not (cast and t.dtype.is_floating_point):
        _fail(f"{name}: dtype {t.dtype} does not match {ref_name}'s {ref.dtype}")


def _offsets(flat) -> Stencil:
    try:
        return Stencil.from_flat_offsets(flat)
    except ValueError as err:
        _fail(str(err))


def _check_floating(name: str, t):
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.dtype.is_floating_point:
        got = _shape(t) + f" {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        _fail(f"{name}: expected a floating tensor of shape (B, C, H, W), got {got}")


def check_raw_call(op_name: str, args: dict) -> None:
    """Raise RuntimeError naming the first argument of ``op_name``'s call ``args`` (name -> value)
    whose shape, dtype or device the kernels could not read safely."""
    stencil = _offsets(args["offsets"]) if "offsets" in args else None
    S = stencil.S if stencil is not None else 0
    if "log_diag" in args:
        ref_name, ref = "log_diag", args["log_diag"]
        _check_floating("log_diag", ref)
    elif "head" in args:
        ref_name, ref = "x", args["x"]
        _check_floating("x", ref)
    else:
        ref_name, ref = "a", args["a"]
        _check_floating("a", ref)
    B, C, H, W = ref.shape
    if "batch" in args and not (args["batch"] > 0 and B % args["batch"] == 0 or B == args["batch"] == 0):
        _fail(f"batch: expected a divisor of a's batch {B}, got {args['batch']}")
    bound = args.get("bound", 0.0)
    if bound and not 0.0 < bound < 1.0:
        _fail(f"bound: expected 0 (weights as given) or a weight bound in (0, 1), got {bound}")
    if bound and (args.get("basis") is not None or _given(args.get("cross"), C)):
        _fail("bound: the weights are bounded inside the kernel only without a basis and without cross weights; "
              "bound them first (structlik.bound_coupled_weights) and pass bound=0")
    if stencil is not None and stencil.slice_height and H % stencil.slice_height:
        _fail(f"offsets: a volume's tall view has D*H rows, a multiple of its slice height H = "
              f"{stencil.slice_height}, got {H} rows")
    basis = args.get("basis")
    if basis is not None:
        if not isinstance(basis, torch.Tensor) or basis.dim() != 2 or basis.shape[0] != S:
            _fail(f"basis: expected shape (S, n_b) with S={S}, got "
                  f"{_shape(basis) if isinstance(basis, torch.Tensor) else type(basis).__name__}")
        _check_like("basis", basis, ref_name, ref, tuple(basis.shape), "(S, n_b)")
    per = basis.shape[1] if basis is not None else S
    L = None
    if "band" in args:      # L = b + 1, b the largest flat offset (ops._covariance_band.band_length)
        L = max(dy * W + dx for dy, dx in stencil.tall_offsets) + 1
    layouts = {
        "off_diag": ((B, C * per, H, W), "(B, C*n_b, H, W)" if basis is not None else "(B, C*S, H, W)"),
        "cross": ((B, C * (C - 1) // 2, H, W), "(B, C(C-1)/2, H, W)"),
        "band": ((B, C * (L or 0), H, W), f"(B, C*L, H, W) with L={L}"),
    }
    for name, value in args.items():
        if not isinstance(value, torch.Tensor) or name in (ref_name, "basis"):
            continue
        if name in layouts:      # the saved band is cast to the parameters' dtype, as grad is
            _check_like(name, value, ref_name, ref, *layouts[name], cast=name == "band")
        elif name in _REPEATED:
            _check_like(name, value, ref_name, ref, (B, C, H, W), "(B, C, H, W)", batch_multiple=True)
        elif name == "u":        # the forward's residual: empty when not stored, float32 for half inputs
            if value.numel():
                half = ref.dtype in (torch.float16, torch.bfloat16) and value.dtype == torch.float32
                _check_like(name, value, ref_name, ref, (B, C, H, W), "(B, C, H, W)", cast=half)
        elif name in _IMAGES:
            _check_like(name, value, ref_name, ref, (B, C, H, W), "(B, C, H, W)")
        elif name == "grad":
            if L is not None:
                _check_like("grad", value, ref_name, ref, *layouts["band"], cast=True)
            else:
                _check_grad_vector(value, ref, B)
        elif name == "head":
            used = C * (2 + S) + (C * (C - 1) // 2 if args.get("cross") else 0)
            c0 = args["c0"]
            if value.device != ref.device or value.dim() != 4 or value.shape[0] != B or tuple(value.shape[2:]) != (H, W) \
                    or c0 < 0 or c0 + used > value.shape[1]:
                _fail(f"head: expected shape (B, K, H, W) with (B, H, W) = {(B, H, W)} and K >= c0 + {used} = "
                      f"{c0 + used} on {ref.device}, got {_shape(value)} on {value.device}")
            if value.dtype != ref.dtype:
                _fail(f"x: dtype {ref.dtype} does not match head's {value.dtype}")


def _given(cross, C: int) -> bool:
    """Cross weights present: a tensor with entries, or a head op's ``cross=True`` for C > 1 channels."""
    return (cross is True and C > 1) or (isinstance(cross, torch.Tensor) and cross.numel() > 0)


def _check_grad_vector(value, ref, B):
    """An NLL's incoming gradient: (B,) on the images' device (any floating dtype: it is cast)."""
    if value.device != ref.device or value.dim() != 1 or value.shape[0] != B:
        _fail(f"grad: expected shape (B,) = ({B},) on {ref.device}, got {_shape(value)} on {value.device}")


def checked(op_name: str, schema: str, kernel: Callable) -> Callable:
    """``kernel`` (the op's Triton or reference implementation) behind :func:`check_raw_call`."""
    names = [p.split("=")[0].split()[-1] for p in schema.split("(", 1)[1].rsplit(") ->", 1)[0].split(", ")]
    signature = inspect.signature(kernel)

    def run(*args, **kwargs):
        bound = dict(zip(names, args))
        bound.update(kwargs)
        check_raw_call(op_name, bound)
        return kernel(*args, **kwargs)
    run.__name__ = getattr(kernel, "__name__", op_name)
    run.__signature__ = signature
    return run
