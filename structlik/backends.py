"""The one place that decides which implementation runs each op.

Every backend is an object (the reference module, or an ``_autograd.OpsBackend``)
exposing the same functions as ``structlik.reference``
(``apply_upper``, ``apply_upper_t``, ``solve_upper``, ``solve_upper_t``, ``nll``,
``precision_diagonal``), each differentiable in its tensor arguments. Callers
go through :func:`backend_for` and never name a backend themselves, so adding
a kernel never touches them.

``STRUCTLIK_BACKEND=reference|cpu|triton`` forces a backend (read at every call,
so tests can switch it); otherwise CPU tensors get the compiled C++ kernels
when the extension loaded, CUDA tensors the Triton kernels when Triton is
importable, and everything else the reference.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Callable, Dict, Optional

import torch

from . import _autograd, reference

# The reference's two solves are torch.library ops: their fake kernels, formulas and vmap rules.
reference.SOLVES.update(vars(_autograd._Ops(_autograd.register("structlik_reference"))))

NAMES = ("reference", "cpu", "triton")
ENV_VAR = "STRUCTLIK_BACKEND"

# name -> loader returning the backend module, or raising ImportError/RuntimeError
# with the reason it is unavailable. Later backends register themselves here.
_LOADERS: Dict[str, Callable[[], Any]] = {
    "reference": lambda: reference,
    "cpu": lambda: importlib.import_module("structlik.cpu").backend,
    "triton": lambda: importlib.import_module("structlik.triton_backend").backend,
}
# name -> the devices it runs on
_DEVICES: Dict[str, tuple] = {
    "reference": ("cpu", "cuda", "meta", "mps", "xpu"),
    "cpu": ("cpu",),
    # Triton's interpreter (TRITON_INTERPRET=1, how CI tests the kernels) runs them on CPU tensors.
    "triton": ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
}
_warned: set = set()
_loaded: Dict[str, Optional[Any]] = {}
_why_unavailable: Dict[str, str] = {}


def register(name: str, loader: Callable[[], Any], devices: tuple) -> None:
    _LOADERS[name] = loader
    _DEVICES[name] = devices
    _loaded.pop(name, None)


def _load(name: str) -> Optional[Any]:
    if name not in _loaded:
        loader = _LOADERS.get(name)
        if loader is None:
            _loaded[name] = None
            _why_unavailable[name] = "not built into this version of structlik"
        else:
            try:
                _loaded[name] = loader()
            except (ImportError, RuntimeError, OSError) as err:
                _loaded[name] = None
                _why_unavailable[name] = f"{type(err).__name__}: {err}"
    return _loaded[name]


def preload() -> None:
    """Load, at ``import structlik``, every backend this process may dispatch to: the CPU
    kernels always, the Triton kernels when CUDA or Triton's interpreter is there, and the
    one STRUCTLIK_BACKEND forces. Loading imports modules, which torch.compile cannot
    trace: without this the first call of a process could not be inside a compiled
    function. ``triton`` itself is imported only where it can run."""
    names = ["cpu"]
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if name in NAMES:
        names.append(name)
    for n in names:
        _load(n)


def available(name: str) -> bool:
    return _load(name) is not None


def why_unavailable(name: str) -> Optional[str]:
    """Why backend ``name`` did not load (None when it did)."""
    return None if available(name) else _why_unavailable[name]


def get(name: str) -> Any:
    """Backend ``name`` itself (the object ``backend_for`` returns), or a RuntimeError saying
    why it is unavailable. For benchmarks and tests that call one backend directly."""
    module = _load(name)
    if module is None:
        raise RuntimeError(f"structlik: the {name} backend is unavailable ({why_unavailable(name)})")
    return module


def forced() -> Optional[str]:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in NAMES:
        raise ValueError(f"{ENV_VAR}: expected one of {NAMES}, got {name!r}")
    return name


def backend_for(device: torch.device) -> Any:
    """The backend module to use for tensors on ``device``."""
    name = forced()
    if name is not None:
        module = _load(name)
        if module is None:
            raise RuntimeError(f"{ENV_VAR}={name} but that backend is unavailable ({_why_unavailable[name]})")
        if device.type not in _DEVICES[name]:
            raise RuntimeError(f"{ENV_VAR}={name} does not run on {device.type} tensors")
        return module
    preferred = {"cpu": "cpu", "cuda": "triton"}.get(device.type)
    if preferred is not None:
        module = _load(preferred)
        if module is not None:
            return module
        if preferred not in _warned:
            _warned.add(preferred)
            warnings.warn(f"structlik: the {preferred} kernels are unavailable ({_why_unavailable[preferred]}); "
                          f"{device.type} tensors use the slower reference backend", RuntimeWarning, stacklevel=3)
    return reference


def name_of(device: torch.device) -> str:
    """Which backend :func:`backend_for` picks, by name (for benchmarks and logs)."""
    module = backend_for(device)
    return next(n for n, m in _loaded.items() if m is module) if module is not reference else "reference"
