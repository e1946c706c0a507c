"""The Triton kernels as a GPU would get them: compiled ahead of time for sm_90 (no GPU needed), and
exact under the interpreter when an image spans several programs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TEST_DEVICE
from helpers import available_backends, make_params
from structlik import Stencil, ops, reference

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every kernel at the benchmark sizes, float32/float16/bfloat16, compiled for sm_90
    (tools/triton_aot.py, in a process of its own: this one defined the kernels for the
    interpreter)."""
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tools.triton_aot", "--no-results",
                           "--json", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_and_dtype_is_covered(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels >= {"nll_kernel", "nll_backward_kernel", "apply_upper_kernel", "solve_upper_kernel",
                       "weight_grad_kernel", "precision_diagonal_kernel", "covariance_band_kernel",
                       "covariance_band_adjoint_kernel", "covariance_band_grads_kernel"}
    # one NLL sweep for both weight sources: off_diag's planes and the learned basis (BASIS=1)
    for kernel in ("nll_kernel", "nll_backward_kernel"):
        assert {r["constexprs"].split("BASIS=")[1][:1] for r in compiled if r["kernel"] == kernel} == {"0", "1"}
    assert {r["dtypes"] for r in compiled if r["kernel"] == "nll_kernel"} >= {"float32", "float16", "bfloat16"}
    # the training forward (STORE_U, u written for the one-pass backward) and the evaluation one
    assert {r["constexprs"].split("STORE_U=")[1][:1] for r in compiled if r["kernel"] == "nll_kernel"} == {"0", "1"}


def test_coupled_channels_compile_at_the_clients_size(compiled):
    """supn_base's client (B32, 2-channel 128x128, radius 4) with cross weights: every kernel that takes
    them specialised for NCH=2 (and NCH=3 at a smaller size), float32/float16/bfloat16 for the NLL."""
    coupled = {(r["kernel"], r["dtypes"]) for r in compiled
               if r["case"] == "B32-C2-128x128-r4-cross" and "NCH=2" in r["constexprs"]}
    assert coupled >= {(k, "float32") for k in ("nll_kernel", "nll_backward_kernel", "apply_upper_kernel",
                                                 "solve_upper_kernel", "precision_diagonal_kernel")}
    assert {d for k, d in coupled if k in ("nll_kernel", "nll_backward_kernel")} == {"float32", "float16", "bfloat16"}
    assert any("NCH=3" in r["constexprs"] for r in compiled if r["kernel"] == "solve_upper_kernel")


def test_nothing_spills(compiled):
    spilled = [(r["case"], r["kernel"], r["constexprs"], r["dtypes"], r["spill_stores"], r["spill_loads"])
               for r in compiled if r["spill_stores"] or r["spill_loads"] or r["local"]]
    assert spilled == []


def test_every_launch_fits_cudas_grid_limits(compiled):
    """100,000 planes, B=256 at 512x512 radius 3, and one 4096x4096 and six 8192x8192 planes (65,536
    and 262,144 tiles a plane, over the 65,535 of grid axis 1) among them."""
    assert {r["case"] for r in compiled} >= {"B100000-C1-16x16-r1", "B256-C1-512x512-r3", "B1-C1-4096x4096-r3",
                                             "B2-C3-8192x8192-r1"}
    assert [(r["case"], r["kernel"], r["grid"]) for r in compiled if not r["grid_ok"]] == []


@pytest.mark.skipif("triton" not in available_backends(TEST_DEVICE), reason="the Triton backend is unavailable")
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_images_over_several_programs(backend):
    """19x17 = 323 pixels: two programs per plane (256 pixels each), the partial sums of the NLL added."""
    stencil = Stencil(2)
    shape = (1, 2, 19, 17)
    loc, log_diag, off_diag = make_params(shape, stencil, requires_grad=True)
    x = loc.detach() + torch.randn(shape, dtype=torch.float64)
    got = ops.nll(x, loc, log_diag, off_diag, stencil)
    grads = torch.autograd.grad(got.sum(), (loc, log_diag, off_diag))
    expected = reference.nll(x, loc, log_diag, off_diag, stencil)
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, torch.autograd.grad(expected.sum(), (loc, log_diag, off_diag))):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(ops.apply_upper(x, log_diag, off_diag, stencil),
                               reference.apply_upper(x, log_diag, off_diag, stencil))


def test_a_grid_past_cudas_limit_is_refused_by_name():
    """The tiled kernels' one grid axis holds 2^31 - 1 programs: past it, a clear error, not a launch failure."""
    from structlik.kernels.common import grid
    assert grid(6, 262144) == (6 * 262144,)
    with pytest.raises(ValueError, match=r"B\*C = 8192 planes of 262144 tiles each .* split the batch"):
        grid(8192, 262144)


def test_band_model_reads_the_covariance_kernels_sass():
    """tools/band_model.py (docs/kernels.md §4) compiles the band's forward and adjoint for sm_90 and finds
    their chunk loops: no barrier inside (the level loop has the one barrier)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tools.band_model"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and " r" in line[:14]]
    assert len(rows) == 4
    assert all(r[-3].strip().startswith("0, ") and r[-2].strip().startswith("0, ") for r in rows), proc.stdout
