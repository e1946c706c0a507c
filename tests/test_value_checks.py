"""NaN/inf checks: found from each op's result on every backend, named after the argument that holds
them, and free on the success path (no op over the inputs besides the kernels)."""
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
}
for _name, _image in (("apply_upper", "r"), ("apply_upper_t", "y"), ("solve_upper", "z"), ("solve_upper_t", "g")):
    CALLS[_name] = (lambda a, op=getattr(ops, _name): op(a["x"], a["log_diag"], a["off_diag"], ST),
                    ("x", "log_diag", "off_diag"), _image)


# An infinite log_diag where the op has an exact, finite limit, not an error: d = exp(-inf) = 0
# gives a finite U r, U^T y and precision diagonal; d = exp(inf) in a solve pins that pixel to 0.
EXACT_LIMITS = {(op, float("-inf")) for op in ("apply_upper", "apply_upper_t", "precision_diagonal")} | {
    (op, float("inf")) for op in ("solve_upper", "solve_upper_t")}


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
    return sorted({e.name for e in prof.events() if big_inputs_of(e) and e.name not in VIEWS
                   and "structlik" not in e.name})       # the kernels and their autograd nodes


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
        assert ops_over_inputs(lambda: structured_gaussian_nll(x, *head.split([C, C, C * ST.S], dim=1), ST)) == []
