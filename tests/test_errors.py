"""Bad input raises ValueError/TypeError naming the argument and the expected shape (SPEC section 4)."""
import pytest
import torch

from structlik import Stencil, StructuredGaussianNLLLoss, StructuredNormal, ops, structured_gaussian_nll

ST = Stencil(1)   # S = 4


def good(B=2, C=3, H=5, W=4, dtype=torch.float32):
    x = torch.randn(B, C, H, W, dtype=dtype)
    return x, torch.zeros_like(x), torch.zeros_like(x), torch.zeros(B, C * ST.S, H, W, dtype=dtype)


def nll(x, loc, s, w, stencil=ST):
    return structured_gaussian_nll(x, loc, s, w, stencil)


@pytest.mark.parametrize("which,bad,exc,match", [
    pytest.param(0, torch.zeros(2, 3, 5), ValueError, r"x: expected shape \(B, C, H, W\)", id="x-3d"),
    pytest.param(1, torch.zeros(2, 3, 5, 5), ValueError, r"loc: expected shape \(B, C, H, W\) = \(2, 3, 5, 4\)",
                 id="loc-shape"),
    pytest.param(2, torch.zeros(2, 3, 5, 4, 1), ValueError, r"log_diag: expected shape \(B, C, H, W\)",
                 id="log_diag-5d"),
    pytest.param(3, torch.zeros(2, 9, 5, 4), ValueError, r"off_diag: expected shape \(B, C\*S, H, W\).*S=4.*"
                 r"\(2, 12, 5, 4\)", id="off_diag-channels"),
    pytest.param(3, torch.zeros(2, 12, 5, 3), ValueError, r"off_diag: expected shape", id="off_diag-width"),
    pytest.param(0, torch.zeros(2, 3, 5, 4, dtype=torch.int64), TypeError, r"x: expected a floating-point",
                 id="x-int"),
    pytest.param(3, torch.zeros(2, 12, 5, 4, dtype=torch.int32), TypeError, r"off_diag: expected a floating",
                 id="off_diag-int"),
    pytest.param(1, torch.zeros(2, 3, 5, 4, dtype=torch.float64), TypeError, r"loc: dtype torch.float64 does not "
                 r"match x's dtype torch.float32", id="loc-dtype"),
    pytest.param(2, torch.zeros(2, 3, 5, 4, device="meta"), ValueError, r"log_diag: device", id="device-mismatch"),
    pytest.param(0, [[0.0]], TypeError, r"x: expected a torch.Tensor", id="x-list"),
    pytest.param(2, torch.zeros(0, 3, 5, 4), ValueError, r"log_diag: expected shape", id="empty-batch"),
    pytest.param(0, torch.zeros(0, 3, 5, 4), ValueError, r"x: expected non-empty", id="empty-x"),
])
def test_bad_tensor_arguments(which, bad, exc, match):
    args = list(good())
    args[which] = bad
    with pytest.raises(exc, match=match):
        nll(*args)


@pytest.mark.parametrize("which,name", [(0, "x"), (1, "loc"), (2, "log_diag"), (3, "off_diag")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values(which, name, value):
    args = list(good())
    args[which][0, 0, 1, 1] = value
    with pytest.raises(ValueError, match=f"{name}: contains NaN or infinite"):
        nll(*args)


def test_non_finite_check_follows_validate_args_switch():
    x, loc, s, w = good()
    x[0, 0, 0, 0] = float("nan")
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        assert torch.isnan(nll(x, loc, s, w))
    finally:
        torch.distributions.Distribution.set_default_validate_args(True)


def test_bad_stencil():
    with pytest.raises(TypeError, match="stencil: expected a structlik.Stencil"):
        nll(*good(), stencil=3)
    with pytest.raises(TypeError, match="stencil"):
        StructuredGaussianNLLLoss(stencil=(1,))


@pytest.mark.parametrize("reduction", ["avg", None, "batchmean"])
def test_bad_reduction(reduction):
    with pytest.raises(ValueError, match="reduction: expected one of"):
        structured_gaussian_nll(*good(), ST, reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        StructuredGaussianNLLLoss(ST, reduction=reduction)


@pytest.mark.parametrize("name", ["apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t"])
def test_primitives_name_their_image_argument(name):
    x, _, s, w = good()
    image_name = {"apply_upper": "r", "apply_upper_t": "y", "solve_upper": "z", "solve_upper_t": "g"}[name]
    with pytest.raises(ValueError, match=rf"{image_name}: expected shape \(B, C, H, W\), got \(3, 5, 4\)"):
        getattr(ops, name)(x[0], s, w, ST)
    with pytest.raises(ValueError, match=rf"log_diag: expected shape \(B, C, H, W\) = \(2, 2, 5, 4\)"):
        getattr(ops, name)(x[:, :2], s, w, ST)     # the image is the reference for shapes


def test_distribution_bad_shapes():
    x, loc, s, w = good()
    with pytest.raises(ValueError, match=r"off_diag: expected shape \(\*batch, C\*S, H, W\)"):
        StructuredNormal(loc, s, w[:, :5], ST)
    with pytest.raises(ValueError, match=r"log_diag: expected shape \(\*batch, C, H, W\)"):
        StructuredNormal(loc, s[:, :1], w, ST)
    with pytest.raises(ValueError, match="do not broadcast"):
        StructuredNormal(loc, s[:1].expand(3, 3, 5, 4), w, ST)
    with pytest.raises(TypeError, match="log_diag: expected a torch.Tensor"):
        StructuredNormal(loc, 0.0, w, ST)
    with pytest.raises(TypeError, match="loc: dtype"):
        StructuredNormal(loc.double(), s, w, ST)


def test_log_prob_bad_value():
    x, loc, s, w = good()
    dist = StructuredNormal(loc, s, w, ST)
    with pytest.raises(ValueError):
        dist.log_prob(x[..., :3])
    with pytest.raises(TypeError, match="value: expected a torch.float32 tensor"):
        dist.log_prob(x.double())
    with pytest.raises(ValueError):
        dist.log_prob(torch.full_like(x, float("nan")))
