"""The weight bound inside the NLL kernel (issue #41): ``from_head``'s default bound and
``ops.nll(..., weight_bound=)`` take the raw weights to the kernel (the op's ``bound`` flag), which
bounds them on the fly. Against a dense float64 NLL built here from the bound's formula (values and
gradients), on every backend, for images, dilations, volumes and coupled channels (whose bound is
formed before the kernel), the head path and split views; gradgradcheck, torch.func and compile; and
every other feature of a from_head distribution equal to the materialised bound's."""
import math

import pytest
import torch
from torch.distributions import kl_divergence

from helpers import available_backends
from oracle import dense_m
import structlik
from structlik import Stencil, StructuredNormal, backends, ops

CASES = [
    pytest.param(Stencil(1), (2, 1, 4, 5), False, id="r1-4x5"),
    pytest.param(Stencil(1, (1, 2)), (1, 2, 5, 4), False, id="d12-C2-5x4"),
    pytest.param(Stencil(2), (1, 1, 5, 1), False, id="r2-5x1"),
    pytest.param(Stencil(1, ndim=3), (1, 2, 2, 3, 3), False, id="vol-r1-C2"),
    pytest.param(Stencil(1), (1, 3, 3, 4), True, id="coupled-C3"),
    pytest.param(Stencil(1, ndim=3), (1, 2, 2, 3, 2), True, id="vol-coupled-C2"),
]


def dense_bounded_nll(x, head, stencil, C, coupled, bound=0.9):
    """The NLL of x under from_head's distribution, from the formula: w = raw * bound * d / (1 +
    sum |raw| over row (c, p), cross weights included), M built entry by entry (tests/oracle.py)."""
    S, B = stencil.S, x.shape[0]
    sizes = [C, C, C * S] + ([C * (C - 1) // 2] if coupled else [])
    loc, ld, raw, *xi = head.split(sizes, 1)
    per = raw.unflatten(1, (C, S))
    l1 = per.abs().sum(2)
    rows = torch.tensor([c for c in range(C) for j in range(c + 1, C)], dtype=torch.long)
    if coupled:                    # pair (c, j) sits in row c of M
        l1 = l1.index_add(1, rows, xi[0].abs())
    f = bound * ld.exp() / (1 + l1)
    w = (per * f.unsqueeze(2)).flatten(1, 2)
    cross = xi[0] * f.index_select(1, rows) if coupled else None
    M = dense_m(ld, w, cross, stencil)
    r = (x - loc).reshape(B, -1, 1)
    n = r.shape[1]
    return 0.5 * (M @ r).square().sum((1, 2)) - torch.linalg.slogdet(M)[1] + 0.5 * n * math.log(2 * math.pi)


def make_head(stencil, shape, coupled, requires_grad=True):
    B, C = shape[:2]
    K = structlik.head_channels(stencil, C, cross=coupled)
    head = torch.randn(B, K, *shape[2:], dtype=torch.float64)
    head[:, 2 * C:] *= 2.0          # raw weights well past the bound: its nonlinearity matters
    return head.requires_grad_(requires_grad)


@pytest.mark.parametrize("backend_name", available_backends())
@pytest.mark.parametrize("stencil, shape, coupled", CASES)
@pytest.mark.parametrize("path", ["head", "split"])
def test_bounded_nll_matches_dense(backend_name, stencil, shape, coupled, path):
    """from_head's log_prob (the head path: the head's views) and ops.nll(weight_bound=) on split
    copies: the NLL and its gradient in every head channel equal the dense formula's."""
    C = shape[1]
    head = make_head(stencil, shape, coupled)
    x = torch.randn(shape, dtype=torch.float64)
    with backends.using(backend_name):
        if path == "head":
            dist = StructuredNormal.from_head(head, stencil, cross=coupled)
            out = -dist.log_prob(x)
            # the kernel bounded the raw weights: no bounded tensor was formed
            assert coupled or dist._bounded is None
        else:
            parts = [t.clone() for t in head.split(
                [C, C, C * stencil.S] + ([C * (C - 1) // 2] if coupled else []), 1)]
            out = ops.nll(x, *parts[:3], stencil, parts[3] if coupled else None, weight_bound=0.9)
        weights = torch.rand(out.shape, dtype=torch.float64)
        grad, = torch.autograd.grad((out * weights).sum(), head)
    expected = dense_bounded_nll(x, head, stencil, C, coupled)
    want, = torch.autograd.grad((expected * weights).sum(), head)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend_name", [b for b in available_backends() if b != "triton"])
@pytest.mark.parametrize("stencil, shape", [(Stencil(1), (1, 2, 3, 3)), (Stencil(1, ndim=3), (1, 1, 2, 2, 3))])
def test_bounded_gradgradcheck(backend_name, stencil, shape):
    """Second order through the bound (create_graph: the composed formula with structlik._bound's
    chain rule) in x's mean, log_diag and the raw weights."""
    C = shape[1]
    head = make_head(stencil, shape, False, requires_grad=False)
    loc, ld, raw = (t.clone().requires_grad_() for t in head.split([C, C, C * stencil.S], 1))
    x = torch.randn(shape, dtype=torch.float64)

    def f(m, s, w):
        return ops.nll(x, m, s, w, stencil, weight_bound=0.9)
    with backends.using(backend_name):
        assert torch.autograd.gradcheck(f, (loc, ld, raw))
        assert torch.autograd.gradgradcheck(f, (loc, ld, raw))


def test_bounded_func_and_compile():
    """Per-sample gradients (vmap(grad)) equal autograd's over the batch, jacrev works, and a
    torch.compile(fullgraph) of the bounded NLL matches eager."""
    stencil, shape = Stencil(1, (1, 2)), (3, 2, 5, 4)
    C = shape[1]
    loc, ld, raw = make_head(stencil, shape, False, requires_grad=False).split([C, C, C * stencil.S], 1)
    x = torch.randn(shape, dtype=torch.float64)

    def one(m, s, w, v):
        return ops.nll(v[None], m[None], s[None], w[None], stencil, weight_bound=0.9).sum()
    per_sample = torch.func.vmap(torch.func.grad(one, argnums=2))(loc, ld, raw, x)
    w = raw.clone().requires_grad_()
    full, = torch.autograd.grad(ops.nll(x, loc, ld, w, stencil, weight_bound=0.9).sum(), w)
    torch.testing.assert_close(per_sample, full)
    jac = torch.func.jacrev(lambda w: ops.nll(x, loc, ld, w, stencil, weight_bound=0.9))(raw)
    torch.testing.assert_close(jac.sum(0), full)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(m, s, w):
        return ops.nll(x, m, s, w, stencil, weight_bound=0.9)
    torch.testing.assert_close(step(loc, ld, raw), ops.nll(x, loc, ld, raw, stencil, weight_bound=0.9))


@pytest.mark.parametrize("stencil, shape, coupled", CASES)
def test_from_head_features_equal_the_materialised_bound(stencil, shape, coupled):
    """A from_head distribution (raw weights bounded in the kernel) gives the same off_diag,
    rsample, variance, entropy, KL and conditional mean as one built from bound_weights' tensors."""
    C = shape[1]
    head = make_head(stencil, shape, coupled)
    fused = StructuredNormal.from_head(head, stencil, cross=coupled)
    plain = StructuredNormal(*structlik.split_head(head, stencil, cross=coupled)[:3], stencil,
                             cross=structlik.split_head(head, stencil, cross=True)[3] if coupled else None)
    torch.testing.assert_close(fused.off_diag, plain.off_diag, rtol=0, atol=0)
    torch.manual_seed(3)
    a = fused.rsample((2,))
    torch.manual_seed(3)
    torch.testing.assert_close(a, plain.rsample((2,)))
    torch.testing.assert_close(fused.variance, plain.variance)
    torch.testing.assert_close(fused.entropy(), plain.entropy())
    torch.testing.assert_close(kl_divergence(fused, plain), torch.zeros(shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-9)
    value = torch.randn(shape, dtype=torch.float64)
    mask = torch.rand(shape) < 0.5
    torch.testing.assert_close(fused.condition(value, mask).mean, plain.condition(value, mask).mean)
    expanded = fused.expand((2, shape[0]))
    torch.testing.assert_close(expanded.log_prob(value), plain.log_prob(value).expand(2, -1))
    assert expanded.off_diag.shape == (2, *plain.off_diag.shape)


def test_bound_errors_name_the_argument():
    stencil = Stencil(1)
    loc, ld, raw = make_head(stencil, (1, 1, 3, 3), False, requires_grad=False).split([1, 1, 4], 1)
    x = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight_bound"):
        ops.nll(x, loc, ld, raw, stencil, weight_bound=1.5)
    with pytest.raises(ValueError, match="weight_bound"):
        StructuredNormal.from_head(torch.zeros(1, 6, 3, 3), stencil, weight_bound=0.0)
    with pytest.raises(ValueError, match="weight_bound"):
        ops.checked_nll("x", x, loc, ld, torch.zeros(1, 2, 3, 3, dtype=torch.float64), stencil,
                        basis=torch.zeros(4, 2, dtype=torch.float64), weight_bound=0.9)
    for backend_name in available_backends():
        with backends.using(backend_name):
            with pytest.raises(RuntimeError, match="bound"):
                torch.ops.structlik.nll(x, loc, ld, raw, None, stencil.flat_offsets, False, None, 1.5)
            two = torch.randn(1, 2, 3, 3, dtype=torch.float64)
            with pytest.raises(RuntimeError, match="bound"):
                torch.ops.structlik.nll(two, two, two, torch.zeros(1, 8, 3, 3, dtype=torch.float64), None,
                                        stencil.flat_offsets, False, torch.zeros(1, 1, 3, 3, dtype=torch.float64),
                                        0.9)


def test_loss_takes_raw_weights_with_a_bound():
    """structured_gaussian_nll(..., weight_bound=) and StructuredGaussianNLLLoss(weight_bound=) on a
    head's raw views equal from_head's -log_prob, batched and unbatched; a basis with a bound raises."""
    stencil, shape = Stencil(1, (1, 2)), (2, 2, 5, 4)
    C = shape[1]
    head = make_head(stencil, shape, False)
    x = torch.randn(shape, dtype=torch.float64)
    parts = head.split([C, C, C * stencil.S], 1)
    want = -StructuredNormal.from_head(head, stencil).log_prob(x)
    loss = structlik.StructuredGaussianNLLLoss(stencil, reduction="none", weight_bound=0.9)
    torch.testing.assert_close(loss(x, *parts), want)
    torch.testing.assert_close(structlik.structured_gaussian_nll(x, *parts, stencil, weight_bound=0.9), want.mean())
    torch.testing.assert_close(structlik.structured_gaussian_nll(x[0], *(p[0] for p in parts), stencil,
                                                                 reduction="none", weight_bound=0.9), want[0])
    assert "weight_bound=0.9" in repr(loss)
    with pytest.raises(ValueError, match="weight_bound"):
        structlik.StructuredGaussianNLLLoss(stencil, weight_bound=2.0)
    with pytest.raises(ValueError, match="weight_bound"):
        structlik.structured_gaussian_nll(x, parts[0], parts[1], torch.zeros(2, 6, 5, 4, dtype=torch.float64),
                                          stencil, basis=torch.zeros(stencil.S, 3, dtype=torch.float64),
                                          weight_bound=0.9)


@pytest.mark.parametrize("backend_name", available_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bounded_half_head_computes_in_float32(backend_name, dtype):
    """A half head (torch.autocast's) bounded in the kernel: the NLL and the head's gradient in
    float32 arithmetic, as the float32 head's (the gradient cast back to the head's dtype)."""
    stencil, shape = Stencil(1), (2, 1, 4, 5)
    head32 = make_head(stencil, shape, False, requires_grad=False).float()
    head = head32.to(dtype).requires_grad_()
    x = torch.rand(shape)
    with backends.using(backend_name):
        out = StructuredNormal.from_head(head, stencil).log_prob(x)
        grad, = torch.autograd.grad(out.sum(), head)
        ref_head = head.detach().float().requires_grad_()
        ref = StructuredNormal.from_head(ref_head, stencil).log_prob(x)
        ref_grad, = torch.autograd.grad(ref.sum(), ref_head)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=1e-2, atol=1e-2)


def test_from_head_compiles():
    """torch.compile(fullgraph) of from_head(...).log_prob with the default bound matches eager."""
    stencil, shape = Stencil(1), (2, 1, 5, 4)
    head = make_head(stencil, shape, False, requires_grad=False)
    x = torch.randn(shape, dtype=torch.float64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(h):
        return StructuredNormal.from_head(h, stencil).log_prob(x)
    torch.testing.assert_close(step(head), StructuredNormal.from_head(head, stencil).log_prob(x))
