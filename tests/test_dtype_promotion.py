"""Floating inputs promote to torch.result_type's dtype (docs/contract.md §5), as
F.gaussian_nll_loss and Normal.log_prob do: autocast heads and mixed precision work."""
import pytest
import torch

import structlik
from structlik import StructuredNormal, ops, split_head

ST = structlik.Stencil(2)


def _denoiser_head(x, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 2 + ST.S, 3, padding=1))
    return net


def test_loss_under_cpu_autocast_bfloat16(backend):
    """The quick start under torch.autocast: the head is bfloat16, the target float32; the loss is
    float32 and within bfloat16's rounding of the float32 loss, and the gradient reaches the net."""
    x = torch.rand(4, 1, 12, 12)
    net = _denoiser_head(x)
    expected = structlik.structured_gaussian_nll(x, *split_head(net(x), ST), ST)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head = net(x)
        assert head.dtype == torch.bfloat16
        loss = structlik.structured_gaussian_nll(x, *split_head(head, ST), ST)
        log_prob = StructuredNormal.from_head(head, ST).log_prob(x)
    assert loss.dtype == torch.float32 and log_prob.dtype == torch.float32
    # bfloat16 keeps 8 bits: the head's values move by ~0.4%, the NLL of 144 pixels by about that
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2.0)
    torch.testing.assert_close(-log_prob.mean(), loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_float64_value_on_a_float32_distribution(backend):
    loc, log_diag = torch.randn(2, 1, 6, 5), 0.3 * torch.randn(2, 1, 6, 5)
    off_diag = 0.1 * torch.randn(2, ST.S, 6, 5)
    x = torch.randn(2, 1, 6, 5, dtype=torch.float64)
    dist = StructuredNormal(loc, log_diag, off_diag, ST)
    out = dist.log_prob(x)
    assert out.dtype == torch.float64         # torch.result_type(float64, float32), as Normal.log_prob
    exact = StructuredNormal(loc.double(), log_diag.double(), off_diag.double(), ST).log_prob(x)
    torch.testing.assert_close(out, exact)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16, torch.float32])
def test_mixed_dtypes_promote_in_every_op(low, backend):
    """Each op with one argument in a lower dtype equals the op on promoted inputs."""
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64)
    loc, log_diag = torch.randn_like(x), 0.3 * torch.randn_like(x)
    off_diag = 0.1 * torch.randn(2, ST.S, 5, 6, dtype=torch.float64)
    as_low = lambda t: t.to(low).to(torch.float64)     # noqa: E731  (the value the low tensor holds)
    out = ops.nll(x, loc, log_diag.to(low), off_diag, ST)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ops.nll(x, loc, as_low(log_diag), off_diag, ST))
    for op in (ops.apply_upper, ops.apply_upper_t, ops.solve_upper, ops.solve_upper_t):
        got = op(x, log_diag, off_diag.to(low), ST)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, op(x, log_diag, as_low(off_diag), ST))
    got = ops.precision_diagonal(log_diag.to(low), off_diag, ST)
    torch.testing.assert_close(got, ops.precision_diagonal(as_low(log_diag), off_diag, ST))


def test_gradients_come_back_in_each_inputs_dtype(backend):
    x = torch.randn(2, 1, 5, 6)
    loc = torch.randn(2, 1, 5, 6, dtype=torch.bfloat16, requires_grad=True)
    log_diag = torch.zeros(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    off_diag = torch.zeros(2, ST.S, 5, 6, requires_grad=True)
    structlik.structured_gaussian_nll(x, loc, log_diag, off_diag, ST).backward()
    assert (loc.grad.dtype, log_diag.grad.dtype, off_diag.grad.dtype) == (torch.bfloat16, torch.float64,
                                                                          torch.float32)


def test_integer_and_boolean_tensors_are_still_refused():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(TypeError, match=r"^loc: expected a floating-point"):
        structlik.structured_gaussian_nll(x, x.long(), x, torch.zeros(1, ST.S, 4, 4), ST)
    with pytest.raises(TypeError, match=r"^off_diag: expected a floating-point"):
        ops.solve_upper(x, x, torch.zeros(1, ST.S, 4, 4, dtype=torch.bool), ST)
