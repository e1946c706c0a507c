"""The CPU backend: fused C++ kernels from csrc/, registered as torch.ops.structlik_cpu.*.

Importing this module loads the compiled extension (ImportError if it was not
built) and registers the fake kernels and autograd formulas of
``structlik._autograd``; ``backend`` has the interface of ``structlik.reference``.
"""
from . import _C  # noqa: F401  (loads the library: registers the ops' schemas and CPU kernels)
from . import _autograd

NAMESPACE = "structlik_cpu"
backend = _autograd.OpsBackend(NAMESPACE)
