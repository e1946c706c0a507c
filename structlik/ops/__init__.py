"""The ops of docs/contract.md §1 as ``torch.ops.structlik.*``, and their public, validated functions.

One module per op family, named after it with a leading underscore so that the module and
the public function of the same name do not shadow each other (``structlik.ops.nll`` is the
function, ``structlik.ops._nll`` its module): ``_apply_upper`` (apply_upper, apply_upper_t),
``_solve_upper``, ``_nll`` (nll, nll_basis), ``_precision_diagonal``, ``_weight_grad``,
``_standard_normal``, ``_to_dense_upper``, ``_covariance_band`` (covariance_band, variance).
Each holds the op's schema, reference, Triton and fake kernels, autograd formula and public
function; ``_library`` says how the dispatcher picks
the kernel (C++ for CPU tensors, Triton for CUDA, the reference elsewhere) and ``_forced`` how
``STRUCTLIK_BACKEND`` overrides it.

Shapes: images (``r``, ``y``, ``z``, ``g``, ``x``, ``loc``) and ``log_diag`` are
(B, C, H, W); ``off_diag`` is (B, C*S, H, W), channel c / offset i at c*S + i.
Each H x W plane must be contiguous; batch and channel strides are free, so
views of one decoder head (``head.split``) are read in place. Other layouts
are copied once. float32 and float64 compute in their own dtype; float16 and
bfloat16 in float32, cast back (the NLL stays float32; docs/contract.md §5).

Validation: the image operand (x, or r/y/z/g) is the reference for shapes,
dtype and device, so an error names the argument that disagrees with it.
NaN/inf are found from each op's result (see ``structlik._checks.check_result``).

"""
from __future__ import annotations

from . import _library
from ._forced import prepare                                         # noqa: F401
from .._dtypes import upcast                                             # noqa: F401

# The C++ kernels take the CPU key of the ops defined below (their schemas come first).
from ._weight_grad import weight_grad_op                                   # noqa: E402
from ._apply_upper import (apply_upper, apply_upper_t, apply_upper_op, apply_upper_t_op,  # noqa: E402
                           ill_conditioned, image_op)
from ._solve_upper import solve_upper, solve_upper_t, solve_upper_op, solve_upper_t_op  # noqa: E402
from ._precision_diagonal import precision_diagonal, precision_diagonal_op  # noqa: E402
from ._nll import checked_nll, head_of, nll, nll_basis, nll_head_op, nll_op  # noqa: E402
from ._standard_normal import standard_normal_op                            # noqa: E402
from ._covariance_band import covariance_band, covariance_band_op, variance  # noqa: E402
from ._to_dense_upper import to_dense_upper                                 # noqa: E402

_library.CPU_UNAVAILABLE = _library.load_cpu_kernels()

__all__ = [
    "apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t",
    "nll", "nll_basis", "precision_diagonal", "to_dense_upper", "variance", "covariance_band",
]
