"""Which kernels serve which device, and forcing one backend (``STRUCTLIK_BACKEND``).

PyTorch's dispatcher chooses the kernel of every ``torch.ops.structlik`` op by the
tensors' device (structlik/ops/_library.py): the C++ kernels for CPU tensors when
the extension loaded, the Triton kernels for CUDA tensors when Triton is installed,
the reference (plain PyTorch) everywhere else. This module only reports that choice
and, for tests and debugging, overrides it:

``STRUCTLIK_BACKEND=reference|cpu|triton`` (read at every public call, so tests can
switch it) installs an override of the CPU and CUDA keys: ``reference`` puts the
reference kernels there, ``triton`` puts the Triton kernels on the CPU key too when
``TRITON_INTERPRET=1`` (how CI runs them without a GPU), and a backend forced on
tensors it does not run on raises a RuntimeError naming both.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Any, Dict, Optional

import torch

from . import reference
from .ops import _library

NAMES = ("reference", "cpu", "triton")
ENV_VAR = "STRUCTLIK_BACKEND"

_why_unavailable: Dict[str, Optional[str]] = {"reference": None}
_warned: set = set()
_installed: Dict[str, Any] = {"name": None, "library": None}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def devices(name: str) -> tuple:
    """The device types backend ``name`` runs on."""
    return {"reference": ("cpu", "cuda", "meta", "mps", "xpu"), "cpu": ("cpu",),
            # Triton's interpreter (TRITON_INTERPRET=1, how CI tests the kernels) runs them on CPU tensors.
            "triton": ("cuda", "cpu") if _interpreted() else ("cuda",)}[name]


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


def available(name: str) -> bool:
    return why_unavailable(name) is None


def forced() -> Optional[str]:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
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
                impl(op, _library.TRITON_KERNELS[op] if _interpreted() else _refuse(name, "cpu"), "CPU")
                impl(op, _library.TRITON_KERNELS[op], "CUDA")
    return library


def sync() -> Optional[str]:
    """Install the override ``STRUCTLIK_BACKEND`` asks for, if it is not the one installed; return
    the forced backend's name (None: the defaults)."""
    name = forced()
    if name == _installed["name"]:
        return name
    if name is not None and not available(name):
        raise RuntimeError(f"{ENV_VAR}={name} but that backend is unavailable ({why_unavailable(name)})")
    if _installed["library"] is not None:
        _installed["library"]._destroy()
        _installed.update(name=None, library=None)        # the defaults, until the new override is in
    _installed.update(library=_override(name), name=name)
    return name


def name_of(device: torch.device) -> str:
    """The backend whose kernels serve tensors on ``device`` now (installing the forced one first)."""
    device = torch.device(device)
    name = forced() if torch.compiler.is_compiling() else sync()
    if name is not None:
        if device.type not in devices(name):
            raise RuntimeError(f"{ENV_VAR}={name} does not run on {device.type} tensors")
        return name
    default = {"cpu": "cpu", "cuda": "triton"}.get(device.type)
    if default is None:
        return "reference"
    if (default == "cpu" and _library.CPU_UNAVAILABLE is None) or (default == "triton" and _library.TRITON_INSTALLED):
        return default
    if default not in _warned:
        _warned.add(default)
        why = _library.CPU_UNAVAILABLE if default == "cpu" else "triton is not installed"
        warnings.warn(f"structlik: the {default} kernels are unavailable ({why}); {device.type} tensors use the "
                      f"slower reference backend", RuntimeWarning, stacklevel=3)
    return "reference"


_using_lock = threading.Lock()
_using_owner = {"thread": None, "depth": 0}


@contextlib.contextmanager
def using(name: Optional[str]):
    """Force backend ``name`` (None: the defaults) inside the block, as ``STRUCTLIK_BACKEND`` does.

    Process-wide, not per thread: the choice is a registration in PyTorch's dispatcher, which
    every thread shares, so while the block runs every thread's calls go to ``name``. Blocks
    nest in one thread; a second thread entering while one is open raises a RuntimeError
    (interleaved, A enters, B enters, A exits, B exits, they left the process on B's backend)."""
    me = threading.get_ident()
    with _using_lock:
        if _using_owner["thread"] not in (None, me):
            raise RuntimeError("structlik.backends.using: another thread is inside a using() block; the backend "
                               "choice is process-wide (PyTorch's dispatcher), so blocks in two threads cannot "
                               "overlap")
        _using_owner.update(thread=me, depth=_using_owner["depth"] + 1)
    previous = os.environ.get(ENV_VAR)
    if name is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = name
    try:
        sync()
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous
        sync()
        with _using_lock:
            _using_owner["depth"] -= 1
            if _using_owner["depth"] == 0:
                _using_owner["thread"] = None


class Kernels:
    """The differentiable ops served by backend ``name``, without validation, with the interface
    of ``structlik.reference`` (a stencil, not flat offsets): for benchmarks that time the kernel
    alone. Each call checks that ``name`` serves its tensors' device."""

    def __init__(self, name: str):
        self.name = name

    def _ops(self, device):
        if name_of(device) != self.name:
            raise RuntimeError(f"structlik: the {self.name} backend does not serve {device} tensors now "
                               f"(the {name_of(device)} backend does)")
        from . import ops
        return ops

    def apply_upper(self, r, log_diag, off_diag, stencil):
        return self._ops(r.device).apply_upper_op(r, log_diag, off_diag, stencil.flat_offsets)

    def apply_upper_t(self, y, log_diag, off_diag, stencil):
        return self._ops(y.device).apply_upper_t_op(y, log_diag, off_diag, stencil.flat_offsets)

    def solve_upper(self, z, log_diag, off_diag, stencil):
        return self._ops(z.device).solve_upper_op(z, log_diag, off_diag, stencil.flat_offsets)

    def solve_upper_t(self, g, log_diag, off_diag, stencil):
        return self._ops(g.device).solve_upper_t_op(g, log_diag, off_diag, stencil.flat_offsets)

    def nll(self, x, loc, log_diag, off_diag, stencil):
        return self._ops(x.device).nll_op(x, loc, log_diag, off_diag, stencil.flat_offsets, self.name)

    def nll_basis(self, x, loc, log_diag, coeffs, basis, stencil):
        return self._ops(x.device).nll_basis_op(x, loc, log_diag, coeffs, basis, stencil.flat_offsets, self.name)

    def precision_diagonal(self, log_diag, off_diag, stencil):
        return self._ops(log_diag.device).precision_diagonal_op(log_diag, off_diag, stencil.flat_offsets)

    def __repr__(self):
        return f"Kernels({self.name!r})"


def get(name: str) -> Any:
    """Backend ``name``: the reference module, or the unvalidated ops it serves (``Kernels``); a
    RuntimeError saying why when it is unavailable. For benchmarks and tests that call one backend."""
    if name not in NAMES:
        raise ValueError(f"backend: expected one of {NAMES}, got {name!r}")
    if not available(name):
        raise RuntimeError(f"structlik: the {name} backend is unavailable ({why_unavailable(name)})")
    return reference if name == "reference" else Kernels(name)
