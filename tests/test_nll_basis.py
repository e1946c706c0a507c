"""The learned basis (paper section 4.3): the fused op against the materialised form, on every backend."""
import pytest
import torch

from helpers import assert_half_nll_matches_float32, make_params
from structlik import LearnedBasis, Stencil, StructuredNormal, expand_basis, ops, reference, structured_gaussian_nll

CASES = [
    pytest.param(Stencil(1), (2, 1, 5, 7), 2, id="r1-nb2-B2-C1-5x7"),
    pytest.param(Stencil(2, (1, 2)), (1, 3, 6, 4), 5, id="r2-d12-nb5-B1-C3-6x4"),
    pytest.param(Stencil(3), (2, 2, 3, 9), 6, id="r3-nb6-B2-C2-3x9"),
]


def make(stencil, shape, n_b, dtype=torch.float64):
    loc, log_diag, _ = make_params(shape, stencil, dtype=dtype)
    B, C, H, W = shape
    x = loc + torch.randn(shape, dtype=dtype)
    coeffs = 0.2 * torch.randn(B, C * n_b, H, W, dtype=dtype)
    basis = torch.randn(stencil.S, n_b, dtype=dtype) / n_b ** 0.5
    return x, loc, log_diag, coeffs, basis


def test_expand_basis_matches_a_loop():
    stencil, n_b = Stencil(1), 3
    coeffs = torch.randn(2, 2 * n_b, 3, 4, dtype=torch.float64)
    basis = torch.randn(stencil.S, n_b, dtype=torch.float64)
    off = expand_basis(coeffs, basis)
    for c in range(2):
        for i in range(stencil.S):
            expected = sum(basis[i, j] * coeffs[:, c * n_b + j] for j in range(n_b))
            torch.testing.assert_close(off[:, c * stencil.S + i], expected)


@pytest.mark.parametrize("stencil,shape,n_b", CASES)
def test_nll_basis_matches_materialised(stencil, shape, n_b, backend):
    x, loc, log_diag, coeffs, basis = make(stencil, shape, n_b)
    params = [t.requires_grad_() for t in (loc, log_diag, coeffs, basis)]
    got = ops.nll_basis(x, loc, log_diag, coeffs, basis, stencil)
    expected = reference.nll(x, loc, log_diag, expand_basis(coeffs, basis), stencil)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
    for g, e in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(expected.sum(), params)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nll_basis_half_inputs(dtype, backend):
    stencil, shape, n_b = Stencil(2), (2, 1, 6, 5), 3
    assert_half_nll_matches_float32(lambda *a: ops.nll_basis(*a, stencil),
                                    lambda *a: reference.nll_basis(*a, stencil),
                                    make(stencil, shape, n_b, dtype=torch.float32), dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu"], indirect=True)
def test_gradcheck_nll_basis(backend):
    stencil, shape, n_b = Stencil(1, (1, 2)), (1, 2, 4, 3), 3
    x, loc, log_diag, coeffs, basis = make(stencil, shape, n_b)
    inputs = [t.requires_grad_() for t in (x, loc, log_diag, coeffs, basis)]
    assert torch.autograd.gradcheck(lambda *a: ops.nll_basis(*a, stencil), inputs, eps=1e-6, atol=1e-7)


def test_loss_and_distribution_accept_the_basis():
    stencil, shape, n_b = Stencil(2), (3, 1, 6, 6), 4
    module = LearnedBasis(stencil, n_b).double()
    x, loc, log_diag, coeffs, _ = make(stencil, shape, n_b)
    fused = structured_gaussian_nll(x, loc, log_diag, coeffs, stencil, reduction="none", basis=module.basis)
    materialised = structured_gaussian_nll(x, loc, log_diag, module(coeffs), stencil, reduction="none")
    torch.testing.assert_close(fused, materialised)
    fused.sum().backward()
    assert module.basis.grad is not None and module.basis.grad.abs().sum() > 0

    dist = StructuredNormal(loc, log_diag, coeffs, stencil, basis=module.basis.detach())
    torch.testing.assert_close(dist.log_prob(x), -materialised.detach())
    plain = StructuredNormal(loc, log_diag, module(coeffs).detach(), stencil)
    torch.manual_seed(3)
    a = dist.sample((2,))
    torch.manual_seed(3)
    torch.testing.assert_close(a, plain.sample((2,)))
    assert dist.expand((3,)).basis is dist.basis


def test_bad_basis_arguments():
    stencil, shape, n_b = Stencil(1), (2, 1, 4, 4), 3
    x, loc, log_diag, coeffs, basis = make(stencil, shape, n_b)
    with pytest.raises(ValueError, match=r"basis: expected shape \(S, n_b\) with S=4"):
        ops.nll_basis(x, loc, log_diag, coeffs, basis[:3], stencil)
    with pytest.raises(ValueError, match=r"coeffs: expected shape \(B, C\*n_b, H, W\)"):
        ops.nll_basis(x, loc, log_diag, coeffs[:, :2], basis, stencil)
    with pytest.raises(TypeError, match="basis: expected a floating-point"):
        ops.nll_basis(x, loc, log_diag, coeffs, basis.long(), stencil)
    # a float32 basis beside float64 images promotes (torch.result_type), as every other argument
    torch.testing.assert_close(ops.nll_basis(x, loc, log_diag, coeffs, basis.float(), stencil),
                               ops.nll_basis(x, loc, log_diag, coeffs, basis.float().double(), stencil))
    with pytest.raises(ValueError, match="n_basis"):
        LearnedBasis(stencil, 0)
    with pytest.raises(ValueError, match=r"off_diag: expected shape \(\*batch, C\*n_b, H, W\)"):
        StructuredNormal(loc, log_diag, coeffs[:, :2], stencil, basis=basis)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_basis_training_forward_stores_u(backend, monkeypatch):
    """With a gradient to take, the Triton basis NLL stores u in the forward (op nll_basis_u) and the
    one-pass backward reads it; without one, the forward writes no u."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    from structlik.kernels import nll as kernels
    calls = []
    forward, backward = kernels.forward, kernels.backward
    monkeypatch.setattr(kernels, "forward", lambda *a, basis=None, with_u=False: calls.append(("forward", with_u))
                        or forward(*a, basis=basis, with_u=with_u))
    monkeypatch.setattr(kernels, "backward", lambda *a, basis=None, u=None, out=None:
                        calls.append(("backward", u is not None)) or backward(*a, basis=basis, u=u, out=out))
    stencil, shape, n_b = Stencil(1), (2, 1, 5, 6), 3
    x, loc, log_diag, coeffs, basis = make(stencil, shape, n_b)
    params = [t.requires_grad_() for t in (loc, log_diag, coeffs, basis)]
    grads = torch.autograd.grad(ops.nll_basis(x, *params, stencil).sum(), params)
    assert calls == [("forward", True), ("backward", True)]
    expected = torch.autograd.grad(reference.nll_basis(x, *params, stencil).sum(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    calls.clear()
    with torch.no_grad():
        ops.nll_basis(x, *params, stencil)
    assert calls == [("forward", False)]
