"""A forced backend (``STRUCTLIK_BACKEND=reference|cpu|triton``): an override of the
dispatcher's CPU and CUDA keys, installed here. The environment is read once, at import;
``backends.using`` changes the request for a block (no environment writes).

PyTorch's dispatcher chooses each op's kernel by device (structlik/ops/_library.py); this
module only replaces that choice when asked: ``reference`` puts the reference kernels on
both keys, ``triton`` puts the Triton kernels on the CPU key too under
``TRITON_INTERPRET=1`` (how CI runs them without a GPU), ``cpu`` refuses CUDA tensors.
A backend forced on tensors it does not run on raises a RuntimeError naming both.
``structlik.backends`` reports what serves a device and offers ``using``; the ops call
``prepare`` only, so that nothing in ``structlik.ops`` imports ``structlik.backends``.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Dict, Optional

import torch

from . import _library

NAMES = ("reference", "cpu", "triton")
ENV_VAR = "STRUCTLIK_BACKEND"

_why_unavailable: Dict[str, Optional[str]] = {"reference": None}
# the backend asked for: STRUCTLIK_BACKEND as the process started (validated at the first call, so
# that a bad value names itself there rather than failing the import); backends.using sets it
_requested: Dict[str, Optional[str]] = {"name": os.environ.get(ENV_VAR, "").strip().lower() or None}
_installed: Dict[str, Any] = {"name": None, "library": None}


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def devices(name: str) -> tuple:
    """The device types backend ``name`` runs on."""
    return {"reference": ("cpu", "cuda", "meta", "mps", "xpu"), "cpu": ("cpu",),
            # Triton's interpreter (TRITON_INTERPRET=1, how CI tests the kernels) runs them on CPU tensors.
            "triton": ("cuda", "cpu") if interpreted() else ("cuda",)}[name]


def why_unavailable(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run here (None when it can)."""
    if name not in _why_unavailable:
        if name == "cpu":
            _why_unavailable[name] = _library.CPU_UNAVAILABLE
        elif name == "triton":
            try:
                importlib.import_module("structlik.kernels.common")
                _why_unavailable[name] = None
            except (ImportError, RuntimeError, OSError) as err:
                _why_unavailable[name] = f"{type(err).__name__}: {err}"
        else:
            _why_unavailable[name] = "not built into this version of structlik"
    return _why_unavailable[name]


def request(name: Optional[str]) -> None:
    """Ask for backend ``name`` (None: the dispatcher's defaults) from the next ``sync`` on."""
    _requested["name"] = name.strip().lower() or None if isinstance(name, str) else name


def forced() -> Optional[str]:
    """The backend asked for (``STRUCTLIK_BACKEND`` at import, or ``backends.using``'s; None: the
    dispatcher's defaults)."""
    name = _requested["name"]
    if name is None:
        return None
    if name not in NAMES:
        raise ValueError(f"{ENV_VAR}: expected one of {NAMES}, got {name!r}")
    return name


def _refuse(name: str, device: str):
    def kernel(*args, **kwargs):
        raise RuntimeError(f"{ENV_VAR}={name} does not run on {device} tensors")
    return kernel


def _override(name: Optional[str]) -> Optional[torch.library.Library]:
    """A library of kernels that make ``name`` serve every device it runs on (None: the defaults)."""
    if name is None or (name == "cpu" and not torch.cuda.is_available()):
        return None
    library = torch.library.Library(_library.NAMESPACE, "IMPL")

    def impl(op, kernel, key):        # overriding is the point (torch 2.10 refuses it by default)
        library.impl(op, kernel, key, allow_override=True)
    with warnings.catch_warnings():   # "Overriding a previously registered kernel"
        warnings.simplefilter("ignore")
        for op, kernel in _library.REFERENCE_KERNELS.items():
            if name == "reference":
                impl(op, kernel, "CPU")
                impl(op, kernel, "CUDA")
            elif name == "cpu":
                impl(op, _refuse(name, "cuda"), "CUDA")
            else:
                impl(op, _library.TRITON_KERNELS[op] if interpreted() else _refuse(name, "cpu"), "CPU")
                impl(op, _library.TRITON_KERNELS[op], "CUDA")
    return library


def sync() -> Optional[str]:
    """Install the override ``STRUCTLIK_BACKEND`` asks for, if it is not the one installed; return
    the forced backend's name (None: the defaults). While compiling, only read (a graph installs nothing)."""
    name = forced()
    if torch.compiler.is_compiling() or name == _installed["name"]:
        return name
    if name is not None and why_unavailable(name) is not None:
        raise RuntimeError(f"{ENV_VAR}={name} but that backend is unavailable ({why_unavailable(name)})")
    if _installed["library"] is not None:
        _installed["library"]._destroy()
        _installed.update(name=None, library=None)        # the defaults, until the new override is in
    _installed.update(library=_override(name), name=name)
    return name


_warned: set = set()


def default(device_type: str) -> str:
    """The backend the dispatcher's defaults give ``device_type`` tensors; the first time that is the
    reference because the device's own kernels are unavailable, a warning saying why."""
    own = {"cpu": "cpu", "cuda": "triton"}.get(device_type)
    if own is None:
        return "reference"
    why = _library.CPU_UNAVAILABLE if own == "cpu" else (None if _library.TRITON_INSTALLED else
                                                         "triton is not installed")
    if why is None:
        return own
    if own not in _warned:
        _warned.add(own)
        warnings.warn(f"structlik: the {own} kernels are unavailable ({why}); {device_type} tensors use the "
                      f"slower reference backend", RuntimeWarning, stacklevel=4)
    return "reference"


def prepare(device: torch.device) -> str:
    """What every public op calls first: the forced backend installed (a RuntimeError when it does
    not run on ``device``: the dispatcher's override covers CPU and CUDA only), or the warning that
    the device's kernels are unavailable. Returns the backend that serves ``device``, for reports:
    nothing in structlik chooses a kernel by it."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    name = sync()
    if name is None:
        return default(device_type)
    if device_type not in devices(name):
        raise RuntimeError(f"{ENV_VAR}={name} does not run on {device_type} tensors")
    return name
