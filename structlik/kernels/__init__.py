"""Triton kernels, one file per op family (the names of csrc/ and structlik/ops).

Importing this package needs ``triton``; ``structlik/ops/_<op>.py`` imports its kernels
at their first call (on CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
never at ``import structlik``.
"""
