"""Bad input raises ValueError/TypeError naming the argument and the expected shape (docs/contract.md §6)."""
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
    pytest.param(1, torch.zeros(2, 3, 5, 4, dtype=torch.bool), TypeError, r"loc: expected a floating-point",
                 id="loc-bool"),
    pytest.param(0, torch.zeros(3, 5, 4), ValueError, r"x: expected shape \(B, C, H, W\), got \(3, 5, 4\); "
                 r"for one image add the batch dimension: x\.unsqueeze\(0\)", id="x-unbatched"),
    pytest.param(2, torch.zeros(2, 3, 5, 4, device="meta"), ValueError, r"log_diag: device", id="device-mismatch"),
    pytest.param(0, [[0.0]], TypeError, r"x: expected a torch.Tensor", id="x-list"),
    pytest.param(2, torch.zeros(0, 3, 5, 4), ValueError, r"log_diag: expected shape", id="empty-batch"),
    pytest.param(0, torch.zeros(0, 3, 5, 4), ValueError, r"loc: expected shape \(B, C, H, W\) = \(0, 3, 5, 4\)",
                 id="empty-x"),       # an empty batch is fine, the parameters' B must match it
    pytest.param(0, torch.zeros(2, 3, 0, 4), ValueError, r"x: expected C, H and W of at least 1", id="no-rows"),
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
    with pytest.raises(ValueError, match=r"log_diag: expected shape \(B, C, H, W\) = \(2, 2, 5, 4\)"):
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
    with pytest.raises(TypeError, match="loc: expected a floating-point"):
        StructuredNormal(loc.int(), s, w, ST)
    assert StructuredNormal(loc.double(), s, w, ST).loc.dtype == torch.float64     # promoted, as Normal


def test_log_prob_bad_value():
    x, loc, s, w = good()
    dist = StructuredNormal(loc, s, w, ST)
    with pytest.raises(ValueError):
        dist.log_prob(x[..., :3])
    with pytest.raises(TypeError, match="value: expected a floating-point"):
        dist.log_prob(x.long())
    with pytest.raises(ValueError, match=r"value: expected a tensor on cpu"):
        dist.log_prob(x.to("meta"))
    with pytest.raises(ValueError):
        dist.log_prob(torch.full_like(x, float("nan")))


# --- the argument that is actually inconsistent is named (x or value is the reference) ------

@pytest.mark.parametrize("bad,exc,match", [
    pytest.param(torch.zeros(3, 3, 5, 4), ValueError, r"^log_diag: expected shape \(B, C, H, W\) = \(2, 3, 5, 4\)",
                 id="B"),
    pytest.param(torch.zeros(2, 2, 5, 4), ValueError, r"^log_diag: expected shape", id="C"),
    pytest.param(torch.zeros(2, 3, 6, 4), ValueError, r"^log_diag: expected shape", id="H"),
    pytest.param(torch.zeros(2, 3, 5, 4, dtype=torch.int16), TypeError, r"^log_diag: expected a floating", id="dtype"),
    pytest.param(torch.zeros(3, 5, 4), ValueError, r"^log_diag: expected shape .*log_diag\.unsqueeze\(0\)",
                 id="unbatched"),
])
def test_wrong_log_diag_is_named(bad, exc, match):
    x, loc, _, w = good()
    with pytest.raises(exc, match=match):
        nll(x, loc, bad, w)


def test_distribution_with_a_basis_names_log_diag():
    x, loc, s, _ = good()
    coeffs = torch.zeros(2, 3 * 2, 5, 4)
    with pytest.raises(TypeError, match=r"^log_diag: expected a floating-point"):
        StructuredNormal(loc, s.int(), coeffs, ST, basis=torch.zeros(ST.S, 2))
    with pytest.raises(TypeError, match=r"^basis: expected a floating-point"):
        StructuredNormal(loc, s, coeffs, ST, basis=torch.zeros(ST.S, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^basis: device meta does not match"):
        StructuredNormal(loc, s, coeffs, ST, basis=torch.zeros(ST.S, 2, device="meta"))


def test_ycbcr_bad_heads_and_resolution():
    from structlik import YCbCrStructuredNormal
    full, low = YCbCrStructuredNormal.head_channels(ST)
    with pytest.raises(ValueError, match=rf"^full_res: expected shape \(B, 2\+S, H, W\) = \(B, {full}, H, W\)"):
        YCbCrStructuredNormal.from_heads(torch.zeros(2, full + 1, 8, 8), torch.zeros(2, low, 2, 2), ST)
    with pytest.raises(ValueError, match=r"^low_res: expected shape \(B, 4, H/f, W/f\)"):
        YCbCrStructuredNormal.from_heads(torch.zeros(2, full, 8, 8), torch.zeros(2, 3, 2, 2), ST)
    dist = YCbCrStructuredNormal.from_heads(torch.zeros(2, full, 8, 8), torch.zeros(2, low, 2, 2), ST)
    with pytest.raises(ValueError, match=r"^rgb: expected shape \(\*sample, B, 3, H, W\) = \(\*, 2, 3, 8, 8\)"):
        dist.log_prob(torch.zeros(2, 3, 16, 16))
    with pytest.raises(NotImplementedError, match="YCbCrStructuredNormal.expand"):
        dist.expand((4, 2))


def test_basis_channel_counts():
    from structlik import LearnedBasis, expand_basis
    basis = LearnedBasis(ST, n_basis=3)
    with pytest.raises(ValueError, match=r"^coeffs: expected shape \(B, C\*n_b, H, W\) with n_b=3"):
        basis(torch.zeros(2, 4, 5, 4))
    with pytest.raises(ValueError, match=r"^coeffs: expected shape \(B, C\*n_b, H, W\) with n_b=3"):
        expand_basis(torch.zeros(2, 4, 5, 4), basis.basis.detach())


def test_priors_and_schedules_reject_bad_numbers():
    from structlik import gamma_prior_log_prob, variance_minimiser, variance_weight
    _, loc, s, w = good()
    for bad in (float("inf"), float("nan"), True, 0, -1.0, "2"):
        with pytest.raises(ValueError, match="^concentration: expected a positive finite number"):
            gamma_prior_log_prob(s, w, ST, concentration=bad, rate=1.0)
        with pytest.raises(ValueError, match="^rate: expected a positive finite number"):
            gamma_prior_log_prob(s, w, ST, concentration=2.0, rate=bad)
    with pytest.raises(TypeError, match=r"^loc: expected a floating-point"):
        variance_minimiser(loc, loc.int(), 1.0)
    assert variance_minimiser(loc, loc.double(), 1.0).dtype == torch.float64
    with pytest.raises(ValueError, match="^loc: contains NaN"):
        variance_minimiser(loc, torch.full_like(loc, float("nan")), 1.0)
    with pytest.raises(ValueError, match="^weight: expected a finite number"):
        variance_minimiser(loc, loc, float("nan"))
    for bad in (1.5, -1, True, "3"):
        with pytest.raises(ValueError, match="^epoch: expected an integer >= 0"):
            variance_weight(bad)


def test_stencil_accepts_integer_types():
    import numpy as np
    assert Stencil(np.int64(2)).S == 12 == Stencil(2, dilations=(np.int32(1),)).S
    with pytest.raises(ValueError, match="radius must be an integer"):
        Stencil(np.float64(2.0))
    with pytest.raises(ValueError, match="radius must be an integer"):
        Stencil(np.bool_(True))
