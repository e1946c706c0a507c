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
    """The image ops, the precision diagonal and weight_grad (the NLL family's cases: test_nll.py)."""
    offsets = STENCIL.flat_offsets
    for name in ("apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t"):
        yield name, lambda g, name=name: (sample_inputs(g)[0], *sample_inputs(g)[2:], offsets), True
    yield "precision_diagonal", lambda g: (*sample_inputs(g)[2:], offsets), True
    yield "weight_grad", lambda g: (*sample_inputs(False)[:2], offsets), False


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case,make,differentiable", [pytest.param(*c, id=c[0]) for c in op_cases()])
def test_opcheck(backend_name, case, make, differentiable):
    """torch.ops.structlik.<op> with each backend's kernel (the reference: what MPS, XPU and a
    CPU without the extension run)."""
    op = getattr(torch.ops.structlik, case.split("-")[0])
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
