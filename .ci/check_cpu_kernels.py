"""Check that CPU tensors are served by structlik's compiled C++ kernels, with the reference's numbers.

    python .ci/check_cpu_kernels.py [--installed]

Run by .ci/wheel_smoke on the installed wheel (``--installed``: it must be
imported from site-packages, not a checkout), and by hand with other torch
versions to check that one build loads on each (the stable ABI): NLL and its
gradient through a split head, log_prob, rsample and solve_upper, float64.
"""
import os
import sys

import torch

import structlik
from structlik import backends

if "--installed" in sys.argv:
    assert "site-packages" in structlik.__file__, f"structlik imported from {structlik.__file__}, not the wheel"
assert backends.name_of(torch.device("cpu")) == "cpu", f"the C++ kernels did not load: {backends.why_unavailable('cpu')}"
# the dispatcher has them for the CPU key of every op of the contract (not the reference's default kernel)
missing = [op for op in ("apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t", "weight_grad",
                         "precision_diagonal", "nll", "nll_backward", "nll_head", "nll_head_backward",
                         "covariance_band", "covariance_band_backward")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"structlik::{op}", "CPU")]
assert not missing, f"no C++ kernel for the CPU key of {missing}"
stencil = structlik.Stencil(2)
torch.manual_seed(0)
head = torch.randn(4, 2 + stencil.S, 16, 16, dtype=torch.float64)
x = torch.rand(4, 1, 16, 16, dtype=torch.float64)


def results():
    h = head.clone().requires_grad_()
    loss = structlik.structured_gaussian_nll(x, *h.split([1, 1, stencil.S], dim=1), stencil)
    loss.backward()
    dist = structlik.StructuredNormal(head[:, :1], head[:, 1:2], head[:, 2:], stencil)
    z = torch.randn(2, 4, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return (loss.detach(), h.grad, dist.log_prob(x), structlik.ops.solve_upper(x, head[:, 1:2], head[:, 2:], stencil),
            dist.rsample((2,)).shape, dist.loc + structlik.ops.solve_upper(z[0], head[:, 1:2], head[:, 2:], stencil))


fast = results()
os.environ[backends.ENV_VAR] = "reference"
slow = results()
for a, b in zip(fast, slow):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b)
    else:
        assert a == b, (a, b)
print(f"structlik {structlik.__version__} on torch {torch.__version__}: CPU tensors served by the C++ kernels "
      f"({os.path.basename(structlik._C.__file__)}), equal to the reference")
