"""structured_gaussian_nll and StructuredGaussianNLLLoss: reductions as nn.GaussianNLLLoss, training works."""
import pytest
import torch

from helpers import make_params
import structlik
from structlik import Stencil, StructuredGaussianNLLLoss, StructuredNormal, structured_gaussian_nll

ST = Stencil(2)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reductions(reduction):
    loc, log_diag, off_diag = make_params((4, 2, 6, 5), ST)
    x = loc + torch.randn_like(loc)
    per_image = -StructuredNormal(loc, log_diag, off_diag, ST).log_prob(x)
    expected = {"none": per_image, "mean": per_image.mean(), "sum": per_image.sum()}[reduction]
    torch.testing.assert_close(structured_gaussian_nll(x, loc, log_diag, off_diag, ST, reduction=reduction), expected)
    module = StructuredGaussianNLLLoss(ST, reduction=reduction)
    torch.testing.assert_close(module(x, loc, log_diag, off_diag), expected)
    assert "reduction" in repr(module) and "Stencil(radius=2" in repr(module)


def test_diagonal_case_equals_gaussian_nll_loss():
    """With zero off-diagonal weights the loss is a diagonal Gaussian: nn.GaussianNLLLoss(full=True) summed."""
    loc, log_diag, _ = make_params((4, 1, 6, 5), ST)
    x = loc + torch.randn_like(loc)
    off_diag = torch.zeros(4, ST.S, 6, 5, dtype=torch.float64)
    var = (-2 * log_diag).exp()
    expected = torch.nn.GaussianNLLLoss(full=True, eps=0, reduction="sum")(loc, x, var) / 4
    torch.testing.assert_close(structured_gaussian_nll(x, loc, log_diag, off_diag, ST), expected)


def test_fitting_recovers_correlation():
    """Gradient descent on the loss learns a positive horizontal correlation present in the data."""
    stencil = Stencil(1)
    torch.manual_seed(0)
    white = torch.randn(256, 1, 6, 7)
    data = white + 0.8 * torch.roll(white, 1, dims=-1)     # neighbours along x are correlated
    log_diag = torch.zeros(1, 1, 6, 7, requires_grad=True)
    off_diag = torch.zeros(1, stencil.S, 6, 7, requires_grad=True)
    opt = torch.optim.Adam([log_diag, off_diag], lr=0.05)
    loss_fn = StructuredGaussianNLLLoss(stencil)
    zeros = torch.zeros_like(data)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn(data, zeros, log_diag.expand_as(data), off_diag.expand(256, -1, -1, -1))
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < first - 5.0
    # positive correlation means a negative precision entry: U's (0, 1) weight takes the sign opposite to d > 0
    assert off_diag[0, 0, :, :-1].mean() < -0.1


def test_one_unbatched_image_gives_a_scalar_nll():
    """(C, H, W) inputs, as StructuredNormal takes them: the per-image NLL is a scalar."""
    st = structlik.Stencil(1)
    x, loc, s = torch.randn(2, 5, 4), torch.randn(2, 5, 4), 0.1 * torch.randn(2, 5, 4)
    w = 0.1 * torch.randn(2 * st.S, 5, 4)
    out = structlik.structured_gaussian_nll(x, loc, s, w, st, reduction="none")
    assert out.shape == ()
    torch.testing.assert_close(out, -structlik.StructuredNormal(loc, s, w, st).log_prob(x))
    torch.testing.assert_close(structlik.StructuredGaussianNLLLoss(st)(x, loc, s, w), out)


def test_module_takes_basis_and_cross_by_keyword_only():
    """Issue #39 item 7: forward(x, loc, log_diag, off_diag, *, basis=None, cross=None): cross weights
    passed as a fifth positional argument were taken as the basis; now a TypeError, by keyword exact."""
    st = structlik.Stencil(1)
    x, loc, s = (torch.randn(1, 2, 3, 4, dtype=torch.float64) for _ in range(3))
    w = 0.1 * torch.randn(1, 2 * st.S, 3, 4, dtype=torch.float64)
    xi = 0.2 * torch.randn(1, 1, 3, 4, dtype=torch.float64)
    loss = structlik.StructuredGaussianNLLLoss(st)
    with pytest.raises(TypeError):
        loss(x, loc, s, w, xi)
    torch.testing.assert_close(loss(x, loc, s, w, cross=xi), structlik.structured_gaussian_nll(x, loc, s, w, st,
                                                                                               cross=xi))
