"""Every autograd and torch feature a user reaches for, on every backend: second derivatives,
torch.compile's first call, torch.func (grad, jacrev, vmap, vmap(grad)), meta and fake tensors."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import OPCHECK_STENCIL, make_params, opcheck_inputs
import structlik
from structlik import Stencil, StructuredNormal, ops, reference, structured_gaussian_nll

ST = Stencil(1, (1, 2))
SHAPE = (2, 1, 3, 4)


def problem(requires_grad=True, shape=SHAPE, stencil=ST):
    loc, log_diag, off_diag = make_params(shape, stencil, requires_grad=requires_grad)
    x = loc.detach() + torch.randn(shape, dtype=torch.float64)
    return x, loc, log_diag, off_diag


def _gradgradcheck(fn, inputs, backend):
    # Under Triton's interpreter each call costs tens of milliseconds: a random projection there.
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=backend == "triton")


OPS = {
    "apply_upper": lambda x, m, s, w: ops.apply_upper(x, s, w, ST),
    "apply_upper_t": lambda x, m, s, w: ops.apply_upper_t(x, s, w, ST),
    "solve_upper": lambda x, m, s, w: ops.solve_upper(x, s, w, ST),
    "solve_upper_t": lambda x, m, s, w: ops.solve_upper_t(x, s, w, ST),
    "precision_diagonal": lambda x, m, s, w: ops.precision_diagonal(s, w, ST),
    "variance": lambda x, m, s, w: ops.variance(s, w, ST),
    "nll": lambda x, m, s, w: ops.nll(x, m, s, w, ST),
}


@pytest.mark.parametrize("name", list(OPS))
def test_gradgradcheck(name, backend):
    x, loc, log_diag, off_diag = problem()
    x.requires_grad_()
    _gradgradcheck(lambda *a: OPS[name](*a), (x, loc, log_diag, off_diag), backend)


def test_gradgradcheck_nll_basis_and_head(backend):
    x, loc, log_diag, _ = problem()
    coeffs = (0.3 * torch.randn(2, 3, 3, 4, dtype=torch.float64)).requires_grad_()
    basis = (0.3 * torch.randn(ST.S, 3, dtype=torch.float64)).requires_grad_()
    _gradgradcheck(lambda *a: ops.nll_basis(*a, ST), (x, loc, log_diag, coeffs, basis), backend)
    head = torch.cat([loc, log_diag, make_params(SHAPE, ST)[2]], dim=1).detach().requires_grad_()
    _gradgradcheck(lambda h: ops.nll(x, *h.split([1, 1, ST.S], dim=1), ST), (head,), backend)


def test_hessian_of_the_nll_is_the_precision(backend):
    x, loc, log_diag, off_diag = problem(requires_grad=False)
    hess = torch.autograd.functional.hessian(lambda m: ops.nll(x, m, log_diag, off_diag, ST).sum(), loc)
    U = ops.to_dense_upper(log_diag, off_diag, ST)
    n = SHAPE[2] * SHAPE[3]
    hess = hess.reshape(2, n, 2, n)
    for b in range(2):
        torch.testing.assert_close(hess[b, :, b], (U.mT @ U)[b, 0])
    assert hess[0, :, 1].abs().max() == 0                 # images are independent


def test_gradient_penalty_reaches_every_parameter(backend):
    x, loc, log_diag, off_diag = problem()
    (g,) = torch.autograd.grad(structured_gaussian_nll(x, loc, log_diag, off_diag, ST), loc, create_graph=True)
    g.square().sum().backward()
    for t in (loc, log_diag, off_diag):
        assert t.grad is not None and t.grad.abs().sum() > 0
    expected = [t.grad for t in (loc, log_diag, off_diag)]
    refs = [t.detach().clone().requires_grad_() for t in (loc, log_diag, off_diag)]
    from structlik import reference
    (g,) = torch.autograd.grad(reference.nll(x, *refs, ST).mean(), refs[0], create_graph=True)
    g.square().sum().backward()
    for got, ref in zip(expected, refs):
        torch.testing.assert_close(got, ref.grad)


# --- torch.compile: the first call of a process -------------------------------------------

FIRST_CALLS = {
    "loss": "structlik.structured_gaussian_nll(x, loc, s, w, st)",
    "log_prob": "structlik.StructuredNormal(loc, s, w, st).log_prob(x).sum()",
    "module": "structlik.StructuredGaussianNLLLoss(st)(x, loc, s, w)",
    "rsample": "structlik.StructuredNormal(loc, s, w, st).rsample().sum()",
}


@pytest.mark.parametrize("entry", list(FIRST_CALLS))
def test_first_call_of_a_process_is_compiled(entry, backend):
    """No eager call first: the backends must be loaded before dynamo traces the loss."""
    code = textwrap.dedent(f"""
        import torch, structlik
        st = structlik.Stencil(1)
        g = torch.Generator().manual_seed(0)
        x, loc, s = (0.1 * torch.randn(2, 1, 5, 4, generator=g) for _ in range(3))
        w = 0.1 * torch.randn(2, 4, 5, 4, generator=g)
        f = torch.compile(lambda x, loc, s, w: {FIRST_CALLS[entry]}, fullgraph=True, backend="aot_eager")
        got = f(x, loc, s, w)
        torch.manual_seed(0)
        if "{entry}" != "rsample":
            torch.testing.assert_close(got, {FIRST_CALLS[entry]})
        print("ok")
    """)
    env = dict(os.environ, STRUCTLIK_BACKEND=backend)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_reference_sampling_compiles(monkeypatch):
    """The backend of MPS, XPU and CUDA without Triton: its solves are opaque to dynamo."""
    monkeypatch.setitem(structlik.ops._forced._requested, "name", "reference")
    structlik.backends.sync()        # installed before the first call, which is inside torch.compile
    _, loc, log_diag, off_diag = problem(requires_grad=False)
    z = torch.randn(SHAPE, dtype=torch.float64)
    solve = torch.compile(lambda *a: ops.solve_upper(*a, ST), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(solve(z, log_diag, off_diag), ops.solve_upper(z, log_diag, off_diag, ST))
    sample = torch.compile(lambda *a: StructuredNormal(*a, ST).rsample(), fullgraph=True, backend="aot_eager")
    assert sample(loc, log_diag, off_diag).shape == SHAPE


# --- torch.func ----------------------------------------------------------------------------

def test_func_grad_and_jacrev(backend):
    x, loc, log_diag, off_diag = problem(requires_grad=False)
    grads = torch.func.grad(lambda m, s, w: ops.nll(x, m, s, w, ST).sum(), argnums=(0, 1, 2))(loc, log_diag,
                                                                                                off_diag)
    leaves = [t.clone().requires_grad_() for t in (loc, log_diag, off_diag)]
    expected = torch.autograd.grad(ops.nll(x, *leaves, ST).sum(), leaves)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    jac = torch.func.jacrev(lambda z: ops.solve_upper(z, log_diag, off_diag, ST))(x)
    U = ops.to_dense_upper(log_diag, off_diag, ST)
    n = SHAPE[2] * SHAPE[3]
    torch.testing.assert_close(jac.reshape(2, n, 2, n)[1, :, 1], torch.linalg.inv(U[1, 0]))


def test_vmap_and_per_sample_gradients(backend):
    x, loc, log_diag, off_diag = problem(requires_grad=False)
    per_image = torch.func.vmap(lambda *a: structured_gaussian_nll(*(t[None] for t in a), ST))(x, loc, log_diag,
                                                                                                 off_diag)
    torch.testing.assert_close(per_image, ops.nll(x, loc, log_diag, off_diag, ST))
    solved = torch.func.vmap(lambda z: ops.solve_upper(z, log_diag, off_diag, ST))(x[None].expand(3, -1, -1, -1, -1))
    torch.testing.assert_close(solved[2], ops.solve_upper(x, log_diag, off_diag, ST))

    def loss(m, s, w, xx):
        return structured_gaussian_nll(xx[None], m[None], s[None], w[None], ST)
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)))(loc, log_diag, off_diag, x)
    for b in range(2):
        leaves = [t[b:b + 1].clone().requires_grad_() for t in (loc, log_diag, off_diag)]
        expected = torch.autograd.grad(ops.nll(x[b:b + 1], *leaves, ST).sum(), leaves)
        for g, e in zip(per_sample, expected):
            torch.testing.assert_close(g[b], e[0])


def test_per_sample_gradients_through_a_split_head(backend):
    """vmap(grad) of the README's loss line: views of one head, per image."""
    x, loc, log_diag, off_diag = problem(requires_grad=False)
    head = torch.cat([loc, log_diag, off_diag], dim=1)

    def loss(h, xx):
        return structured_gaussian_nll(xx[None], *h[None].split([1, 1, ST.S], dim=1), ST)
    per_sample = torch.func.vmap(torch.func.grad(loss))(head, x)
    leaf = head.clone().requires_grad_()
    expected = torch.autograd.grad(ops.nll(x, *leaf.split([1, 1, ST.S], dim=1), ST).sum(), leaf)[0]
    torch.testing.assert_close(per_sample, expected)


def test_forward_mode_names_the_op(backend):
    """Every backend's ops share one formula, reverse mode only: forward mode says which op refuses."""
    x, loc, log_diag, off_diag = problem(requires_grad=False)
    with pytest.raises(NotImplementedError, match="structlik::nll.*reverse mode"):
        torch.func.jvp(lambda m: ops.nll(x, m, log_diag, off_diag, ST), (loc,), (torch.ones_like(loc),))


# --- meta and fake tensors -----------------------------------------------------------------

def test_meta_tensors_propagate_shapes_with_validation_on():
    assert torch.distributions.Distribution._validate_args
    x, loc, log_diag, off_diag = (t.to("meta") for t in problem(requires_grad=False))
    assert structured_gaussian_nll(x, loc, log_diag, off_diag, ST, reduction="none").shape == (2,)
    assert ops.solve_upper(x, log_diag, off_diag, ST).shape == SHAPE
    assert ops.precision_diagonal(log_diag, off_diag, ST).shape == SHAPE
    dist = StructuredNormal(loc, log_diag, off_diag, ST)
    assert dist.log_prob(x).shape == (2,) and dist.entropy().shape == (2,)


def test_fake_tensors_propagate_shapes(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = problem(requires_grad=False)
    with FakeTensorMode() as mode:
        x, loc, log_diag, off_diag = (mode.from_tensor(t) for t in real)
        assert structured_gaussian_nll(x, loc, log_diag, off_diag, ST, reduction="none").shape == (2,)
        assert StructuredNormal(loc, log_diag, off_diag, ST).rsample((3,)).shape == (3, *SHAPE)


def test_fake_tensors_leave_no_fake_tensor_in_the_caches():
    """The reference's index tables are cached per shape, but not while tracing: a shape first seen
    under FakeTensorMode (to_dense_upper is plain PyTorch over the reference, not an op with a fake
    kernel), then eagerly, gets real tables the second time (it got the fake ones back)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    stencil, shape = Stencil(2), (1, 1, 7, 6)          # a shape no other test uses
    _, log_diag, off_diag = make_params(shape, stencil)
    with FakeTensorMode() as mode:
        assert ops.to_dense_upper(mode.from_tensor(log_diag), mode.from_tensor(off_diag), stencil).shape == (1, 1, 42, 42)
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    r = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close((U[0, 0] @ r.reshape(-1)).reshape(shape), ops.apply_upper(r, log_diag, off_diag, stencil))


def test_half_entropy_is_float32_and_finite():
    stencil = Stencil(1)
    log_diag = torch.full((1, 3, 128, 128), 0.5, dtype=torch.float16)
    dist = StructuredNormal(torch.zeros_like(log_diag), log_diag, torch.zeros(1, 12, 128, 128, dtype=torch.float16),
                            stencil)
    entropy = dist.entropy()
    assert entropy.dtype == torch.float32
    n = 3 * 128 * 128
    expected = 0.5 * n * (1 + torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))) - 0.5 * n
    torch.testing.assert_close(entropy.double(), expected.reshape(1), rtol=1e-6, atol=0)


def test_jit_trace_of_a_module_using_the_loss(backend):
    """One graph on both of trace's runs (the head path is off while tracing: it chose nll_head
    once and nll on the check run), the traced module's values and gradients those of the eager
    one, and a TracerWarning that the value checks are not in the trace (they were dropped silently)."""
    import warnings
    stencil, C = Stencil(1), 1

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, C * (2 + stencil.S), 3, padding=1)
            self.loss = structlik.StructuredGaussianNLLLoss(stencil)

        def forward(self, h, x):
            return self.loss(x, *self.conv(h).split([C, C, C * stencil.S], 1))

    model = Model()
    h, x = torch.randn(2, 3, 6, 5), torch.randn(2, C, 6, 5)
    structlik._checks._traced["warned"] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, (h, x))      # check_trace=True: raised "Graphs differed"
    assert any("records no value checks" in str(w.message) and w.category is torch.jit.TracerWarning
               for w in caught)
    got, expected = traced(h, x), model(h, x)
    torch.testing.assert_close(got, expected)
    g_traced = torch.autograd.grad(got, model.conv.weight)[0]
    g_eager = torch.autograd.grad(expected, model.conv.weight)[0]
    torch.testing.assert_close(g_traced, g_eager)


@pytest.mark.backends("cpu", "triton")
def test_compile_fullgraph_nll(backend):
    x, loc, log_diag, off_diag = [t.detach().float().requires_grad_() for t in opcheck_inputs(False)]
    compiled = torch.compile(lambda *a: structured_gaussian_nll(*a, OPCHECK_STENCIL), fullgraph=True,
                             backend="aot_eager")
    got = compiled(x, loc, log_diag, off_diag)
    got.backward()
    grads = [t.grad.clone() for t in (x, loc, log_diag, off_diag)]
    for t in (x, loc, log_diag, off_diag):
        t.grad = None
    expected = structured_gaussian_nll(x, loc, log_diag, off_diag, OPCHECK_STENCIL)
    expected.backward()
    torch.testing.assert_close(got, expected)
    for g, t in zip(grads, (x, loc, log_diag, off_diag)):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.backends("cpu", "triton")
def test_compile_inductor_nll(backend):
    """The default inductor backend also compiles the loss (it calls our kernel as an extern op)."""
    x, loc, log_diag, off_diag = [t.detach().float() for t in opcheck_inputs(False)]
    compiled = torch.compile(lambda *a: structured_gaussian_nll(*a, OPCHECK_STENCIL), fullgraph=True)
    torch.testing.assert_close(compiled(x, loc, log_diag, off_diag),
                               structured_gaussian_nll(x, loc, log_diag, off_diag, OPCHECK_STENCIL))
