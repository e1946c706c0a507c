"""``structlik::standard_normal(size, seed, dtype)``: z ~ N(0, I) for sampling on CPU tensors.

Its only kernel is C++ (``csrc/standard_normal.cpp``, vectorised: ATen's float64
``normal_`` is scalar code and cost more than the solve that uses z), registered for
``CompositeExplicitAutograd`` because the op takes no tensor to dispatch on.
``structlik.distribution.standard_normal`` calls it when the C++ backend serves CPU tensors
(not when the reference is forced, nor without the extension) and ``torch.randn`` otherwise.
"""
from __future__ import annotations

import torch

from . import _library

_library.LIBRARY.define("standard_normal(int[] size, int seed, ScalarType dtype) -> Tensor")


@torch.library.register_fake(f"{_library.NAMESPACE}::standard_normal", lib=_library.LIBRARY)
def _fake(size, seed, dtype):
    # a CPU tensor, as the C++ kernel's (whatever torch.set_default_device says)
    return torch.empty(size, dtype=dtype, device="cpu")


standard_normal_op = torch.ops.structlik.standard_normal
