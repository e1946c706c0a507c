"""Triton kernels, one file per op (the names of csrc/ and structlik.ops).

Importing this package needs ``triton``; it is imported only by
``structlik.triton_backend``, never by ``import structlik``.
"""
