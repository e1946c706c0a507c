"""Issue #39's probe of the features that landed last, each item with the test that failed before
its fix (oracles: dense float64 from tests/oracle.py)."""
import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from oracle import dense_normal
from structlik import Stencil, StructuredNormal


def structured(shape, stencil=Stencil(1), dtype=torch.float64, nan_loc=False, cross=False):
    B, C = shape[:2]
    loc = torch.randn(shape, dtype=dtype)
    if nan_loc:
        loc.view(-1)[1] = float("nan")
    ld = 0.2 * torch.randn(shape, dtype=dtype)
    od = 0.1 * torch.randn(B, C * stencil.S, *shape[2:], dtype=dtype)
    xi = 0.2 * torch.randn(B, C * (C - 1) // 2, *shape[2:], dtype=dtype) if cross else None
    return StructuredNormal(loc, ld, od, stencil, cross=xi)


# -- item 3: the conditional's log_prob ---------------------------------------------------------

def _conditional(dtype=torch.float32):
    shape = (2, 1, 5, 6)
    p = structured(shape, dtype=dtype)
    mask = torch.rand(shape) < 0.5
    return p, p.condition(torch.randn(shape, dtype=dtype), mask), mask


def test_conditional_log_prob_ignores_nan_in_observed_pixels():
    p, c, mask = _conditional(torch.float64)
    x = torch.randn(mask.shape, dtype=torch.float64)
    want = c.log_prob(x)
    x[mask] = float("nan")
    torch.testing.assert_close(c.log_prob(x), want)
    # against the dense conditional: x_M | x_O ~ N(mu_M - L_MM^-1 L_MO (x_O - mu_O), L_MM^-1)
    x = torch.where(mask, c.value, torch.randn(mask.shape, dtype=torch.float64))
    lam = dense_normal(p).precision_matrix
    for b in range(2):
        m = ~mask[b].reshape(-1)
        o = ~m
        mu = p.loc[b].reshape(-1)
        cond_mean = mu[m] - torch.linalg.solve(lam[b][m][:, m], lam[b][m][:, o] @ (x[b].reshape(-1)[o] - mu[o]))
        mvn = torch.distributions.MultivariateNormal(cond_mean, precision_matrix=lam[b][m][:, m])
        torch.testing.assert_close(c.log_prob(x)[b], mvn.log_prob(x[b].reshape(-1)[m]))


def test_conditional_log_prob_names_nan_in_missing_pixels():
    _, c, mask = _conditional()
    x = torch.randn(mask.shape)
    x[~mask] = float("nan")
    with pytest.raises(ValueError, match=r"value \(missing pixels\): contains NaN"):
        c.log_prob(x)


def test_conditional_log_prob_promotes_a_float64_value():
    p32, c32, mask = _conditional(torch.float32)
    x = torch.randn(mask.shape, dtype=torch.float64)
    out = c32.log_prob(x)
    assert out.dtype == torch.float64
    p64 = StructuredNormal(p32.loc.double(), p32.log_diag.double(), p32.off_diag.double(), p32.stencil)
    want = p64.condition(c32.value.double(), mask).log_prob(x)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)


# -- item 4: KL edges ---------------------------------------------------------------------------

@pytest.mark.backends("reference", "cpu", "triton")
def test_kl_image_narrower_than_the_stencil(backend):
    p, q = structured((1, 1, 5, 1)), structured((1, 1, 5, 1), Stencil(2))
    torch.testing.assert_close(kl_divergence(p, q), kl_divergence(dense_normal(p), dense_normal(q)))
    torch.testing.assert_close(kl_divergence(q, p), kl_divergence(dense_normal(q), dense_normal(p)))


def test_kl_names_nan_in_a_loc():
    shape = (1, 1, 4, 4)
    diag = Independent(Normal(torch.randn(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64)), 3)
    cases = [(lambda: kl_divergence(structured(shape, nan_loc=True), structured(shape)), "p.loc"),
             (lambda: kl_divergence(structured(shape), structured(shape, nan_loc=True)), "q.loc"),
             (lambda: kl_divergence(structured(shape, nan_loc=True), diag), "p.loc"),
             (lambda: kl_divergence(diag, structured(shape, nan_loc=True)), "q.loc")]
    for kl, name in cases:
        with pytest.raises(ValueError, match=rf"{name}: contains NaN"):
            kl()


# -- item 5: condition on an empty batch ---------------------------------------------------------

def test_condition_on_an_empty_batch_gives_empty_results():
    p = structured((0, 2, 3, 4))
    c = p.condition(torch.zeros(0, 2, 3, 4, dtype=torch.float64), torch.zeros(0, 2, 3, 4, dtype=torch.bool))
    assert c.sample((2,)).shape == (2, 0, 2, 3, 4)
    assert c.rsample().shape == (0, 2, 3, 4)
    assert c.log_prob(torch.zeros(3, 0, 2, 3, 4, dtype=torch.float64)).shape == (3, 0)
    assert c.mean.shape == (0, 2, 3, 4)
    assert c.observed_log_prob().shape == (0,)


# -- item 6: torch.func ---------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["variance", "covariance_band", "kl", "coupled variance"])
def test_jacrev_of_the_uncertainty_features(what):
    st, shape = Stencil(1), (1, 2, 3, 4)
    p = structured(shape, cross=what == "coupled variance")
    q = structured(shape)

    def f(w):
        d = StructuredNormal(p.loc, p.log_diag, w, st, cross=p.cross)
        if what == "kl":
            return kl_divergence(d, q)
        return d.covariance_band() if what == "covariance_band" else d.variance
    got = torch.func.jacrev(f)(p.off_diag)
    torch.testing.assert_close(got, torch.autograd.functional.jacobian(f, p.off_diag))


def test_vmap_of_a_coupled_covariance_column():
    st = Stencil(1)
    p = structured((3, 2, 3, 4), cross=True)

    def column(ld, xi):
        return StructuredNormal(p.loc[0], ld, p.off_diag[0], st, cross=xi).covariance((1, 2))
    got = torch.func.vmap(column)(p.log_diag, p.cross)
    torch.testing.assert_close(got, torch.stack([column(p.log_diag[b], p.cross[b]) for b in range(3)]))


# -- item 2: float32 variances where d spans e^+-30 ---------------------------------------------

@pytest.mark.parametrize("pattern", ["alternating", "random"])
def test_float32_variance_does_not_overflow(pattern, backend):
    """Bounded weights (sum|w| < 0.9 d) and log_diag of +-30: variances up to 1e26, which float32
    holds; w * Sigma (1e39) did not, and the C++ and Triton kernels returned inf or raised."""
    from structlik import bound_weights, ops
    st, H, W = Stencil(1), 5, 6
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ld = (30.0 * (1 - 2 * ((yy + xx) % 2))).float() if pattern == "alternating" else 30 * (2 * torch.rand(H, W) - 1)
    ld = ld.reshape(1, 1, H, W)
    od = bound_weights(ld, torch.randn(1, st.S, H, W))
    var64 = ops.variance(ld.double(), od.double(), st)
    var = ops.variance(ld, od, st)
    assert var.dtype == torch.float32 and var64.max() > 1e24
    torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=0)     # float32 at this conditioning
    band64 = ops.covariance_band(ld.double(), od.double(), st)
    band = ops.covariance_band(ld, od, st)
    assert torch.isfinite(band).all()
    torch.testing.assert_close(band.double(), band64, rtol=1e-4, atol=1e-5 * float(var64.max()))
