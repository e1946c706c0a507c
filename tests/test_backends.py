"""Dispatch: one op namespace whose kernels the dispatcher picks by device; STRUCTLIK_BACKEND;
the warn-once fallback to the reference."""
import warnings

import pytest
import torch

from structlik import Stencil, backends, ops, reference
from structlik.ops import _forced, _library

OPS = ("apply_upper", "apply_upper_t", "solve_upper", "solve_upper_t", "weight_grad", "precision_diagonal",
       "nll", "nll_backward", "nll_head", "nll_head_backward", "covariance_band", "covariance_band_backward")


def test_one_namespace_with_a_kernel_per_device():
    """Every op is torch.ops.structlik.<op>: the reference serves devices without a kernel
    (CompositeExplicitAutograd), C++ the CPU key, Triton the CUDA key; a fake kernel and an
    autograd formula each."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    defined = {op.split("::")[1].split(".")[0] for op in torch._C._dispatch_get_all_op_names()
               if op.startswith("structlik::")}
    assert defined == set(OPS) | {"standard_normal"}       # the NLL family: four ops, variants as arguments
    for name in OPS:
        qualname = f"structlik::{name}"
        assert has(qualname, "CompositeExplicitAutograd") and has(qualname, "Meta"), name
        assert name in _library.REFERENCE_KERNELS and name in _library.TRITON_KERNELS
        if _library.TRITON_INSTALLED:
            assert has(qualname, "CUDA"), name
        if not name.endswith("_backward"):
            assert has(qualname, "Autograd"), name
    if backends.available("cpu") and backends.forced() is None:
        assert all(has(f"structlik::{name}", "CPU") for name in OPS)     # every backend has every op


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setitem(_forced._requested, "name", "fortran")   # as STRUCTLIK_BACKEND=fortran at import
    with pytest.raises(ValueError, match="STRUCTLIK_BACKEND: expected one of"):
        ops.apply_upper(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 4, 2, 2), Stencil(1))


@pytest.mark.skipif(not backends.available("cpu"), reason="no compiled CPU extension")
def test_forced_reference_overrides_the_cpu_kernels(monkeypatch):
    calls = []
    kernel = _library.REFERENCE_KERNELS["apply_upper"]
    monkeypatch.setitem(_library.REFERENCE_KERNELS, "apply_upper", lambda *a: calls.append(1) or kernel(*a))
    stencil = Stencil(1)
    args = torch.randn(1, 1, 3, 3), 0.1 * torch.randn(1, 1, 3, 3), 0.1 * torch.randn(1, 4, 3, 3)
    with backends.using("reference"):
        assert backends.name_of(torch.device("cpu")) == "reference"
        forced = ops.apply_upper(*args, stencil)
    assert calls == [1]
    assert backends.name_of(torch.device("cpu")) == "cpu"       # the C++ kernel is back
    torch.testing.assert_close(ops.apply_upper(*args, stencil), forced)
    assert calls == [1]


def test_forced_backend_on_wrong_device(monkeypatch):
    if not backends.available("cpu"):
        pytest.skip("no compiled CPU extension")
    monkeypatch.setitem(_forced._requested, "name", "cpu")
    with pytest.raises(RuntimeError, match="does not run on meta tensors"):
        backends.name_of(torch.device("meta"))


def test_meta_tensors_take_the_fake_kernels():
    stencil = Stencil(2)
    out = ops.nll(*(torch.empty(2, 3, 8, 8, device="meta") for _ in range(3)),
                  torch.empty(2, 3 * stencil.S, 8, 8, device="meta"), stencil)
    assert out.shape == (2,) and out.device.type == "meta"


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    """A CPU without the extension: the reference serves, with one warning that says why."""
    monkeypatch.setitem(_forced._requested, "name", None)
    monkeypatch.setattr(_library, "CPU_UNAVAILABLE", "ImportError: pretend it failed to build")
    monkeypatch.setitem(_forced._why_unavailable, "cpu", "ImportError: pretend it failed to build")
    monkeypatch.setattr(_forced, "_warned", set())
    with pytest.warns(RuntimeWarning, match="pretend it failed to build"):
        assert backends.name_of(torch.device("cpu")) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the second call is silent
        backends.name_of(torch.device("cpu"))
    monkeypatch.setitem(_forced._requested, "name", "cpu")
    with pytest.raises(RuntimeError, match="STRUCTLIK_BACKEND=cpu but that backend is unavailable"):
        backends.sync()


def test_get_and_why_unavailable(monkeypatch):
    kernels = backends.get("reference")       # structlik.reference itself, on any device, without validation
    stencil = Stencil(1)
    x, s, w = torch.randn(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), 0.1 * torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(kernels.nll(x, 0 * x, s, w, stencil), reference.nll(x, 0 * x, s, w, stencil))
    torch.testing.assert_close(kernels.apply_upper(x, s, w, stencil), reference.apply_upper(x, s, w, stencil))
    assert backends.why_unavailable("reference") is None
    monkeypatch.setitem(_forced._why_unavailable, "cpu", "ImportError: pretend it failed to build")
    assert backends.why_unavailable("cpu") == "ImportError: pretend it failed to build"
    with pytest.raises(RuntimeError, match="cpu backend is unavailable .ImportError: pretend"):
        backends.get("cpu")
    with pytest.raises(ValueError, match="backend: expected one of"):
        backends.get("gpu")


@pytest.mark.skipif(not backends.available("cpu"), reason="no compiled CPU extension")
def test_get_serves_only_its_own_device():
    stencil = Stencil(1)
    x, s, w = torch.randn(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), torch.zeros(1, 4, 3, 3)
    torch.testing.assert_close(backends.get("cpu").nll(x, x, s, w, stencil), reference.nll(x, x, s, w, stencil))
    with backends.using("reference"), pytest.raises(RuntimeError, match="the reference backend does"):
        backends.get("cpu").nll(x, x, s, w, stencil)


def test_a_cpu_without_the_extension_runs_the_reference():
    """No C++ library (a failed build): the ops exist all the same (their schemas are Python's), the
    dispatcher serves CPU tensors with the reference, and the user gets one warning saying why."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["structlik._C"] = None          # import structlik._C raises ImportError
        import torch, structlik
        from structlik import Stencil, backends, ops, reference
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("structlik::nll", "CPU")
        st = Stencil(1)
        g = torch.Generator().manual_seed(0)
        x, loc = torch.randn(2, 1, 5, 4, generator=g, dtype=torch.float64), torch.zeros(2, 1, 5, 4, dtype=torch.float64)
        s = (0.1 * torch.randn(2, 1, 5, 4, generator=g, dtype=torch.float64)).requires_grad_()
        w = (0.1 * torch.randn(2, 4, 5, 4, generator=g, dtype=torch.float64)).requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ops.nll(x, loc, s, w, st)
            ops.nll(x, loc, s, w, st)
        messages = [str(c.message) for c in caught]
        assert len(messages) == 1 and messages[0].startswith("structlik: the cpu kernels are unavailable"), messages
        assert backends.name_of(torch.device("cpu")) == "reference"
        torch.testing.assert_close(out, reference.nll(x, loc, s, w, st))
        got = torch.autograd.grad(out.sum(), (s, w))
        expected = torch.autograd.grad(reference.nll(x, loc, s, w, st).sum(), (s, w))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
        z = ops.solve_upper(x, s.detach(), w.detach(), st)
        torch.testing.assert_close(ops.apply_upper(z, s.detach(), w.detach(), st), x)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_using_is_guarded_across_threads():
    """The override is process-wide (the dispatcher's): a second thread entering while a block is
    open is refused (interleaved blocks left the process on the reference backend); nesting in
    one thread works, and the defaults come back after the last exit."""
    import threading
    inside, release, errors = threading.Event(), threading.Event(), []

    def holder():
        with backends.using("reference"):
            with backends.using("reference"):       # nesting in one thread
                inside.set()
                release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(10)
    try:
        with backends.using("reference"):
            pass
    except RuntimeError as e:
        errors.append(str(e))
    release.set()
    thread.join(10)
    assert len(errors) == 1 and "another thread" in errors[0]
    assert backends.name_of(torch.device("cpu")) == ("cpu" if backends.available("cpu") else "reference")
    with backends.using("reference"):                # free again once the holder left
        assert backends.name_of(torch.device("cpu")) == "reference"


def test_backend_is_read_once_and_using_writes_no_environment():
    """STRUCTLIK_BACKEND is read when structlik is imported (#38 item 4): setting it later changes
    nothing, and using() leaves os.environ as it was."""
    import os
    before = dict(os.environ)
    with backends.using("reference"):
        assert backends.name_of(torch.device("cpu")) == "reference"
        assert dict(os.environ) == before
    assert dict(os.environ) == before
    code = ("import os, torch, structlik\n"
            "from structlik import backends\n"
            "assert backends.name_of(torch.device('cpu')) == 'reference'\n"
            "os.environ['STRUCTLIK_BACKEND'] = 'cpu'\n"
            "assert backends.name_of(torch.device('cpu')) == 'reference'\n"
            "print('ok')\n")
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["STRUCTLIK_BACKEND"] = "reference"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
