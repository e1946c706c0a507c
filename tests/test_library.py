"""The ops as torch.library ops: opcheck of every kernel, and torch.compile(fullgraph=True) through the loss."""
import pytest
import torch

from conftest import TEST_DEVICE
from helpers import available_backends, make_params
from structlik import Stencil, backends, structured_gaussian_nll

BACKENDS = available_backends(TEST_DEVICE)
COMPILED = [name for name in BACKENDS if name != "reference"]
STENCIL = Stencil(1, (1, 2))


def sample_inputs(grad):
    loc, log_diag, off_diag = make_params((2, 2, 5, 4), STENCIL, requires_grad=grad)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=grad)
    return x, loc, log_diag, off_diag


def op_cases():
    offsets = STENCIL.flat_offsets
    for name in ("apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t"):
        yield name, lambda g, name=name: (sample_inputs(g)[0], *sample_inputs(g)[2:], offsets), True
    yield "precision_diagonal", lambda g: (*sample_inputs(g)[2:], offsets), True
    yield "nll", lambda g: (*sample_inputs(g), offsets), True

    def head_inputs(grad):
        x, loc, log_diag, off_diag = sample_inputs(False)
        spare = torch.randn(2, 1, 5, 4, dtype=torch.float64)
        head = torch.cat([spare, loc, log_diag, off_diag, spare], dim=1).requires_grad_(grad)
        return x, head, 1

    yield "nll_head", lambda g: (*head_inputs(g), offsets), True
    yield "nll_head_backward", lambda g: (torch.rand(2, dtype=torch.float64), *head_inputs(False), offsets), False
    def basis_inputs(grad):
        coeffs = (0.2 * torch.randn(2, 2 * 3, 5, 4, dtype=torch.float64)).requires_grad_(grad)
        basis = torch.randn(STENCIL.S, 3, dtype=torch.float64).requires_grad_(grad)
        return coeffs, basis

    yield "nll_basis", lambda g: (*sample_inputs(g)[:3], *basis_inputs(g), offsets), True
    yield "nll_basis_u", lambda g: (*sample_inputs(g)[:3], *basis_inputs(g), offsets), True
    yield "nll_basis_backward", lambda g: (torch.rand(2, dtype=torch.float64), *sample_inputs(False)[:3],
                                           *basis_inputs(False), offsets), False
    yield "weight_grad", lambda g: (*sample_inputs(False)[:2], offsets), False
    yield "nll_backward", lambda g: (torch.rand(2, dtype=torch.float64), *sample_inputs(False), offsets), False
    yield "nll_u", lambda g: (*sample_inputs(g), offsets), True
    yield "nll_head_u", lambda g: (*head_inputs(g), offsets), True


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name,make,differentiable", [pytest.param(*c, id=c[0]) for c in op_cases()])
def test_opcheck(backend_name, name, make, differentiable):
    """torch.ops.structlik.<name> with each backend's kernel (the reference: what MPS, XPU and a
    CPU without the extension run)."""
    op = getattr(torch.ops.structlik, name)
    with backends.using(backend_name):
        for grad in ((False, True) if differentiable else (False,)):
            torch.library.opcheck(op, make(grad))


@pytest.mark.parametrize("backend", COMPILED, indirect=True)
def test_compile_fullgraph_nll(backend):
    x, loc, log_diag, off_diag = [t.detach().float().requires_grad_() for t in sample_inputs(False)]
    compiled = torch.compile(lambda *a: structured_gaussian_nll(*a, STENCIL), fullgraph=True, backend="aot_eager")
    got = compiled(x, loc, log_diag, off_diag)
    got.backward()
    grads = [t.grad.clone() for t in (x, loc, log_diag, off_diag)]
    for t in (x, loc, log_diag, off_diag):
        t.grad = None
    expected = structured_gaussian_nll(x, loc, log_diag, off_diag, STENCIL)
    expected.backward()
    torch.testing.assert_close(got, expected)
    for g, t in zip(grads, (x, loc, log_diag, off_diag)):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("backend", COMPILED, indirect=True)
def test_compile_inductor_nll(backend):
    """The default inductor backend also compiles the loss (it calls our kernel as an extern op)."""
    x, loc, log_diag, off_diag = [t.detach().float() for t in sample_inputs(False)]
    compiled = torch.compile(lambda *a: structured_gaussian_nll(*a, STENCIL), fullgraph=True)
    torch.testing.assert_close(compiled(x, loc, log_diag, off_diag),
                               structured_gaussian_nll(x, loc, log_diag, off_diag, STENCIL))


@pytest.mark.skipif("triton" not in COMPILED, reason="the Triton backend is unavailable")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_opcheck_triton_nll_half(dtype):
    """The Triton NLL reads half inputs itself: its fake kernel must give the real float32 output."""
    x, loc, log_diag, off_diag = [t.detach().to(dtype).requires_grad_(i > 0)
                                  for i, t in enumerate(sample_inputs(False))]
    with backends.using("triton"):
        torch.library.opcheck(torch.ops.structlik.nll, (x, loc, log_diag, off_diag, STENCIL.flat_offsets))
