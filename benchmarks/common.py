"""Command-line options and inputs shared by the benchmark files."""
from __future__ import annotations

import argparse
import os

# Compile torch.compile contenders in this process: inductor's pool of compile
# workers otherwise starts in the background and slows the timings that follow.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
from structlik import Stencil, backends  # noqa: E402

# (B, C, H, W, stencil) by name.
SIZES = {
    "B64-C1-64x64-r1": (64, 1, 64, 64, Stencil(1)),
    "B64-C1-64x64-r2": (64, 1, 64, 64, Stencil(2)),
    "B64-C1-64x64-r3": (64, 1, 64, 64, Stencil(3)),
    "B16-C1-64x64-r2": (16, 1, 64, 64, Stencil(2)),
    "B8-C3-128x128-r2": (8, 3, 128, 128, Stencil(2)),
    "B16-C1-256x256-r3": (16, 1, 256, 256, Stencil(3)),
}
# What each benchmark runs by default: on a CPU, the sizes the CPU-kernel issue
# sets targets for; on a GPU, those and the sizes of the GPU issue's targets.
_CPU = ["B64-C1-64x64-r1", "B64-C1-64x64-r3", "B8-C3-128x128-r2"]
DEFAULT_SIZES = {
    ("nll", "cpu"): _CPU,
    ("nll", "cuda"): _CPU + ["B16-C1-256x256-r3"],
    ("solve_upper", "cpu"): _CPU,
    ("solve_upper", "cuda"): _CPU + ["B64-C1-64x64-r2"],
}
QUICK = {"B4-C1-16x16-r1": (4, 1, 16, 16, Stencil(1)), "B2-C3-24x20-r2d12": (2, 3, 24, 20, Stencil(2, (1, 2)))}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    p.add_argument("--sizes", nargs="*", help=f"any of {list(SIZES)} (default: the targets' sizes for the device)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per CPU measurement")
    return p


def selected_sizes(args, family: str):
    if args.quick:
        return dict(QUICK)
    device_type = torch.device(args.device).type
    names = args.sizes or DEFAULT_SIZES[(family, "cpu" if device_type == "cpu" else "cuda")]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; expected any of {list(SIZES)}")
    return {name: SIZES[name] for name in names}


def fused_backend(device: torch.device):
    """The compiled backend for this device: the CPU extension or the Triton kernels."""
    name = "cpu" if device.type == "cpu" else "triton"
    if not backends.available(name):
        raise SystemExit(f"the {name} backend is unavailable: {backends.why_unavailable(name)}")
    return name, backends.get(name)


def compiled_lazily(fn):
    """``torch.compile(fn)``, made at its first call: calling torch.compile at all switches
    Distribution validation off for the process, so contenders that compile are made and
    run last (harness.Contender.compiles)."""
    compiled = None

    def run(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args)
    return run


def make_inputs(B, C, H, W, stencil, dtype, device, seed=0):
    """x (no grad, like data) and loc, log_diag, off_diag (with grad, like a decoder's outputs)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    loc = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    x = loc + torch.randn(B, C, H, W, generator=g, dtype=dtype)
    log_diag = 0.3 * torch.randn(B, C, H, W, generator=g, dtype=dtype)
    off_diag = (0.3 / stencil.S ** 0.5) * torch.randn(B, C * stencil.S, H, W, generator=g, dtype=dtype)
    return tuple(t.to(device) for t in (x, loc, log_diag, off_diag))


def element_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
