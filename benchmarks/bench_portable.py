"""The portable build (baseline x86-64 + AVX2/AVX-512 clones, the default) against a
``-march=native`` build of the same source, on the CPU kernels, in one run.

    python -m benchmarks.bench_portable            # builds the native copy in a temporary folder first
    python -m benchmarks.bench_portable --native DIR   # a folder holding a native structlik/_C*.so

Two builds of one extension cannot be loaded into one process (both register
``torch.ops.structlik``), so each build is timed in child processes, taken
in turns (portable, native, portable, ...) so that the machine's drift hits
both alike; the report keeps each build's best median per case. Writes
results/portable.md.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

# (name, B, C, H, W, radius, what): the CPU benchmarks' sizes, float32
CASES = [("nll fwd+bwd", 64, 1, 64, 64, 1), ("nll fwd+bwd", 64, 1, 64, 64, 3), ("nll fwd+bwd", 8, 3, 128, 128, 2),
         ("solve_upper", 64, 1, 64, 64, 1), ("solve_upper", 64, 1, 64, 64, 3), ("solve_upper", 8, 3, 128, 128, 2),
         ("apply_upper", 64, 1, 64, 64, 3), ("standard_normal", 64, 1, 64, 64, 0)]

CHILD = r'''
import json, sys, torch
import torch.utils.benchmark as tb
import structlik
from structlik import Stencil, ops, backends
assert backends.name_of(torch.device("cpu")) == "cpu", "the C++ kernels did not load"
so = structlik._C.__file__
out = {}
for name, B, C, H, W, radius in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    st = Stencil(max(radius, 1))
    x = torch.rand(B, C, H, W)
    head = (0.1 * torch.randn(B, (2 + st.S) * C, H, W)).requires_grad_()
    loc, s, w = head.split([C, C, C * st.S], 1)
    if name == "nll fwd+bwd":
        fn = lambda: ops.nll(x, loc, s, w, st).sum().backward()
    elif name == "solve_upper":
        fn = lambda: ops.solve_upper(x, s.detach(), w.detach(), st)
    elif name == "apply_upper":
        fn = lambda: ops.apply_upper(x, s.detach(), w.detach(), st)
    else:
        fn = lambda: structlik.distribution.standard_normal((B, C, H, W), torch.float32, torch.device("cpu"))
    m = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=float(sys.argv[2]))
    out[f"{name} B{B}-C{C}-{H}x{W}-r{radius}"] = m.median
print(json.dumps({"so": so, "times": out}))
'''


def build_native(dest):
    """A copy of the source built with STRUCTLIK_CPU_ARCH=native, in place."""
    for item in ("setup.py", "pyproject.toml", "README.md", "csrc", "structlik"):
        src = os.path.join(ROOT, item)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(dest, item))
    for so in glob.glob(os.path.join(dest, "structlik", "_C*.so")):
        os.remove(so)
    env = dict(os.environ, STRUCTLIK_CPU_ARCH="native")
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return dest


def time_build(path, min_run_time):
    env = dict(os.environ, PYTHONPATH=path, STRUCTLIK_BACKEND="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES), str(min_run_time)], env=env, cwd=path,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--native", help="folder with a native build (default: build one in a temporary folder)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=1.0)
    args = p.parse_args()
    tmp = None
    native = args.native
    if native is None:
        tmp = tempfile.mkdtemp()
        print("building the native copy ...", flush=True)
        native = build_native(tmp)
    builds = {"portable": ROOT, "native": native}
    best = {k: {} for k in builds}
    sos = {}
    for _ in range(args.rounds):
        for label, path in builds.items():
            result = time_build(path, args.min_run_time)
            sos[label] = result["so"]
            for case, t in result["times"].items():
                best[label][case] = min(t, best[label].get(case, float("inf")))
    assert sos["portable"] != sos["native"], sos
    lines = ["## Portable build vs -march=native (CPU kernels)", "",
             f"- command: python -m benchmarks.bench_portable (best median of {args.rounds} rounds, builds in turns)",
             f"- date: {datetime.date.today()}, torch {__import__('torch').__version__}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "",
             "| case (float32) | portable (ms) | native (ms) | portable / native |", "|---|---|---|---|"]
    for case in best["portable"]:
        a, b = best["portable"][case], best["native"][case]
        lines.append(f"| {case} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(HERE, "results", "portable.md"), "w") as f:
        f.write(text)
    if tmp:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
