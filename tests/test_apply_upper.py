"""U r and U^T y (and weight_grad, their weight gradient): against dense matrix products, every
backend against the reference, gradcheck, opcheck."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import TEST_DEVICE
from helpers import (INTERPRETED_CASES, OPCHECK_STENCIL, STENCILS, available_backends, gradcheck_image_op,
                     gradcheck_problems, make_params, opcheck, opcheck_image_op, opcheck_inputs,
                     triton_if_available)
from structlik import Stencil, ops, reference


def test_apply_upper_matches_dense(shape, stencil, backend):
    _, log_diag, off_diag = make_params(shape, stencil)
    B, C, H, W = shape
    r = torch.randn(shape, dtype=torch.float64)
    U = ops.to_dense_upper(log_diag, off_diag, stencil)
    col = r.reshape(B, C, H * W, 1)
    torch.testing.assert_close(ops.apply_upper(r, log_diag, off_diag, stencil), (U @ col).reshape(shape))
    torch.testing.assert_close(ops.apply_upper_t(r, log_diag, off_diag, stencil), (U.mT @ col).reshape(shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_upper_matches_reference(shape, stencil, dtype, backend):
    _, log_diag, off_diag = make_params(shape, stencil, dtype=dtype)
    r = torch.randn(shape, dtype=dtype)
    for name in ("apply_upper", "apply_upper_t"):
        got = getattr(ops, name)(r, log_diag, off_diag, stencil)
        torch.testing.assert_close(got, getattr(reference, name)(r, log_diag, off_diag, stencil))


@pytest.mark.parametrize("value", [-100.0, -87.5, -20.0, 0.0, 50.0, 88.6])
def test_extreme_log_diag_float32(value, backend):
    """Rows whose log_diag leaves the range of the kernels' vectorised float32 exp still match exp()."""
    stencil = STENCILS[0].values[0]
    _, log_diag, off_diag = make_params((1, 1, 3, 17), stencil, dtype=torch.float32)
    log_diag[0, 0, 1, 5] = value                       # one pixel in the middle row
    r = 1e-3 * torch.randn(1, 1, 3, 17)
    got = ops.apply_upper(r, log_diag, off_diag, stencil)
    expected = reference.apply_upper(r, log_diag, off_diag, stencil)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)
    torch.testing.assert_close(ops.precision_diagonal(log_diag, off_diag, stencil),
                               reference.precision_diagonal(log_diag, off_diag, stencil), rtol=4e-6, atol=0)


@pytest.mark.not_interpreted
@given(problem=gradcheck_problems(), name=st.sampled_from(["apply_upper", "apply_upper_t"]))
def test_gradcheck(problem, name, backend):
    gradcheck_image_op(name, *problem, backend)


@pytest.mark.parametrize("backend_name", available_backends(TEST_DEVICE))
@pytest.mark.parametrize("name", ["apply_upper", "apply_upper_t", "weight_grad"])
def test_opcheck(backend_name, name):
    offsets = OPCHECK_STENCIL.flat_offsets
    if name == "weight_grad":
        for batch in (2, 1):        # one image per parameter set, and the 2 images summed into one
            opcheck(backend_name, name, lambda g: (*opcheck_inputs(g)[:2], offsets, batch), True)
    else:
        opcheck_image_op(backend_name, name)


@pytest.mark.parametrize("backend", triton_if_available(TEST_DEVICE), indirect=True)
@pytest.mark.parametrize("stencil,shape", INTERPRETED_CASES)
def test_gradcheck_interpreted_triton(stencil, shape, backend):
    """The registered backward on the Triton kernels (interpreted without a GPU), fast_mode gradcheck."""
    for name in ("apply_upper", "apply_upper_t"):
        gradcheck_image_op(name, stencil, shape, backend)


@pytest.mark.parametrize("stencil,shape,batch", [
    (Stencil(1, (1, 2)), (6, 2, 3, 4), 6), (Stencil(1, (1, 2)), (6, 2, 3, 4), 3), (Stencil(1, (1, 2)), (6, 2, 3, 4), 2),
    (Stencil(2), (3, 1, 5, 3), 3), (Stencil(2), (3, 1, 5, 3), 1), (Stencil(1), (4, 1, 1, 2), 2)])
def test_weight_grad_sums_the_repeats(stencil, shape, batch, backend):
    """weight_grad(a, b, batch): image j of the result is the sum over the images k = j (mod batch)
    of a_k b_{k, p+delta_i}, as the image ops' repeated parameters read them (k % batch)."""
    a, b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    offsets = stencil.flat_offsets
    got = torch.ops.structlik.weight_grad(a, b, offsets, batch)
    per_image = reference.weight_grad(a, b, stencil)
    torch.testing.assert_close(got, per_image.reshape(-1, batch, *per_image.shape[1:]).sum(0))
    # vmapped (the rule folds the vmapped dimension into the images only without repeats)
    stacked = torch.stack([a, 2 * a]), torch.stack([b, b])
    vmapped = torch.func.vmap(lambda s, t: torch.ops.structlik.weight_grad(s, t, offsets, batch))(*stacked)
    torch.testing.assert_close(vmapped, torch.stack([got, 2 * got]))


def test_weight_grad_names_a_wrong_batch(backend):
    a = torch.randn(4, 1, 3, 3)
    for batch in (3, 0, -2):
        with pytest.raises(RuntimeError, match="batch: expected a divisor of a's batch 4"):
            torch.ops.structlik.weight_grad(a, a, Stencil(1).flat_offsets, batch)
