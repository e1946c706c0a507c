"""NaN/inf checks: found from each op's result on every backend, named after the argument that holds
them, and free on the success path (no op over the inputs besides the kernels)."""
import os

import pytest
import torch

from helpers import make_params
from structlik import Stencil, StructuredNormal, ops, structured_gaussian_nll

ST = Stencil(1, (1, 2))
SHAPE = (2, 2, 5, 6)
BAD = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf"),
       pytest.param(float("-inf"), id="-inf")]


def inputs():
    loc, log_diag, off_diag = make_params(SHAPE, ST)
    x = loc + torch.randn(SHAPE, dtype=torch.float64)
    coeffs = 0.3 * torch.randn(2, 2 * 3, 5, 6, dtype=torch.float64)
    basis = 0.3 * torch.randn(ST.S, 3, dtype=torch.float64)
    return dict(x=x, loc=loc, log_diag=log_diag, off_diag=off_diag, coeffs=coeffs, basis=basis)


# (op, the arguments it reads, by name): the image operand of the primitives is x.
CALLS = {
    "nll": (lambda a: ops.nll(a["x"], a["loc"], a["log_diag"], a["off_diag"], ST),
            ("x", "loc", "log_diag", "off_diag")),
    "nll_basis": (lambda a: ops.nll_basis(a["x"], a["loc"], a["log_diag"], a["coeffs"], a["basis"], ST),
                  ("x", "loc", "log_diag", "coeffs", "basis")),
    "precision_diagonal": (lambda a: ops.precision_diagonal(a["log_diag"], a["off_diag"], ST),
                           ("log_diag", "off_diag")),
    "variance": (lambda a: ops.variance(a["log_diag"], a["off_diag"], ST), ("log_diag", "off_diag")),
}
for _name, _image in (("apply_upper", "r"), ("apply_upper_t", "y"), ("solve_upper", "z"), ("solve_upper_t", "g")):
    CALLS[_name] = (lambda a, op=getattr(ops, _name): op(a["x"], a["log_diag"], a["off_diag"], ST),
                    ("x", "log_diag", "off_diag"), _image)


# An infinite log_diag where the op has an exact, finite limit, not an error: d = exp(-inf) = 0
# gives a finite U r, U^T y and precision diagonal; d = exp(inf) in a solve pins that pixel to 0.
EXACT_LIMITS = {(op, float("-inf")) for op in ("apply_upper", "apply_upper_t", "precision_diagonal")} | {
    (op, float("inf")) for op in ("solve_upper", "solve_upper_t", "variance")}


def poison(t, value):
    """One entry that every op reads: pixel (1, 1) of the first plane (its first offsets stay inside)."""
    t = t.clone()
    t.view(-1)[0 if t.dim() == 2 else t.shape[-1] + 1] = value
    return t


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("value", BAD)
def test_each_argument_is_named(op, value, backend):
    call, names, *image = CALLS[op]
    for name in names:
        args = inputs()
        args[name] = poison(args[name], value)
        if name == "log_diag" and (op, value) in EXACT_LIMITS:
            assert torch.isfinite(call(args)).all()
            continue
        shown = image[0] if image and name == "x" else name
        with pytest.raises(ValueError, match=f"^{shown}: contains NaN or infinite values"):
            call(args)


@pytest.mark.parametrize("value", BAD)
def test_distribution_names_its_arguments(value, backend):
    args = inputs()
    dist = StructuredNormal(args["loc"], args["log_diag"], args["off_diag"], ST)
    with pytest.raises(ValueError, match="^value: contains NaN"):
        dist.log_prob(poison(args["x"], value))
    for name in ("loc", "log_diag", "off_diag"):
        bad = dict(args, **{name: poison(args[name], value)})
        dist = StructuredNormal(bad["loc"], bad["log_diag"], bad["off_diag"], ST)
        if not (name == "log_diag" and value == float("inf")):      # the pixel pinned to its mean: exact
            with pytest.raises(ValueError, match=f"^{name}: contains NaN"):
                dist.rsample()
        with pytest.raises(ValueError, match=f"^{name}: contains NaN"):
            dist.log_prob(args["x"])
    with_basis = StructuredNormal(args["loc"], args["log_diag"], args["coeffs"], ST, basis=poison(args["basis"], value))
    with pytest.raises(ValueError, match="^basis: contains NaN"):
        with_basis.rsample()
    with pytest.raises(ValueError, match="^basis: contains NaN"):
        with_basis.log_prob(args["x"])


def test_validate_args_of_the_instance_wins_over_the_default():
    args = inputs()
    x = poison(args["x"], float("inf"))
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        dist = StructuredNormal(args["loc"], args["log_diag"], args["off_diag"], ST, validate_args=True)
        with pytest.raises(ValueError, match="^value: contains NaN"):
            dist.log_prob(x)
        assert not torch.isfinite(structured_gaussian_nll(x, args["loc"], args["log_diag"], args["off_diag"], ST,
                                                          reduction="none")).all()
    finally:
        torch.distributions.Distribution.set_default_validate_args(True)
    quiet = StructuredNormal(args["loc"], args["log_diag"], args["off_diag"], ST, validate_args=False)
    assert not torch.isfinite(quiet.log_prob(x)).all()


def test_overflow_of_finite_inputs_is_returned_not_blamed():
    args = inputs()
    args["log_diag"] = args["log_diag"].float() + 100.0          # exp(100) overflows float32
    out = ops.nll(*(args[n].float() for n in ("x", "loc")), args["log_diag"], args["off_diag"].float(), ST)
    assert torch.isinf(out).all()


def test_nan_from_finite_inputs_is_raised_not_returned(backend):
    """NaN is no rounding of a true value: d r = inf beside w r' = -inf (float32) raises, naming
    the overflow (the reference and Triton; the C++ kernels' fused multiply-adds keep the exact
    product and give inf); the same op with every term +inf returns inf (a huge value, rounded)."""
    shape = (1, 1, 4, 4)
    r, log_diag = torch.full(shape, 3e38), torch.ones(shape)
    for name, image in (("apply_upper", "r"), ("apply_upper_t", "y")):
        op = getattr(ops, name)
        try:
            out = op(r, log_diag, torch.full((1, ST.S, 4, 4), -3.0), ST)
        except ValueError as e:
            assert str(e).startswith(f"{name}: the result has NaN values although {image}, log_diag, off_diag are "
                                     f"finite: an intermediate value overflowed torch.float32"), e
        else:
            assert backend == "cpu" and not torch.isnan(out).any(), out
        assert torch.isinf(op(r, log_diag, torch.full((1, ST.S, 4, 4), 3.0), ST)).any()


def big_inputs_of(event):
    """Whether any input of a profiled op has at least one image plane per image."""
    plane = SHAPE[0] * SHAPE[2] * SHAPE[3]
    return any(isinstance(s, list) and s and torch.Size(s).numel() >= plane for s in event.input_shapes)


# View ops read no data; structlik's own ops are the kernels (and their schema-level wrappers).
VIEWS = {"aten::split", "aten::split_with_sizes", "aten::narrow", "aten::slice", "aten::as_strided", "aten::view",
         "aten::reshape", "aten::_reshape_alias", "aten::alias", "aten::detach", "aten::expand", "aten::unbind",
         "aten::select", "aten::lift_fresh", "detach"}


def ops_over_inputs(fn):
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    # the kernels and their autograd nodes; and the NaN fill of their outputs the tests ask for
    poison = {"aten::fill_"} if os.environ.get("STRUCTLIK_POISON_EMPTY") == "1" else set()
    return sorted({e.name for e in prof.events() if big_inputs_of(e) and e.name not in VIEWS | poison
                   and "structlik" not in e.name})


def test_public_nll_runs_no_op_over_the_inputs_but_the_kernels():
    """The README's path: one head split into views, the default validation (asserted on)."""
    assert torch.distributions.Distribution._validate_args
    args = inputs()
    C = SHAPE[1]
    head = torch.cat([args["loc"], args["log_diag"], args["off_diag"]], dim=1).float().requires_grad_()
    x = args["x"].float()

    def forward_backward():
        loss = structured_gaussian_nll(x, *head.split([C, C, C * ST.S], dim=1), ST)
        torch.autograd.grad(loss, head)

    forward_backward()                                     # warm up: lazy imports, caches
    assert ops_over_inputs(forward_backward) == []
    with torch.no_grad():
        assert ops_over_inputs(lambda: structured_gaussian_nll(x, *head.split([C, C, C * ST.S], dim=1),
                                                               ST)) == []


def unread_nan(args):
    """NaN and inf in weights the image never reads: offset (0, 2) at the last two columns,
    (2, -2) on the last two rows (ST = Stencil(1, (1, 2)))."""
    bad = args["off_diag"].clone()
    i, j = ST.offsets.index((0, 2)), ST.offsets.index((2, -2))
    bad[:, i, :, -2:] = float("nan")              # channel 0
    bad[:, ST.S + j, -1, :] = float("inf")        # channel 1
    return bad


@pytest.mark.parametrize("validate", [True, False])
def test_unread_weights_change_nothing(validate, backend):
    if backend == "triton" and not validate and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the kernels do not read the validation flag: validate=True covers the interpreted Triton run")
    """Weights that point outside the image are not part of U (contract §1): every op on every
    backend gives the result of 0 there, and gradient 0 to them, whatever they hold (the
    reference raised "off_diag: contains NaN" for four ops of six, the kernels returned finite
    values and precision_diagonal's gradient was NaN there on every backend)."""
    args = inputs()
    bad = unread_nan(args)
    clean = torch.where(torch.isfinite(bad), bad, 0)
    torch.distributions.Distribution.set_default_validate_args(validate)
    try:
        for op, (call, names, *_) in CALLS.items():
            if "off_diag" not in names:
                continue
            w = bad.clone().requires_grad_()
            got = call({**args, "off_diag": w})
            (grad,) = torch.autograd.grad(got.sum(), w)
            w0 = clean.clone().requires_grad_()
            expected = call({**args, "off_diag": w0})
            (grad0,) = torch.autograd.grad(expected.sum(), w0)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=op)
            torch.testing.assert_close(grad, grad0, rtol=1e-12, atol=1e-12, msg=op)
            assert (grad[~torch.isfinite(bad)] == 0).all(), op
        dist, dist0 = (StructuredNormal(args["loc"], args["log_diag"], w, ST) for w in (bad, clean))
        torch.testing.assert_close(dist.log_prob(args["x"]), dist0.log_prob(args["x"]), rtol=1e-12, atol=1e-12)
        torch.manual_seed(2)
        sample = dist.rsample()
        torch.manual_seed(2)
        torch.testing.assert_close(sample, dist0.rsample(), rtol=1e-12, atol=1e-12)
    finally:
        torch.distributions.Distribution.set_default_validate_args(True)
