"""A decoder head to a distribution: bound_weights, split_head, from_head, and the sampling
warning where U is far from diagonally dominant (docs/contract.md §6)."""
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import structlik
from structlik import StructuredNormal, YCbCrStructuredNormal, bound_weights, ops, split_head
from structlik.head import largest_weight_ratio

ST = structlik.Stencil(2)


@given(C=st.integers(1, 3), scale=st.floats(0.01, 100.0), bound=st.floats(0.05, 0.99))
def test_bounded_rows_are_diagonally_dominant(C, scale, bound):
    log_diag = torch.randn(2, C, 5, 6, dtype=torch.float64)
    raw = scale * torch.randn(2, C * ST.S, 5, 6, dtype=torch.float64)
    w = bound_weights(log_diag, raw, bound)
    row_sums = w.unflatten(1, (C, ST.S)).abs().sum(2)
    assert (row_sums < bound * log_diag.exp()).all()
    assert largest_weight_ratio(log_diag, w, ST.S) < bound


def test_bounded_solve_obeys_varah():
    """||U^-1||_inf <= 1 / ((1 - b) min d): the dense inverse of a bounded U, rows of every sign."""
    log_diag = 0.5 * torch.randn(1, 1, 7, 6, dtype=torch.float64)
    w = bound_weights(log_diag, 50 * torch.randn(1, ST.S, 7, 6, dtype=torch.float64), 0.9)
    U = structlik.ops.to_dense_upper(log_diag, w, ST)[0, 0]
    norm = torch.linalg.inv(U).abs().sum(1).max()
    assert norm <= 1 / (0.1 * log_diag.exp().min()) + 1e-9


def test_zero_raw_weights_start_at_the_diagonal_gaussian():
    log_diag = torch.randn(2, 2, 4, 4)
    assert torch.equal(bound_weights(log_diag, torch.zeros(2, 2 * ST.S, 4, 4)), torch.zeros(2, 2 * ST.S, 4, 4))


def test_bound_weights_gradcheck():
    log_diag = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(1, 2 * ST.S, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, r: bound_weights(s, r, 0.9), (log_diag, raw))
    assert torch.autograd.gradgradcheck(lambda s, r: bound_weights(s, r, 0.9), (log_diag, raw))


def test_bound_weights_under_torch_func_and_compile():
    log_diag, raw = torch.randn(2, 1, 4, 4), torch.randn(2, ST.S, 4, 4)
    g = torch.func.grad(lambda r: bound_weights(log_diag, r).square().sum())(raw)
    r = raw.clone().requires_grad_()
    bound_weights(log_diag, r).square().sum().backward()
    torch.testing.assert_close(g, r.grad)
    compiled = torch.compile(bound_weights, fullgraph=True)
    torch.testing.assert_close(compiled(log_diag, raw), bound_weights(log_diag, raw))


@pytest.mark.parametrize("bound", [0, 1, 1.5, -0.1, float("nan"), True, "0.9"])
def test_bound_out_of_range_is_refused_by_name(bound):
    with pytest.raises(ValueError, match=r"^bound: expected a number in \(0, 1\)"):
        bound_weights(torch.zeros(1, 1, 2, 2), torch.zeros(1, ST.S, 2, 2), bound)
    with pytest.raises(ValueError, match=r"^weight_bound: expected a number in \(0, 1\)"):
        StructuredNormal.from_head(torch.zeros(1, 2 + ST.S, 2, 2), ST, weight_bound=bound)


def test_bound_weights_shape_errors_name_raw():
    with pytest.raises(ValueError, match=r"^raw: expected shape \(B, C\*S, H, W\)"):
        bound_weights(torch.zeros(1, 2, 3, 3), torch.zeros(1, 5, 3, 3))
    with pytest.raises(TypeError, match=r"^raw: expected a floating-point"):
        bound_weights(torch.zeros(1, 1, 3, 3), torch.zeros(1, ST.S, 3, 3, dtype=torch.int64))


def test_split_head_order_and_views():
    C = 2
    head = torch.randn(3, C * (2 + ST.S), 5, 4)
    loc, log_diag, off_diag = split_head(head, ST, weight_bound=None)
    assert torch.equal(loc, head[:, :C]) and torch.equal(log_diag, head[:, C:2 * C])
    assert torch.equal(off_diag, head[:, 2 * C:]) and off_diag._base is head
    _, _, bounded = split_head(head, ST)
    torch.testing.assert_close(bounded, bound_weights(head[:, C:2 * C], head[:, 2 * C:], 0.9))
    assert structlik.head.head_channels(ST, C) == head.shape[1]


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(1, 13, 4, 4), r"^head: expected shape \(B, C\*\(2\+S\), H, W\) with S=12: a multiple of 14"),
    (torch.zeros(14, 4, 4), r"^head: .*head\.unsqueeze\(0\)"),
    (torch.zeros(1, 0, 4, 4), r"^head: expected shape"),
])
def test_split_head_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        split_head(bad, ST)


def test_from_head_is_the_bounded_distribution(backend):
    head = torch.randn(2, 2 * (2 + ST.S), 6, 5, dtype=torch.float64)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    dist = StructuredNormal.from_head(head, ST)
    loc, log_diag, off_diag = split_head(head, ST)
    torch.testing.assert_close(dist.log_prob(x), StructuredNormal(loc, log_diag, off_diag, ST).log_prob(x))
    raw = StructuredNormal.from_head(head, ST, weight_bound=None)
    assert raw.off_diag.data_ptr() == head[:, 4:].data_ptr()
    assert dist.rsample((3,)).shape == (3, 2, 2, 6, 5)


def test_loss_from_a_split_head_trains_a_conv_head():
    """The quick start's loop: a zero-initialised bounded head starts as a diagonal Gaussian."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 2 + ST.S, 3, padding=1)
    torch.nn.init.zeros_(conv.weight), torch.nn.init.zeros_(conv.bias)
    x = torch.rand(4, 1, 8, 8)
    loss = structlik.structured_gaussian_nll(x, *split_head(conv(x), ST), ST)
    expected = -torch.distributions.Normal(0.0, 1.0).log_prob(x).sum((1, 2, 3)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert conv.weight.grad.abs().sum() > 0


def test_ycbcr_from_heads_bounds_the_luminance():
    full, low = torch.randn(2, 2 + ST.S, 8, 8), torch.randn(2, 4, 2, 2)
    dist = YCbCrStructuredNormal.from_heads(full, low, ST)
    torch.testing.assert_close(dist.luma.off_diag, bound_weights(full[:, 1:2], full[:, 2:], 0.9))
    raw = YCbCrStructuredNormal.from_heads(full, low, ST, weight_bound=None)
    torch.testing.assert_close(raw.luma.off_diag, full[:, 2:])
    with pytest.raises(ValueError, match="^weight_bound"):
        YCbCrStructuredNormal.from_heads(full, low, ST, weight_bound=2.0)


def _amplifying(ratio=6.0, H=24):
    """Every weight equal: sum|w|/d = ratio, and U^-1 grows along the rows (samples of 1e5+)."""
    log_diag = torch.zeros(1, 1, H, H)
    off_diag = torch.full((1, ST.S, H, H), ratio / ST.S)
    return StructuredNormal(torch.zeros(1, 1, H, H), log_diag, off_diag, ST)


def test_sampling_an_amplifying_U_warns_once_naming_the_ratio(backend):
    dist = _amplifying()
    with pytest.warns(structlik.IllConditionedWarning, match=r"reaches 6, .*from_head.*bound_weights"):
        dist.rsample()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist.sample()           # once per process: not again


def test_bounded_and_unvalidated_sampling_does_not_warn(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StructuredNormal.from_head(torch.randn(2, 2 + ST.S, 24, 24), ST).rsample((4,))
        # a ratio above 1 that does not amplify (a single weight, d = 1): no warning either
        off = torch.zeros(1, ST.S, 8, 8)
        off[0, 0, 3, 3] = 1.5
        StructuredNormal(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), off, ST).rsample()
        torch.distributions.Distribution.set_default_validate_args(False)
        try:
            _amplifying().rsample()
        finally:
            torch.distributions.Distribution.set_default_validate_args(True)


def test_an_overflowing_sample_raises_instead_of_returning_nan(backend):
    """d = 1 and every weight 3 at 32x32: the solve overflows to inf and NaN (issue: 337 NaN of 1,024)."""
    dist = _amplifying(ratio=3.0 * ST.S, H=32)
    with pytest.raises(ValueError, match=r"^rsample: the result has NaN values although .* "
                                         r"are finite: U\^-1 overflowed .* reaches 36"):
        dist.rsample()


@pytest.mark.parametrize("name", ["solve_upper", "solve_upper_t"])
def test_an_overflowing_solve_raises_instead_of_returning_nan(name, backend):
    """The public solves on the same U: finite inputs, NaN out, named with the ratio."""
    dist = _amplifying(ratio=3.0 * ST.S, H=32)
    z = torch.randn(dist.loc.shape, dtype=dist.loc.dtype)
    inverse = "U\\^-T" if name.endswith("_t") else "U\\^-1"
    with pytest.raises(ValueError, match=f"^{name}: the result has NaN values although .* are finite: "
                                         f"{inverse} overflowed .* reaches 36"):
        getattr(ops, name)(z, dist.log_diag, dist.off_diag, ST)
