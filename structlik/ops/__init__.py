"""The ops of docs/contract.md §1 as ``torch.ops.structlik.*``, and their public, validated functions.

One module per op family (``apply_upper``, ``solve_upper``, ``nll``, ``nll_basis``,
``precision_diagonal``, ``weight_grad``), each holding the op's schema, reference, Triton
and fake kernels, autograd formula and its public function; ``_library`` says how the
dispatcher picks the kernel (C++ for CPU tensors, Triton for CUDA, the reference elsewhere).

Shapes: images (``r``, ``y``, ``z``, ``g``, ``x``, ``loc``) and ``log_diag`` are
(B, C, H, W); ``off_diag`` is (B, C*S, H, W), channel c / offset i at c*S + i.
Each H x W plane must be contiguous; batch and channel strides are free, so
views of one decoder head (``head.split``) are read in place. Other layouts
are copied once. float32 and float64 compute in their own dtype; float16 and
bfloat16 in float32, cast back (the NLL stays float32; docs/contract.md §4).

Validation: the image operand (x, or r/y/z/g) is the reference for shapes,
dtype and device, so an error names the argument that disagrees with it.
NaN/inf are found from each op's result (see ``structlik._checks.check_result``).

Each public name here is the function; its module is ``importlib.import_module("structlik.ops.<name>")``.
"""
from __future__ import annotations

from . import _library
from ._library import upcast                                             # noqa: F401

# The C++ kernels take the CPU key of the ops defined below (their schemas come first).
from .weight_grad import weight_grad_op                                    # noqa: E402
from .apply_upper import (apply_upper, apply_upper_t, apply_upper_op, apply_upper_t_op,  # noqa: E402
                          ill_conditioned, image_op)
from .solve_upper import solve_upper, solve_upper_t, solve_upper_op, solve_upper_t_op  # noqa: E402
from .precision_diagonal import precision_diagonal, precision_diagonal_op  # noqa: E402
from .nll import checked_nll, head_of, nll, nll_op                          # noqa: E402
from .nll_basis import nll_basis, nll_basis_op                              # noqa: E402
from .standard_normal import standard_normal_op                             # noqa: E402
from .to_dense_upper import to_dense_upper                                  # noqa: E402

_library.CPU_UNAVAILABLE = _library.load_cpu_kernels()

__all__ = [
    "apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t",
    "nll", "nll_basis", "precision_diagonal", "to_dense_upper",
]

