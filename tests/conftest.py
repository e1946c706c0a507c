import os

# Triton kernels must see this before any of them is defined: it makes them run
# on CPU tensors through the interpreter, so CI checks them without a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from helpers import available_backends  # noqa: E402
from structlik import backends  # noqa: E402

settings.register_profile(
    "structlik", max_examples=15, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "structlik"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=available_backends())
def backend(request, monkeypatch):
    """Run the test once per backend available on CPU tensors."""
    monkeypatch.setenv(backends.ENV_VAR, request.param)
    return request.param
