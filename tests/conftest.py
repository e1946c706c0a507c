import os

import torch

# Where the tests' tensors live. Without a GPU (CI), Triton kernels run on CPU
# tensors through the interpreter, which must be switched on before any kernel
# is defined. With one, the same tests run on CUDA tensors, unchanged: tensors
# are created on the default device. STRUCTLIK_TEST_DEVICE overrides the choice.
TEST_DEVICE = os.environ.get("STRUCTLIK_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
# Every output and buffer the C++ and Triton kernels allocate starts as NaN (csrc/torch_api.h,
# structlik/kernels/common.py): an element a kernel forgets to write fails a comparison.
os.environ.setdefault("STRUCTLIK_POISON_EMPTY", "1")
# One thread per pytest-xdist worker (the README's `-n auto`): two workers of two OpenMP threads each on
# a 2-core machine wait on each other's barriers far longer than the parallelism saves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    torch.set_default_device(TEST_DEVICE)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import itertools  # noqa: E402

from helpers import SHAPES, STENCILS, available_backends  # noqa: E402
import structlik  # noqa: E402
from structlik import backends  # noqa: E402
from structlik.ops import _forced  # noqa: E402

settings.register_profile(
    "structlik", max_examples=15, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "structlik"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _validation_on():
    """Every test starts with Distribution validation on, the default users have: the first
    torch.compile of the process switches it off for good (torch/_dynamo/eval_frame.py),
    which would silently turn the value checks of every later test off."""
    torch.distributions.Distribution.set_default_validate_args(True)
    structlik.head.reset_warnings()      # the ill-conditioning warning is once per process
    backends.sync()         # the kernels STRUCTLIK_BACKEND asks for, before a first call inside torch.compile
    yield


@pytest.fixture
def backend(request, monkeypatch):
    """Force the backend named by the parametrisation (see pytest_generate_tests), and only in this test."""
    monkeypatch.setitem(_forced._requested, "name", request.param)
    backends.sync()         # installed now: a test may call the ops inside torch.compile first
    yield request.param
    monkeypatch.undo()
    backends.sync()


# The interpreter runs Triton kernels at ~16 ms per program instance, so the
# Triton backend gets one shape per stencil (every stencil kind and every
# shape still appear) instead of the full cross product the others get.
INTERPRETED = ("triton",)


def pytest_configure(config):
    config.addinivalue_line("markers", "not_interpreted: too slow for backends run by an interpreter (Triton on CPU)")
    config.addinivalue_line("markers", "backends(*names): run the test on these of the available backends only")
    config.addinivalue_line("markers", "slow: the Triton interpreter, the ahead-of-time compile and the VAE runs; "
                                       "pytest -m 'not slow' is the inner loop, the README's command runs all")


# Modules whose tests are slow whatever their backend: the sm_90 compile (a subprocess) and the
# reference VAE's training runs.
SLOW_MODULES = ("test_triton_aot.py", "test_vae.py")


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test run on an interpreted backend (Triton on CPU tensors: ~16 ms per
    program instance) and every test of SLOW_MODULES."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        params = getattr(item, "callspec", None)
        backend = params.params.get("backend") if params is not None else None
        if item.path.name in SLOW_MODULES or (interpreted and backend in INTERPRETED):
            item.add_marker(pytest.mark.slow)


def pytest_generate_tests(metafunc):
    """Run every test that takes ``backend`` once per backend available on CPU tensors,
    crossed with (shape, stencil) when it takes those too."""
    if "backend" not in metafunc.fixturenames:
        return
    chosen = set()
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        chosen |= {n.strip() for n in (names.split(",") if isinstance(names, str) else names)}
    if "backend" in chosen:
        return          # the test chose its backends itself
    names = available_backends(TEST_DEVICE)
    only = metafunc.definition.get_closest_marker("backends")
    if only is not None:
        names = [n for n in names if n in only.args]
    if metafunc.definition.get_closest_marker("not_interpreted") and os.environ.get("TRITON_INTERPRET") == "1":
        names = [n for n in names if n not in INTERPRETED]
    if not {"shape", "stencil"} <= set(metafunc.fixturenames) or {"shape", "stencil"} & chosen:
        metafunc.parametrize("backend", names, indirect=True)
        return
    params = []
    for name in names:
        if name in INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1":
            combos = [(SHAPES[i % len(SHAPES)], st) for i, st in enumerate(STENCILS)]
        else:
            combos = itertools.product(SHAPES, STENCILS)
        for shape, stencil in combos:
            params.append(pytest.param(name, shape.values[0], stencil.values[0], id=f"{name}-{shape.id}-{stencil.id}"))
    metafunc.parametrize("backend,shape,stencil", params, indirect=["backend"])
