"""Which kernels serve which device, and forcing one backend (``STRUCTLIK_BACKEND``).

PyTorch's dispatcher chooses the kernel of every ``torch.ops.structlik`` op by the
tensors' device (structlik/ops/_library.py): the C++ kernels for CPU tensors when
the extension loaded, the Triton kernels for CUDA tensors when Triton is installed,
the reference (plain PyTorch) everywhere else. This module reports that choice
(``name_of``, ``available``) and installs overrides of it (``using``, or
``STRUCTLIK_BACKEND=reference|cpu|triton``, read once when structlik is imported; ``using``
changes the request for a block and never writes the environment: the override itself is
structlik/ops/_forced.py). Nothing here picks a kernel.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

from . import ops, reference
from .ops import _forced, _library
from .stencil import Stencil
from .ops._forced import ENV_VAR, NAMES, devices, forced, sync, why_unavailable      # noqa: F401


def available(name: str) -> bool:
    return why_unavailable(name) is None


def name_of(device: torch.device) -> str:
    """The backend whose kernels serve tensors on ``device`` now (the forced one installed first)."""
    return _forced.prepare(torch.device(device))


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
    previous = _forced._requested["name"]
    _forced.request(name)
    try:
        sync()
        yield
    finally:
        _forced.request(previous)
        sync()
        with _using_lock:
            _using_owner["depth"] -= 1
            if _using_owner["depth"] == 0:
                _using_owner["thread"] = None


class Kernels:
    """One backend's kernels without validation, with the interface of ``structlik.reference`` (a
    stencil, not flat offsets), differentiable: for benchmarks and tests that time or compare
    one backend alone. ``reference`` calls structlik.reference itself (any device); the others
    call the dispatcher's ops, after checking that ``name`` serves the tensors' device."""

    def __init__(self, name: str):
        self.name = name

    def _ops(self, device):
        serving = name_of(device)
        if serving != self.name:
            raise RuntimeError(f"structlik: the {self.name} backend does not serve {device} tensors now "
                               f"(the {serving} backend does)")
        return ops

    def _call(self, op: str, image, *args, stencil, cross=None):
        """The op on images, or on volumes as the ops see them (their tall view, ops._library.fold)."""
        fold = _library.fold
        offsets = _library.op_offsets(stencil, image)
        folded = [fold(t) for t in (image, *args)]
        if self.name == "reference":
            out = getattr(reference, op)(*folded, Stencil.from_flat_offsets(offsets), cross=fold(cross))
        else:
            out = getattr(self._ops(image.device), f"{op}_op")(*folded, offsets, fold(cross))
        return _library.unfold(out, image)

    def apply_upper(self, r, log_diag, off_diag, stencil, cross=None):
        return self._call("apply_upper", r, log_diag, off_diag, stencil=stencil, cross=cross)

    def apply_upper_t(self, y, log_diag, off_diag, stencil, cross=None):
        return self._call("apply_upper_t", y, log_diag, off_diag, stencil=stencil, cross=cross)

    def solve_upper(self, z, log_diag, off_diag, stencil, cross=None):
        return self._call("solve_upper", z, log_diag, off_diag, stencil=stencil, cross=cross)

    def solve_upper_t(self, g, log_diag, off_diag, stencil, cross=None):
        return self._call("solve_upper_t", g, log_diag, off_diag, stencil=stencil, cross=cross)

    def precision_diagonal(self, log_diag, off_diag, stencil, cross=None):
        return self._call("precision_diagonal", log_diag, off_diag, stencil=stencil, cross=cross)

    def nll(self, x, loc, log_diag, off_diag, stencil, cross=None):
        offsets = _library.op_offsets(stencil, x)
        x, loc, log_diag, off_diag, cross = (_library.fold(t) for t in (x, loc, log_diag, off_diag, cross))
        if self.name == "reference":
            return reference.nll(x, loc, log_diag, off_diag, Stencil.from_flat_offsets(offsets), cross)
        return self._ops(x.device).nll_op(x, loc, log_diag, off_diag, None, offsets, cross)

    def nll_basis(self, x, loc, log_diag, coeffs, basis, stencil):
        if self.name == "reference":
            return reference.nll_basis(x, loc, log_diag, coeffs, basis, stencil)
        return self._ops(x.device).nll_op(x, loc, log_diag, coeffs, basis, stencil.flat_offsets)

    def __repr__(self):
        return f"Kernels({self.name!r})"


def get(name: str) -> Kernels:
    """Backend ``name``'s kernels (``Kernels``); a RuntimeError saying why when it is unavailable."""
    if name not in NAMES:
        raise ValueError(f"backend: expected one of {NAMES}, got {name!r}")
    if not available(name):
        raise RuntimeError(f"structlik: the {name} backend is unavailable ({why_unavailable(name)})")
    return Kernels(name)
