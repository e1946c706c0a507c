"""The op library ``torch.ops.structlik``: one namespace, and what each op family registers in it.

PyTorch's dispatcher picks the kernel by device (docs/contract.md §7):

- the schemas are defined here, in Python, so every op exists without the C++ build;
- the reference (``structlik.reference``, plain PyTorch) is each op's
  ``CompositeExplicitAutograd`` kernel: what every device without a kernel of its own
  runs (MPS, XPU, CUDA without Triton, a CPU without the extension);
- the C++ kernels (``csrc/<op>.cpp``, ``STABLE_TORCH_LIBRARY_IMPL(structlik, CPU, m)``)
  take the CPU key when ``structlik._C`` loads;
- the Triton kernels (``structlik/kernels/<op>.py``) take the CUDA key when Triton is
  installed; ``triton`` is imported at their first call, never by ``import structlik``;
- one fake kernel (torch.compile, meta tensors), one autograd formula and one vmap rule
  per op, registered by :func:`define`.

``structlik/ops/_forced.py`` overrides the CPU or CUDA key to force a backend
(``STRUCTLIK_BACKEND``, ``backends.using``: tests, debugging), which is also how CI runs
the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``. Nothing in Python picks a
kernel: every backend has every op, with the same arguments.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Dict, Optional

import torch

from .._dtypes import upcast
from ..stencil import Stencil
from . import _raw_checks, _vmap

NAMESPACE = "structlik"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")

# op name -> its kernels, for the backends' overrides
REFERENCE_KERNELS: Dict[str, Callable] = {}
TRITON_KERNELS: Dict[str, Callable] = {}
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

CPU_UNAVAILABLE: Optional[str] = "structlik.ops has not loaded the C++ kernels yet"   # set by structlik/ops

# op name -> what the library calls (the differentiable op): for an op whose formula uses an op
# defined after it (weight_grad's uses apply_upper's), looked up at backward time, not imported
OPS: Dict[str, Callable] = {}


def triton_kernels(family: str):
    """``structlik.kernels.<family>``, imported at the first call of a Triton kernel."""
    return importlib.import_module(f"structlik.kernels.{family}")


def load_cpu_kernels() -> Optional[str]:
    """Load the C++ library (its kernels take the CPU key); None, or why it did not load."""
    try:
        importlib.import_module("structlik._C")
    except (ImportError, OSError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _call(function, op):
    """The dispatcher's op with its registered formula, or ``function.apply`` inside a torch.func
    transform (which refuses the autograd.Function that ``register_autograd`` makes). Not the
    Function everywhere: its ``apply`` binds the arguments with ``inspect.signature`` on every call
    (about 10 us, a fifth of a small NLL's time on a CPU)."""
    def call(*args):
        if torch._C._functorch.peek_interpreter_stack() is not None and not torch.compiler.is_compiling():
            return function.apply(*args)
        return op(*args)
    call.__name__ = function.__name__
    return call


def _function(name, op, backward, setup, per_slice_vmap):
    """``op`` as an autograd.Function with the op's formula and vmap rule: torch 2.13's
    ``register_autograd`` makes an autograd.Function without setup_context, which torch.func's
    transforms refuse; this one has it."""
    arg_names = [a.name for a in op._schema.arguments]

    def forward(*args):
        return op(*args)

    def vmap(info, in_dims, *args):
        return _vmap.rule(function.apply, arg_names, per_slice_vmap)(info, in_dims, *args)

    def jvp(ctx, *tangents):
        raise NotImplementedError(f"structlik: {NAMESPACE}::{name} has no forward-mode derivative (torch.func.jvp, "
                                  f"torch.autograd.forward_ad); use reverse mode (torch.func.grad, vjp, jacrev)")

    function = type(f"{NAMESPACE}_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(backward), "vmap": staticmethod(vmap), "jvp": staticmethod(jvp)})
    return function


def define(schema: str, *, reference: Callable, fake: Callable, triton: Optional[Callable] = None,
           backward: Optional[Callable] = None, setup_context: Optional[Callable] = None,
           per_slice_vmap=False) -> Callable:
    """Define ``torch.ops.structlik.<name>`` from ``schema`` with its reference kernel (every device
    without a kernel of its own), fake kernel, optional Triton kernel (CUDA), autograd formula and
    vmap rule (``per_slice_vmap``: call the op once per vmapped slice, for outputs that are not per
    image; a function of the arguments by name when that depends on them). Returns what the
    library calls: the op differentiable by autograd, torch.func and
    torch.compile when it has a formula, else the op itself."""
    name = schema.split("(", 1)[0]
    qualname = f"{NAMESPACE}::{name}"
    # the kernels without bounds checks of their own get the C++ kernels' argument checks (issue #39)
    if "offsets" in schema:
        reference = _raw_checks.checked(name, schema, reference)
        triton = None if triton is None else _raw_checks.checked(name, schema, triton)
    LIBRARY.define(schema)
    LIBRARY.impl(name, reference, "CompositeExplicitAutograd")
    REFERENCE_KERNELS[name] = reference
    torch.library.register_fake(qualname, fake, lib=LIBRARY)
    if triton is not None:
        TRITON_KERNELS[name] = triton
        if TRITON_INSTALLED:
            LIBRARY.impl(name, triton, "CUDA")
    packet = getattr(torch.ops.structlik, name)
    op = packet.default
    torch.library.register_vmap(qualname, _vmap.rule(op, [a.name for a in op._schema.arguments], per_slice_vmap),
                                lib=LIBRARY)
    if backward is None:
        OPS[name] = packet
        return packet
    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=LIBRARY)
    OPS[name] = _call(_function(name, op, backward, setup_context, per_slice_vmap), packet)
    return OPS[name]


# --- kernels and setup_context helpers shared by the op families ----------------------------

# The image ops' schema: the cross weights (coupled channels, docs/contract.md §1) last, optional,
# so that a call without them reads as before.
IMAGE_SCHEMA = "(Tensor {image}, Tensor log_diag, Tensor off_diag, int[] offsets, Tensor? cross=None) -> Tensor"


def image_kernels(family: str, reference_function: Callable, transposed: bool) -> dict:
    """The reference and Triton kernels of an op of one image and M's parameters (M r, M^T y, M^-1 z,
    M^-T g): ``reference_function(image, log_diag, off_diag, stencil, cross)`` from structlik.reference,
    and ``structlik.kernels.<family>.launch(..., transposed, cross)``."""
    def reference(image, log_diag, off_diag, offsets, cross=None):
        args = upcast(image, log_diag, off_diag, *(() if cross is None else (cross,)))
        return reference_function(*args[:3], Stencil.from_flat_offsets(offsets),
                                  args[3] if cross is not None else None).to(image.dtype).contiguous()

    def triton(image, log_diag, off_diag, offsets, cross=None):
        return triton_kernels(family).launch(image, log_diag, off_diag, offsets, transposed, cross)
    return {"reference": reference, "triton": triton}


def fake_image(image, log_diag, off_diag, offsets, cross=None):
    """The fake kernel of those ops: an image like ``image``."""
    return image.new_empty(image.shape)


def save_image_inputs(ctx, inputs, output):
    """The image ops' tensors (the cross weights None when absent) and offsets; how many inputs
    the call had (its backward returns a gradient for each)."""
    cross = inputs[4] if len(inputs) > 4 else None
    ctx.save_for_backward(*inputs[:3], cross)
    ctx.offsets, ctx.inputs = inputs[3], len(inputs)



def offsets_count(offsets) -> int:
    """S, from the ops' offsets: pairs for images, [-H, triples...] for volumes (Stencil.from_flat_offsets)."""
    return (len(offsets) - 1) // 3 if len(offsets) and offsets[0] < 0 else len(offsets) // 2


# --- volumes (docs/contract.md §3): the ops see a volume (B, K, D, H, W) as its tall view ---------

def fold(t):
    """(B, K, D, H, W) -> (B, K, D*H, W), a view of the same memory (a copy only where a volume's
    (H, W) slices are not laid out one after another); images and None as they are."""
    return t.flatten(2, 3) if t is not None and t.dim() == 5 else t


def unfold(t, like):
    """An op's (B, K, D*H, W) output back to the volume ``like``'s (B, K, D, H, W). (reshape, not
    unflatten: under torch.set_default_device, Dynamo cannot trace Tensor.unflatten's Python.)"""
    return t.reshape(*t.shape[:2], *like.shape[2:4], t.shape[3]) if like.dim() == 5 else t


def op_offsets(stencil: Stencil, like) -> list:
    """The ops' offsets for ``like``, an image or a volume (its slice height H): Stencil.op_offsets."""
    return stencil.op_offsets(like.shape[-2])
