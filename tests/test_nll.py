"""The NLL / log_prob: every backend against the reference, the reference against a dense MVN."""
import math
import os

import pytest
import torch

from helpers import STENCILS, assert_half_nll_matches_float32, make_params
from structlik import StructuredNormal, ops, reference


def dense_log_prob(x, loc, log_diag, off_diag, stencil):
    """log N(x; loc, (U^T U)^-1) per image via torch's MultivariateNormal, channel by channel."""
    B, C, H, W = x.shape
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    mvn = torch.distributions.MultivariateNormal(loc.reshape(B, C, H * W), precision_matrix=U.mT @ U)
    return mvn.log_prob(x.reshape(B, C, H * W)).sum(-1)


def test_log_prob_equals_dense_mvn(shape, stencil, backend):
    loc, log_diag, off_diag = make_params(shape, stencil)
    x = loc + torch.randn(shape, dtype=torch.float64)
    ours = StructuredNormal(loc, log_diag, off_diag, stencil).log_prob(x)
    expected = dense_log_prob(x, loc, log_diag, off_diag, stencil)
    assert ours.shape == (shape[0],)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nll_matches_reference(shape, stencil, dtype, backend):
    loc, log_diag, off_diag = make_params(shape, stencil, dtype=dtype)
    x = loc + torch.randn(shape, dtype=dtype)
    got = ops.nll(x, loc, log_diag, off_diag, stencil)
    expected = reference.nll(x, loc, log_diag, off_diag, stencil)
    assert got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(got, expected, **tol)


def test_nll_of_identity_U_is_standard_normal():
    stencil = STENCILS[1].values[0]
    shape = (2, 3, 4, 5)
    x = torch.randn(shape, dtype=torch.float64)
    zeros = torch.zeros(shape, dtype=torch.float64)
    off = torch.zeros(2, 3 * stencil.S, 4, 5, dtype=torch.float64)
    expected = 0.5 * x.square().sum((1, 2, 3)) + 0.5 * 60 * math.log(2 * math.pi)
    torch.testing.assert_close(ops.nll(x, zeros, zeros, off, stencil), expected, rtol=1e-14, atol=0)


def test_half_precision_inputs_accumulate_in_float32():
    stencil = STENCILS[0].values[0]
    loc, log_diag, off_diag = make_params((2, 1, 8, 8), stencil, dtype=torch.float32)
    x = loc + torch.randn_like(loc)
    expected = reference.nll(x, loc, log_diag, off_diag, stencil)
    half = [t.bfloat16() for t in (x, loc, log_diag, off_diag)]
    got = ops.nll(*half, stencil)
    assert got.dtype == torch.float32
    upcast = reference.nll(*[t.float() for t in half], stencil)
    torch.testing.assert_close(got, upcast)
    torch.testing.assert_close(got, expected, rtol=0.05, atol=1.0)


@pytest.mark.parametrize("wants", [("x",), ("loc",), ("x", "loc")], ids=lambda w: "+".join(w))
def test_x_and_loc_gradients_for_each_subset(wants, backend):
    """d/dloc = -d/dx whichever of them asks for a gradient (d/dloc reuses d/dx's buffer when x has none)."""
    stencil = STENCILS[0].values[0]
    loc, log_diag, off_diag = make_params((2, 2, 6, 7), stencil)
    x = loc + torch.randn_like(loc)
    tensors = {"x": x.clone().requires_grad_("x" in wants), "loc": loc.clone().requires_grad_("loc" in wants)}
    grads = torch.autograd.grad(ops.nll(tensors["x"], tensors["loc"], log_diag, off_diag, stencil).sum(),
                                [tensors[name] for name in wants])
    expected_x = torch.func.grad(lambda t: reference.nll(t, loc, log_diag, off_diag, stencil).sum())(x)
    for name, got in zip(wants, grads):
        torch.testing.assert_close(got, expected_x if name == "x" else -expected_x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_nll_and_half_gradients(dtype, backend):
    """Whether a backend reads half inputs itself (Triton) or gets float32 copies."""
    stencil = STENCILS[1].values[0]
    loc, log_diag, off_diag = make_params((2, 2, 7, 9), stencil, dtype=torch.float32)
    assert_half_nll_matches_float32(lambda *a: ops.nll(*a, stencil), lambda *a: reference.nll(*a, stencil),
                                    [loc + torch.randn_like(loc), loc, log_diag, off_diag], dtype)


@pytest.mark.parametrize("path", ["views", "separate", "compiled", "func"])
def test_triton_training_forward_stores_u_for_a_one_pass_backward(path, monkeypatch):
    """When a gradient will be taken, the Triton NLL stores u = U r in the forward and the
    fused backward reads it (docs/kernels.md §1: 82 planes per step instead of 109); without one,
    the forward writes no u. Gradients equal the reference's."""
    from structlik import Stencil, backends
    from structlik.kernels import nll as kernels

    if not backends.available("triton") or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    backends.sync()
    calls = []
    forward, backward = kernels.forward, kernels.backward
    monkeypatch.setattr(kernels, "forward", lambda *a, with_u=False: calls.append(("forward", with_u))
                        or forward(*a, with_u=with_u))
    monkeypatch.setattr(kernels, "backward", lambda *a, u=None, out=None: calls.append(("backward", u is not None))
                        or backward(*a, u=u, out=out))
    stencil = Stencil(1)
    loc, log_diag, off_diag = make_params((2, 1, 5, 6), stencil)
    x = torch.randn_like(loc)
    head = torch.cat([loc, log_diag, off_diag], 1).requires_grad_()

    def loss(h):
        parts = h.split([1, 1, stencil.S], 1)
        if path == "separate":       # not views of one head: the plain op, not the head op
            parts = [t.clone() for t in parts]
        return ops.nll(x, *parts, stencil).sum()
    if path == "compiled":
        grad = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(head), head)[0]
    elif path == "func":
        grad = torch.func.grad(loss)(head)
    else:
        grad = torch.autograd.grad(loss(head), head)[0]
    assert ("forward", True) in calls and ("backward", False) not in calls
    # torch.func builds its gradients with grad mode on, so they come from the composed
    # (twice-differentiable) formula, not the fused kernel: the same numbers
    assert (("backward", True) in calls) == (path != "func")
    expected = torch.autograd.grad(reference.nll(x, *head.split([1, 1, stencil.S], 1), stencil).sum(), head)[0]
    torch.testing.assert_close(grad, expected)
    calls.clear()
    with torch.no_grad():
        ops.nll(x, *head.split([1, 1, stencil.S], 1), stencil)
    assert calls == [("forward", False)]
