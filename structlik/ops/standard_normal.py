"""``structlik::standard_normal(size, seed, dtype)``: z ~ N(0, I) for sampling on CPU tensors.

Its only kernel is C++ (``csrc/standard_normal.cpp``, vectorised: ATen's float64
``normal_`` is scalar code and cost more than the solve that uses z), registered for
``CompositeExplicitAutograd`` because the op takes no tensor to dispatch on.
``structlik.distribution.standard_normal`` calls it when the extension loaded and
``torch.randn`` otherwise.
"""
from __future__ import annotations

import torch

from . import _library

_library.LIBRARY.define("standard_normal(int[] size, int seed, ScalarType dtype) -> Tensor")


@torch.library.register_fake(f"{_library.NAMESPACE}::standard_normal", lib=_library.LIBRARY)
def _fake(size, seed, dtype):
    return torch.empty(size, dtype=dtype)


standard_normal_op = torch.ops.structlik.standard_normal
