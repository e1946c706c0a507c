"""The NLL family (structlik/ops/_nll.py): nll and nll_basis, plain weights, a learned basis
(paper section 4.3) and the head input, every backend against the reference, the reference against
a dense MVN, the training forward's stored u."""
import math

import pytest
import torch
from hypothesis import given
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TEST_DEVICE
from helpers import (INTERPRETED_CASES, STENCILS, assert_half_nll_matches_float32, available_backends, gradcheck,
                     gradcheck_problems, make_params, triton_if_available)
from structlik import (LearnedBasis, Stencil, StructuredNormal, backends, expand_basis, ops, reference,
                       structured_gaussian_nll)


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


@pytest.mark.backends("cpu", "triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nll_matches_reference(shape, stencil, dtype, backend):
    """The compiled kernels against structlik.reference. Not the reference backend: it runs that
    formula itself (structlik.reference.nll_and_u), checked against the dense MVN above."""
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


class OpLog(TorchDispatchMode):
    """The structlik ops called inside the block, each with the arguments that pick its variant."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("nll", "nll_head"):
            self.calls.append((name, "store_u", args[-1]))
        elif name in ("nll_backward", "nll_head_backward"):
            self.calls.append((name, "u stored", args[-2].numel() > 0))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("basis", [False, True], ids=["weights", "basis"])
@pytest.mark.parametrize("path", ["views", "separate", "func"])
def test_training_forward_stores_u_for_a_one_pass_backward(path, basis, backend):
    """On every backend: when a gradient will be taken, the forward stores u = U r and the fused
    backward reads it (docs/kernels.md §1: 82 planes per step on a GPU instead of 109; on a CPU,
    S multiply-adds per pixel fewer); without one, the forward stores no u. Gradients equal the
    reference's. The dispatcher alone picks the kernel: the flag is the same on every backend."""
    stencil, n_b = Stencil(1), 3
    loc, log_diag, off_diag = make_params((2, 1, 5, 6), stencil)
    x = torch.randn_like(loc)
    b = torch.randn(stencil.S, n_b, dtype=torch.float64, requires_grad=True) if basis else None
    per = n_b if basis else stencil.S
    head = torch.cat([loc, log_diag, off_diag[:, :per]], 1).requires_grad_()

    def nll(parts):
        return ops.nll(x, *parts, stencil) if b is None else ops.nll_basis(x, *parts, b, stencil)

    def loss(h):
        parts = h.split([1, 1, per], 1)
        if path == "separate":       # not views of one head: the plain op, not the head op
            parts = [t.clone() for t in parts]
        return nll(parts).sum()
    with OpLog() as log:
        if path == "func":
            grad = torch.func.grad(loss)(head)
        else:
            grad = torch.autograd.grad(loss(head), head)[0]
    forward = "nll_head" if path == "views" and b is None else "nll"
    assert log.calls[0] == (forward, "store_u", True)
    # torch.func builds its gradients with grad mode on, so they come from the composed
    # (twice-differentiable) formula, not the fused kernel: the same numbers
    assert ((f"{forward}_backward", "u stored", True) in log.calls) == (path != "func")
    assert (f"{forward}_backward", "u stored", False) not in log.calls
    parts = head.split([1, 1, per], 1)
    expected = torch.autograd.grad((reference.nll(x, *parts, stencil) if b is None else
                                    reference.nll_basis(x, *parts, b, stencil)).sum(), head)[0]
    torch.testing.assert_close(grad, expected)
    with torch.no_grad(), OpLog() as log:
        nll(head.split([1, 1, per], 1))
    assert log.calls == [("nll", "store_u", False)]


@pytest.mark.parametrize("backend", [n for n in ("cpu", "triton") if n in available_backends()], indirect=True)
def test_compiled_training_forward_stores_u(backend):
    """Under torch.compile the graph records the training forward (store_u) too."""
    stencil = Stencil(1)
    loc, log_diag, off_diag = make_params((2, 1, 5, 6), stencil, requires_grad=True)
    x = torch.randn_like(loc)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    loss = torch.compile(lambda *p: ops.nll(x, *p, stencil).sum(), backend=capture, fullgraph=True)
    grads = torch.autograd.grad(loss(loc, log_diag, off_diag), (loc, log_diag, off_diag))
    calls = [n for g in graphs for n in g.graph.nodes if "structlik.nll" in str(n.target)]
    assert calls and all(n.args[-1] is True for n in calls), [n.format_node() for n in calls]
    expected = torch.autograd.grad(reference.nll(x, loc, log_diag, off_diag, stencil).sum(), (loc, log_diag, off_diag))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.not_interpreted
@given(problem=gradcheck_problems())
def test_gradcheck_nll(problem, backend):
    stencil, shape = problem
    loc, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    x = (loc.detach() + torch.randn(shape, dtype=torch.float64)).requires_grad_()
    gradcheck(lambda *a: ops.nll(*a, stencil), x, loc, log_diag, off_diag, backend=backend)
    gradcheck(lambda *a: structured_gaussian_nll(*a, stencil, reduction="sum"), x, loc, log_diag, off_diag,
              backend=backend)


# --- the ops as torch.library ops: opcheck of every variant on every backend --------------------

OPCHECK_STENCIL = Stencil(1, (1, 2))


def sample_inputs(grad):
    loc, log_diag, off_diag = make_params((2, 2, 5, 4), OPCHECK_STENCIL, requires_grad=grad)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=grad)
    return x, loc, log_diag, off_diag


def head_inputs(grad):
    x, loc, log_diag, off_diag = sample_inputs(False)
    spare = torch.randn(2, 1, 5, 4, dtype=torch.float64)
    head = torch.cat([spare, loc, log_diag, off_diag, spare], dim=1).requires_grad_(grad)
    return x, head, 1


def basis_inputs(grad):
    coeffs = (0.2 * torch.randn(2, 2 * 3, 5, 4, dtype=torch.float64)).requires_grad_(grad)
    basis = torch.randn(OPCHECK_STENCIL.S, 3, dtype=torch.float64).requires_grad_(grad)
    return coeffs, basis


def stored_u(x, loc, log_diag, off_diag, basis=None, bound=0.0):
    """What the training forward returns as u, for the backward that reads it."""
    return torch.ops.structlik.nll(x, loc, log_diag, off_diag, basis, OPCHECK_STENCIL.flat_offsets, True, None,
                                   bound)[1].detach()


def nll_op_cases():
    """Each NLL op with every variant its arguments select (weights or a basis, u stored or not)."""
    offsets = OPCHECK_STENCIL.flat_offsets
    empty = torch.empty(0, dtype=torch.float64)
    for store_u in (False, True):
        yield f"nll-store_u={store_u}", lambda g, s=store_u: (*sample_inputs(g), None, offsets, s), True
        yield (f"nll-basis-store_u={store_u}",
               lambda g, s=store_u: (*sample_inputs(g)[:3], *basis_inputs(g), offsets, s), True)
        yield f"nll_head-store_u={store_u}", lambda g, s=store_u: (*head_inputs(g), offsets, s), True
        # the bound flag: raw weights bounded inside the kernel (from_head's default)
        yield (f"nll-bound-store_u={store_u}", lambda g, s=store_u: (*sample_inputs(g), None, offsets, s, None, 0.9),
               True)
        yield (f"nll_head-bound-store_u={store_u}", lambda g, s=store_u: (*head_inputs(g), offsets, s, False, 0.9),
               True)

    def backward_inputs(basis, stored):
        x, loc, log_diag, off_diag = sample_inputs(False)
        coeffs, b = basis_inputs(False) if basis else (off_diag, None)
        u = stored_u(x, loc, log_diag, coeffs, b) if stored else empty
        return torch.rand(2, dtype=torch.float64), x, loc, log_diag, coeffs, b, u, offsets

    def head_backward_inputs(stored, bound=0.0):
        x, head, c0 = head_inputs(False)
        S = OPCHECK_STENCIL.S
        u = stored_u(x, *head.narrow(1, c0, 4 + 2 * S).split([2, 2, 2 * S], 1), bound=bound) if stored else empty
        return torch.rand(2, dtype=torch.float64), x, head, c0, u, offsets

    def bounded_backward_inputs(stored):
        x, loc, log_diag, raw = sample_inputs(False)
        u = stored_u(x, loc, log_diag, raw, bound=0.9) if stored else empty
        return torch.rand(2, dtype=torch.float64), x, loc, log_diag, raw, None, u, offsets

    for stored in (False, True):
        yield f"nll_backward-u={stored}", lambda g, u=stored: backward_inputs(False, u), False
        yield f"nll_backward-basis-u={stored}", lambda g, u=stored: backward_inputs(True, u), False
        yield f"nll_head_backward-u={stored}", lambda g, u=stored: head_backward_inputs(u), False
        yield (f"nll_backward-bound-u={stored}", lambda g, u=stored: (*bounded_backward_inputs(u), None, 0.9),
               False)
        yield (f"nll_head_backward-bound-u={stored}", lambda g, u=stored: (*head_backward_inputs(u, 0.9), False, 0.9),
               False)


@pytest.mark.parametrize("backend_name", available_backends(TEST_DEVICE))
@pytest.mark.parametrize("case,make,differentiable", [pytest.param(*c, id=c[0]) for c in nll_op_cases()])
def test_opcheck_nll(backend_name, case, make, differentiable):
    """torch.ops.structlik.nll / nll_backward / nll_head / nll_head_backward with each backend's kernel."""
    op = getattr(torch.ops.structlik, case.split("-")[0])
    with backends.using(backend_name):
        for grad in ((False, True) if differentiable else (False,)):
            torch.library.opcheck(op, make(grad))


@pytest.mark.parametrize("backend_name", available_backends(TEST_DEVICE))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_opcheck_nll_half(backend_name, dtype):
    """Every backend's NLL reads half inputs (the kernels upcast, structlik/_dtypes.py): its fake kernel
    gives the real float32 NLL and u, and the backward the inputs' dtypes."""
    x, loc, log_diag, off_diag = [t.detach().to(dtype).requires_grad_(i > 0)
                                  for i, t in enumerate(sample_inputs(False))]
    with backends.using(backend_name):
        for store_u in (False, True):
            torch.library.opcheck(torch.ops.structlik.nll,
                                  (x, loc, log_diag, off_diag, None, OPCHECK_STENCIL.flat_offsets, store_u))
        u = torch.ops.structlik.nll(x, loc, log_diag, off_diag, None, OPCHECK_STENCIL.flat_offsets, True)[1]
        assert u.dtype == torch.float32
        grads = torch.ops.structlik.nll_backward(torch.ones(2), x.detach(), loc.detach(), log_diag.detach(),
                                                 off_diag.detach(), None, u, OPCHECK_STENCIL.flat_offsets)
        assert [g.dtype for g in grads[:3]] == [dtype] * 3


@pytest.mark.parametrize("backend", triton_if_available(TEST_DEVICE), indirect=True)
@pytest.mark.parametrize("stencil,shape", INTERPRETED_CASES)
def test_gradcheck_interpreted_triton(stencil, shape, backend):
    """The registered backward on the Triton kernels (interpreted without a GPU), fast_mode gradcheck."""
    loc, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    x = (loc.detach() + torch.randn(shape, dtype=torch.float64)).requires_grad_()
    gradcheck(lambda *a: ops.nll(*a, stencil), x, loc, log_diag, off_diag, backend=backend)


# --- the learned basis: the fused op against the materialised form -------------------------------

BASIS_CASES = [
    pytest.param(Stencil(1), (2, 1, 5, 7), 2, id="r1-nb2-B2-C1-5x7"),
    pytest.param(Stencil(2, (1, 2)), (1, 3, 6, 4), 5, id="r2-d12-nb5-B1-C3-6x4"),
    pytest.param(Stencil(3), (2, 2, 3, 9), 6, id="r3-nb6-B2-C2-3x9"),
]


def make_basis_inputs(stencil, shape, n_b, dtype=torch.float64):
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


@pytest.mark.parametrize("stencil,shape,n_b", BASIS_CASES)
def test_nll_basis_matches_materialised(stencil, shape, n_b, backend):
    x, loc, log_diag, coeffs, basis = make_basis_inputs(stencil, shape, n_b)
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
                                    make_basis_inputs(stencil, shape, n_b, dtype=torch.float32), dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu"], indirect=True)
def test_gradcheck_nll_basis(backend):
    stencil, shape, n_b = Stencil(1, (1, 2)), (1, 2, 4, 3), 3
    x, loc, log_diag, coeffs, basis = make_basis_inputs(stencil, shape, n_b)
    inputs = [t.requires_grad_() for t in (x, loc, log_diag, coeffs, basis)]
    assert torch.autograd.gradcheck(lambda *a: ops.nll_basis(*a, stencil), inputs, eps=1e-6, atol=1e-7)


def test_loss_and_distribution_accept_the_basis():
    stencil, shape, n_b = Stencil(2), (3, 1, 6, 6), 4
    module = LearnedBasis(stencil, n_b).double()
    x, loc, log_diag, coeffs, _ = make_basis_inputs(stencil, shape, n_b)
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
    x, loc, log_diag, coeffs, basis = make_basis_inputs(stencil, shape, n_b)
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
