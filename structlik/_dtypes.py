"""The one dtype rule (docs/contract.md §5), for every layer that needs it.

Each op computes float32 and float64 in their own dtype and float16 and bfloat16 in
float32: the kernels' registers and buffers (Triton's ``ACC``, u, the partial sums) are
in ``compute_dtype``, the NLL is returned in it, and every other output and every gradient
has its input's dtype. The Triton kernels read half tensors themselves; the C++ kernels
(``csrc/torch_api.h``, ``computed``: the same rule, in C++) and the reference read a float32
copy. Nothing here imports anything of structlik, so every module can import it.
"""
from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 for the others (float16, bfloat16, float32)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast(*tensors):
    """Each tensor in its compute dtype: float16/bfloat16 as float32 copies, others as they are."""
    return tuple(t.float() if t.dtype in HALF else t for t in tensors)
