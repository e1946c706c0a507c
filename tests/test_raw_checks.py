"""Issue #39 item 1: every raw ``torch.ops.structlik`` op checks every tensor's shape, dtype and
device before a kernel reads it, on every backend (the Triton launches and the reference through
structlik/ops/_raw_checks.py, the C++ kernels by their own checks), naming the argument: each op
called with each of its tensors one row short, one channel short and in the other dtype."""
import pytest
import torch

from structlik import Stencil, backends  # noqa: F401  (registers the ops)

ST = Stencil(1)
OFF = ST.flat_offsets
B, C, H, W = 2, 2, 5, 6
L = 8          # the band length of radius 1 at W = 6: b = W + 1


def t(*shape):
    return 0.1 * torch.randn(*shape)


def valid_calls():
    """op -> (positional arguments, the names of its tensor arguments in order)."""
    ld, od, img, xi = t(B, C, H, W), t(B, C * ST.S, H, W), t(B, C, H, W), t(B, 1, H, W)
    basis = t(ST.S, 2)
    head = t(B, C * (2 + ST.S) + 1, H, W)
    image = {name: ((img, ld, od, OFF, xi), [arg, "log_diag", "off_diag", "offsets", "cross"])
             for name, arg in (("apply_upper", "r"), ("apply_upper_t", "y"), ("solve_upper", "z"),
                               ("solve_upper_t", "g"))}
    return {
        **image,
        "precision_diagonal": ((ld, od, OFF, xi), ["log_diag", "off_diag", "offsets", "cross"]),
        "covariance_band_backward": ((t(B, C * L, H, W), ld, od, t(B, C * L, H, W), OFF),
                                     ["grad", "log_diag", "off_diag", "band", "offsets"]),
        "nll": ((img, img.clone(), ld, od, None, OFF, False, xi),
                ["x", "loc", "log_diag", "off_diag", "basis", "offsets", "store_u", "cross"]),
        "nll_basis": ((img, img.clone(), ld, t(B, C * 2, H, W), basis, OFF, False, xi),
                      ["x", "loc", "log_diag", "off_diag", "basis", "offsets", "store_u", "cross"]),
        "nll_backward": ((t(B), img, img.clone(), ld, od, None, img.clone(), OFF, xi),
                         ["grad", "x", "loc", "log_diag", "off_diag", "basis", "u", "offsets", "cross"]),
        "nll_head": ((img, head, 0, OFF, False, True), ["x", "head", "c0", "offsets", "store_u", "cross"]),
        "weight_grad": ((img, img.clone(), OFF, B), ["a", "b", "offsets", "batch"]),
    }


def _op(name):
    return getattr(torch.ops.structlik, "nll" if name == "nll_basis" else name)


def _wrongs(value):
    """The same tensor one row short, one channel short, and in float64."""
    yield "row", value[..., 1:, :] if value.dim() == 4 else value[1:]
    if value.dim() == 4:
        yield "channel", value[:, 1:]
    yield "dtype", value.double()


CASES = [(op, i) for op, (args, names) in valid_calls().items() for i, a in enumerate(args)
         if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("op, index", CASES, ids=[f"{op}-{valid_calls()[op][1][i]}" for op, i in CASES])
@pytest.mark.backends("reference", "cpu", "triton")
def test_each_wrong_tensor_is_named(op, index, backend):
    args, names = valid_calls()[op]
    name = names[index]
    for what, wrong in _wrongs(args[index]):
        if what == "dtype" and (name in ("band", "grad")):
            continue        # incoming gradients and the saved band are cast to the parameters' dtype, in every kernel
        if op == "nll_head" and name == "x" and what == "channel":
            continue        # x's C says how many channels of the head are read: one channel fits too
        call = list(args)
        call[index] = wrong
        # the op's reference tensor (log_diag, else x or a) wrong: the others disagree with it, named
        reference = name == ("log_diag" if "log_diag" in names else names[0])
        named = {"off_diag": "off_diag|coeffs", "head": "head|x"}.get(name, name)   # the C++ calls a basis' coeffs so
        with pytest.raises(RuntimeError, match=r"\w+: " if reference else rf"\b({named})\b"):
            _op(op)(*call)


@pytest.mark.backends("reference", "cpu", "triton")
def test_valid_calls_pass(backend):
    """The table's calls are right: each runs (so the tests above fail for their wrong tensor)."""
    for op, (args, _) in valid_calls().items():
        if backend == "triton" and op in ("nll_head",):
            continue
        _op(op)(*args)
