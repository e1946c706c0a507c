"""Dispatch: STRUCTLIK_BACKEND, device rules, and the warn-once fallback."""
import warnings

import pytest
import torch

from structlik import Stencil, backends, ops, reference


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="STRUCTLIK_BACKEND: expected one of"):
        backends.backend_for(torch.device("cpu"))


def test_forced_reference(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.backend_for(torch.device("cpu")) is reference
    assert backends.name_of(torch.device("cpu")) == "reference"


def test_forced_backend_on_wrong_device(monkeypatch):
    if not backends.available("cpu"):
        pytest.skip("no compiled CPU extension")
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    with pytest.raises(RuntimeError, match="does not run on meta tensors"):
        backends.backend_for(torch.device("meta"))


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setitem(backends._loaded, "cpu", None)
    monkeypatch.setitem(backends._why_unavailable, "cpu", "ImportError: pretend it failed to build")
    monkeypatch.setattr(backends, "_warned", set())
    stencil = Stencil(1)
    s = torch.zeros(1, 1, 3, 3)
    w = torch.zeros(1, 4, 3, 3)
    with pytest.warns(RuntimeWarning, match="pretend it failed to build"):
        out = ops.apply_upper(torch.ones(1, 1, 3, 3), s, w, stencil)
    torch.testing.assert_close(out, torch.ones(1, 1, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the second call is silent
        ops.apply_upper(torch.ones(1, 1, 3, 3), s, w, stencil)
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    with pytest.raises(RuntimeError, match="STRUCTLIK_BACKEND=cpu but that backend is unavailable"):
        backends.backend_for(torch.device("cpu"))


def test_get_and_why_unavailable(monkeypatch):
    assert backends.get("reference") is backends.reference and backends.why_unavailable("reference") is None
    monkeypatch.setitem(backends._loaded, "cpu", None)
    monkeypatch.setitem(backends._why_unavailable, "cpu", "ImportError: pretend it failed to build")
    assert backends.why_unavailable("cpu") == "ImportError: pretend it failed to build"
    with pytest.raises(RuntimeError, match="cpu backend is unavailable .ImportError: pretend"):
        backends.get("cpu")
    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded))
    assert backends.why_unavailable("gpu") == "not built into this version of structlik"
