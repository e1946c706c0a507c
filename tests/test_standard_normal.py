"""rsample's z on CPU tensors: the extension's vectorised generator (csrc/standard_normal.cpp) draws
standard normals, reproducibly under torch.manual_seed."""
import math

import pytest
import torch

from structlik import backends
from structlik.distribution import standard_normal

pytestmark = pytest.mark.skipif(not backends.available("cpu"), reason="no compiled CPU extension")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_draws_are_standard_normal(dtype):
    torch.manual_seed(0)
    n = 1_000_001                                        # odd: the last pair's partner is dropped
    z = standard_normal((n,), dtype, "cpu").double()
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    # z-scores of the first four moments' estimates (each ~N(0, 1) for a correct generator)
    assert abs(z.mean()) / math.sqrt(1 / n) < 5
    assert abs(z.var() - 1) / math.sqrt(2 / n) < 5
    assert abs((z ** 3).mean()) / math.sqrt(15 / n) < 5
    assert abs((z ** 4).mean() - 3) / math.sqrt(96 / n) < 5
    # Kolmogorov-Smirnov against the normal CDF: 1.95 / sqrt(n) is the 0.1% critical value
    zs = z.sort().values
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    ranks = torch.arange(n + 1, dtype=torch.float64) / n
    assert torch.maximum(ranks[1:] - cdf, cdf - ranks[:-1]).max() < 1.95 / math.sqrt(n)
    # no correlation between neighbours (the pairs of one Box-Muller draw are n/2 apart) or halves
    for a, b in ((z[:-1], z[1:]), (z[: n // 2], z[n // 2 + 1:])):
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 5 / math.sqrt(a.numel())


def test_reproducible_under_manual_seed_and_shaped():
    torch.manual_seed(3)
    a = standard_normal((2, 3, 5, 7), torch.float64, "cpu")
    torch.manual_seed(3)
    b = standard_normal((2, 3, 5, 7), torch.float64, "cpu")
    assert a.shape == (2, 3, 5, 7) and torch.equal(a, b)
    assert not torch.equal(a, standard_normal((2, 3, 5, 7), torch.float64, "cpu"))
    assert standard_normal((1,), torch.float32, "cpu").dtype == torch.float32


def test_falls_back_to_torch_randn_elsewhere():
    torch.manual_seed(5)
    got = standard_normal((4, 4), torch.float16, "cpu")
    torch.manual_seed(5)
    torch.testing.assert_close(got, torch.randn(4, 4, dtype=torch.float16))
