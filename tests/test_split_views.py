"""What users pass: loc, log_diag and off_diag as views of one decoder head (``head.split``).

Every op on every backend reads such views in place and gives the contiguous
result, values and gradients (the gradient reaches the head); a distribution's
samples come from its parameters without copying them per sample.
"""
import pytest
import torch

from helpers import make_params
from structlik import Stencil, StructuredNormal, ops, reference
from structlik.distribution import standard_normal

# Odd sizes, and an extra channel after off_diag so no view starts or ends at the head's edge.
CASES = [
    pytest.param(Stencil(1), (2, 3, 5, 4), id="r1-B2-C3-5x4"),
    pytest.param(Stencil(2, (1, 3)), (3, 1, 7, 6), id="r2-d13-B3-C1-7x6"),
]
N_BASIS = 3


def head_of(*params):
    """A leaf head holding the parameters side by side, between two unused channels."""
    B, _, H, W = params[0].shape
    spare = torch.randn(B, 1, H, W, dtype=params[0].dtype)
    return torch.cat([spare, *params, spare], dim=1).requires_grad_()


def split(head, *channels):
    """The parameters' views, as a decoder's head.split gives them (the spare channels dropped)."""
    return head.split([1, *channels, head.shape[1] - 1 - sum(channels)], dim=1)[1:-1]


def make(stencil, shape, basis=False):
    B, C, H, W = shape
    loc, log_diag, off_diag = make_params(shape, stencil)
    x = loc + torch.randn(shape, dtype=loc.dtype)
    if basis:
        return x, loc, log_diag, 0.3 * torch.randn(B, C * N_BASIS, H, W, dtype=loc.dtype)
    return x, loc, log_diag, off_diag


def op_calls(stencil, shape):
    """(name, channels of the views, op of (x, *views)) for every op of the contract."""
    C, S = shape[1], stencil.S
    basis = 0.3 * torch.randn(S, N_BASIS, dtype=torch.float64)
    yield "nll", (C, C, C * S), lambda x, m, s, w: ops.nll(x, m, s, w, stencil)
    yield "nll_basis", (C, C, C * N_BASIS), lambda x, m, s, c: ops.nll_basis(x, m, s, c, basis, stencil)
    for name in ("apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t"):
        yield name, (C, C, C * S), lambda x, m, s, w, op=getattr(ops, name): op(m, s, w, stencil)
    yield "precision_diagonal", (C, C, C * S), lambda x, m, s, w: ops.precision_diagonal(s, w, stencil)


@pytest.mark.parametrize("stencil,shape", CASES)
def test_every_op_reads_split_views_like_contiguous_tensors(stencil, shape, backend):
    for name, channels, op in op_calls(stencil, shape):
        x, *params = make(stencil, shape, basis=name == "nll_basis")
        head = head_of(*params)
        views = split(head, *channels)
        assert not views[-1].is_contiguous()
        got = op(x, *views)
        weights = torch.randn_like(got)
        (grad_head,) = torch.autograd.grad((got * weights).sum(), head)

        leaves = [t.detach().clone().requires_grad_() for t in params]
        expected = op(x, *leaves)
        grads = torch.autograd.grad((expected * weights).sum(), leaves, allow_unused=True)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)
        for g, e in zip(split(grad_head, *channels), grads):
            torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-12, atol=1e-12,
                                       msg=name)
        assert grad_head[:, [0, -1]].abs().sum() == 0, name      # the unused channels get no gradient


@pytest.mark.parametrize("stencil,shape", CASES)
def test_other_layouts_are_copied_once_and_give_the_same_result(stencil, shape, backend):
    """A channels-last x and a transposed (non-contiguous plane) off_diag still work."""
    x, loc, log_diag, off_diag = make(stencil, shape)
    x_cl = x.to(memory_format=torch.channels_last)
    w_t = off_diag.transpose(2, 3).contiguous().transpose(2, 3)      # each plane column-major
    torch.testing.assert_close(ops.nll(x_cl, loc, log_diag, w_t, stencil),
                               ops.nll(x, loc, log_diag, off_diag, stencil), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stencil,shape", CASES)
def test_rsample_of_many_samples_on_split_views(stencil, shape, backend):
    """rsample((4, 2)) solves every sample against the same parameters: values equal one
    solve per sample, gradients equal those of per-sample solves on copies."""
    C, S = shape[1], stencil.S
    _, *params = make(stencil, shape)
    head = head_of(*params)
    loc, log_diag, off_diag = split(head, C, C, C * S)
    torch.manual_seed(7)
    got = StructuredNormal(loc, log_diag, off_diag, stencil).rsample((4, 2))
    assert got.shape == (4, 2, *shape)
    (grad_head,) = torch.autograd.grad(got.square().sum(), head)

    torch.manual_seed(7)
    z = standard_normal((4, 2, *shape), torch.float64, loc.device).reshape(8, *shape)   # rsample's z
    leaves = [t.detach().clone().requires_grad_() for t in params]
    # the oracle, not the backend under test (interpreted, 8 more solves would take a minute)
    expected = torch.stack([leaves[0] + reference.solve_upper(z[i], leaves[1], leaves[2], stencil)
                            for i in range(8)])
    grads = torch.autograd.grad(expected.square().sum(), leaves)
    torch.testing.assert_close(got.reshape(8, *shape), expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(split(grad_head, C, C, C * S), grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stencil,shape", CASES)
def test_nll_of_a_head_takes_the_head_whole(stencil, shape, backend):
    """Views of a head that needs a gradient go to the head op (its gradient in one piece);
    x's gradient, when asked for, is minus loc's; float64 gradcheck through the views."""
    C, S = shape[1], stencil.S
    x, *params = make(stencil, shape)
    head = head_of(*params)
    loc, log_diag, off_diag = split(head, C, C, C * S)
    assert ops.head_of(loc, log_diag, off_diag) == (head, 1)
    assert ops.head_of(loc, off_diag[:, :C], log_diag) is None            # not in head.split's order
    with torch.no_grad():
        assert ops.head_of(loc, log_diag, off_diag) is None                # no gradient wanted: plain views
    x = x.requires_grad_()
    got = ops.nll(x, loc, log_diag, off_diag, stencil)
    grad_x, grad_head = torch.autograd.grad(got.sum(), (x, head))
    torch.testing.assert_close(grad_x, -split(grad_head, C, C, C * S)[0])
    check = head.detach().clone().requires_grad_()
    fast = backend == "triton"     # interpreted: a random projection of the Jacobian
    assert torch.autograd.gradcheck(lambda h: ops.nll(x.detach(), *split(h, C, C, C * S), stencil), (check,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


def test_a_slice_autograd_does_not_record_gets_no_gradient():
    """A slice taken under torch.no_grad() (no grad_fn, yet requires_grad says True) sends
    nothing to the head, as in PyTorch; one with a hook or a retained gradient gets its own."""
    stencil, C = Stencil(1), 2
    S = stencil.S
    x, *params = make(stencil, (2, C, 5, 4))
    head = head_of(*params)
    with torch.no_grad():
        loc = split(head, C, C, C * S)[0]
    _, log_diag, off_diag = split(head, C, C, C * S)
    assert ops.head_of(loc, log_diag, off_diag) is None
    (grad_head,) = torch.autograd.grad(ops.nll(x, loc, log_diag, off_diag, stencil).sum(), head)
    assert split(grad_head, C, C, C * S)[0].abs().sum() == 0
    expected = torch.autograd.grad(ops.nll(x, loc.detach(), log_diag, off_diag, stencil).sum(), head)[0]
    torch.testing.assert_close(grad_head, expected, rtol=0, atol=0)

    loc, log_diag, off_diag = split(head, C, C, C * S)
    seen = []
    log_diag.register_hook(seen.append)
    off_diag.retain_grad()
    assert ops.head_of(loc, log_diag, off_diag) is None
    ops.nll(x, loc, log_diag, off_diag, stencil).sum().backward()
    assert len(seen) == 1 and off_diag.grad is not None
    torch.testing.assert_close(seen[0], split(head.grad, C, C, C * S)[1], rtol=0, atol=0)


def test_rsample_broadcast_parameters():
    """Parameters without a batch dim (stride 0 after expand) sample like explicit copies."""
    stencil = Stencil(1)
    loc, log_diag, off_diag = make_params((1, 2, 4, 5), stencil)
    shared = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    torch.manual_seed(3)
    got = StructuredNormal(shared, log_diag[0], off_diag[0], stencil).rsample((2,))
    torch.manual_seed(3)
    expected = StructuredNormal(shared, log_diag.repeat(3, 1, 1, 1), off_diag.repeat(3, 1, 1, 1),
                                stencil).rsample((2,))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
