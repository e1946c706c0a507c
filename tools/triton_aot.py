"""Compile every Triton kernel ahead of time for a real GPU (sm_90: H100/H200), without one.

    python -m tools.triton_aot              # the sizes and dtypes CI checks; results/triton_aot-sm90.{md,json}
    python -m tools.triton_aot --quick      # B16 256x256 radius 3, float32: the largest stencil only
    python -m tools.triton_aot --json F     # also the rows as JSON in F (what tests/test_triton_aot.py reads)
    python -m tools.triton_aot --case B32-C2-128x128-r4-cross --no-results   # one case

structlik's own launch wrappers (structlik/kernels/*.py) are called on meta
tensors (nothing is allocated, so any size works) with Triton's
``JITFunction.run`` replaced by a recorder. Each recorded launch is
specialised as the JIT would on a CUDA device and compiled by
``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` to a cubin with the
ptxas inside the triton wheel. Reported per kernel: registers and local memory
(``cuobjdump -res-usage``), spill bytes (``ptxas -v``), H100 occupancy
(65,536 registers per SM in 256-register units per warp, 64 warps, 32 CTAs),
and whether the grid fits CUDA's limits (2^31 - 1, 65,535, 65,535).
Nothing here runs a kernel: these are static figures.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)      # compile, do not interpret (before triton is imported)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

from structlik import Stencil  # noqa: E402
from structlik.kernels import (apply_upper, covariance_band, nll, precision_diagonal, solve_upper,  # noqa: E402
                               weight_grad)

ARCH = 90
TARGET = GPUTarget("cuda", ARCH, 32)
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (label, B, C, H, W, stencil, basis sizes[, cross]): the benchmarks' sizes, a dilated stencil, the launch
# limits, and channels coupled at each pixel (cross=True: supn_base's client, 2-channel MRI at radius 4).
CASES = [
    ("B64-C1-64x64-r1", 64, 1, 64, 64, Stencil(1), (6,)),
    ("B64-C1-64x64-r2", 64, 1, 64, 64, Stencil(2), (6,)),
    ("B64-C1-64x64-r3", 64, 1, 64, 64, Stencil(3), (6,)),
    ("B16-C1-256x256-r3", 16, 1, 256, 256, Stencil(3), (6,)),
    ("B64-C3-32x32-r2-d12", 64, 3, 32, 32, Stencil(2, (1, 2)), (6, 12)),
    ("B256-C1-512x512-r3", 256, 1, 512, 512, Stencil(3), ()),
    ("B100000-C1-16x16-r1", 100_000, 1, 16, 16, Stencil(1), ()),      # 100,000 planes: e.g. many samples
    ("B1-C1-4096x4096-r3", 1, 1, 4096, 4096, Stencil(3), (6,)),        # 65,536 tiles of 256 in one plane
    ("B2-C3-8192x8192-r1", 2, 3, 8192, 8192, Stencil(1), (6,)),        # 262,144 tiles a plane, 6 planes
    ("B32-C2-128x128-r4", 32, 2, 128, 128, Stencil(4), ()),              # the client's size, channels independent
    ("B32-C2-128x128-r4-cross", 32, 2, 128, 128, Stencil(4), (), True),  # ... and coupled (NCH=2)
    ("B8-C3-128x128-r4-cross", 8, 3, 128, 128, Stencil(4), (6,), True),  # RGB coupled (NCH=3, NCH_P2=4)
    ("B8-C4-64x64-r3-cross", 8, 4, 64, 64, Stencil(3), (), True),         # four channels (NCH=4)
    # volumes (B, C, D, H, W), H given as (D, H): the ops see their tall view (D*H, W)
    ("B4-C1-64x64x64-r1", 4, 1, (64, 64), 64, Stencil(1, ndim=3), (6,)),
    ("B2-C2-32x32x32-r2-cross", 2, 2, (32, 32), 32, Stencil(2, ndim=3), (), True),
    ("B1-C1-128x128x128-r1", 1, 1, (128, 128), 128, Stencil(1, ndim=3), ()),
]


_recorded = []


def _record(self, *args, grid, warmup, **kwargs):
    _recorded.append((self, args, kwargs, tuple(grid)))


def meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def launches(label, B, C, H, W, stencil, basis_sizes, dtypes, coupled=False):
    """Every launch the wrappers make at this size: (label, kernel, args, kwargs, grid). ``coupled``:
    with cross weights (B, C(C-1)/2, H, W) in every op that takes them."""
    S = stencil.S
    if isinstance(H, tuple):           # a volume: its tall view and the offsets [-H, dz, dy, dx, ...]
        offsets = stencil.op_offsets(H[1])
        H = H[0] * H[1]
    else:
        offsets = stencil.flat_offsets
    start = len(_recorded)
    for dtype in dtypes:
        def image():
            return meta(B, C, H, W, dtype=dtype)
        off_diag = meta(B, C * S, H, W, dtype=dtype)
        cross = meta(B, C * (C - 1) // 2, H, W, dtype=dtype) if coupled else None
        grad = meta(B, dtype=torch.float32)
        nll.nll(image(), image(), image(), off_diag, None, offsets, False, cross)
        _, u = nll.nll(image(), image(), image(), off_diag, None, offsets, True, cross)
        nll.nll_backward(grad, image(), image(), image(), off_diag, None, u, offsets, cross)
        for nb in basis_sizes:
            coeffs, basis = meta(B, C * nb, H, W, dtype=dtype), meta(S, nb, dtype=dtype)
            nll.nll(image(), image(), image(), coeffs, basis, offsets, False, cross)
            _, u = nll.nll(image(), image(), image(), coeffs, basis, offsets, True, cross)
            nll.nll_backward(grad, image(), image(), image(), coeffs, basis, u, offsets, cross)
        if dtype in HALF:
            continue        # structlik.ops gives every other op float32 copies of half inputs
        for transposed in (False, True):
            apply_upper.launch(image(), image(), off_diag, offsets, transposed=transposed, cross=cross)
            solve_upper.launch(image(), image(), off_diag, offsets, transposed=transposed, cross=cross)
        weight_grad.launch(image(), image(), offsets, B)
        precision_diagonal.launch(image(), off_diag, offsets, cross)
        L = covariance_band.band_length(offsets, W)
        for diagonal_only in (False, True):
            covariance_band.launch(image(), off_diag, offsets, diagonal_only)
        band = meta(B, C * L, H, W, dtype=dtype)
        covariance_band.launch_backward(band, image(), off_diag, band, offsets)
    return [(label, *launch) for launch in _recorded[start:]]


def specialise(fn, args, kwargs, backend):
    """What the JIT would compile for these arguments on a CUDA device: (options, signature, constexprs, attrs)."""
    binder = triton_jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **dict(kwargs, debug=False))
    return fn._pack_args(backend, dict(kwargs, debug=False), bound, specialization, options)


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_spills(ptx):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name=sm_{ARCH}a", src, "-o",
                               os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    return [int(m.group(1)) if (m := re.search(pat, log)) else 0
            for pat in (r"(\d+) bytes spill stores", r"(\d+) bytes spill loads")]


def _resources(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    return {key.lower(): int(m.group(1)) if (m := re.search(rf"\b{key}:(\d+)", res)) else None
            for key in ("REG", "LOCAL", "SHARED")}


def occupancy(regs, warps, shared):
    """H100: resident CTAs per SM and the share of its 64 warp slots they fill."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    ctas = min((65536 // per_warp) // warps, (233472 // (shared + 1024)) if shared else 32, 64 // warps, 32)
    return ctas * warps / 64


def sass_loops(cubin: bytes) -> list:
    """(barriers, instructions) of every loop body (a backward branch to its target), innermost first."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True).stdout
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in lines:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in lines if int(m.group(1), 16) <= a <= addr]
            loops.append((sum("BAR.SYNC" in t for t in body), len(body)))
    return sorted(loops, key=lambda loop: loop[1])


def compile_launch(fn, args, kwargs):
    """The cubin-bearing kernel the JIT would build for one recorded launch, compiled for TARGET."""
    backend = make_backend(TARGET)
    options, signature, constexprs, attrs = specialise(fn, args, kwargs, backend)
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=TARGET, options=options.__dict__)


ITEMS = []      # the recorded launches; forked workers compile ITEMS[i]


def compile_one(i):
    label, fn, args, kwargs, grid = ITEMS[i]
    kernel = compile_launch(fn, args, kwargs)
    spill_stores, spill_loads = _ptxas_spills(kernel.asm["ptx"])
    res = _resources(kernel.asm["cubin"])
    return dict(regs=res["reg"], local=res["local"] or 0, shared=kernel.metadata.shared,
                num_warps=kernel.metadata.num_warps, spill_stores=spill_stores, spill_loads=spill_loads,
                occupancy=occupancy(res["reg"] or 0, kernel.metadata.num_warps, kernel.metadata.shared))


def describe(fn, args, kwargs):
    consts = {k: kwargs[k] for k in ("S", "BLOCK", "LANES", "NB", "NCH", "TRANSPOSED", "STORE_U", "BASIS") if k in kwargs}
    dtypes = sorted({str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)} - {"float32"}
                    or {"float32"})
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in consts.items()), ",".join(dtypes)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B16 256x256 radius 3, float32 only")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--case", action="append", help="only this case (a label of CASES; repeatable)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-results", action="store_true", help="do not write benchmarks/results/")
    args = p.parse_args()
    triton_jit.JITFunction.run = _record
    cases = [c for c in CASES if c[0] == "B16-C1-256x256-r3"] if args.quick else CASES
    if args.case:
        unknown = set(args.case) - {c[0] for c in CASES}
        if unknown:
            p.error(f"--case: no case {sorted(unknown)}; the cases are {[c[0] for c in CASES]}")
        cases = [c for c in cases if c[0] in args.case]
    items = ITEMS
    for label, B, C, H, W, stencil, basis_sizes, *coupled in cases:
        # the launch-limit cases: float32 is enough (volumes: all three dtypes, the check)
        big = B * C > 10_000 or (not isinstance(H, tuple) and H * W > 100_000)
        dtypes = (torch.float32,) if args.quick or big else DTYPES
        items += launches(label, B, C, H, W, stencil, basis_sizes, dtypes, *coupled)
    backend = make_backend(TARGET)
    keys = [repr((fn.fn.__name__, specialise(fn, a, kw, backend)[1:], kw.get("num_warps")))
            for _, fn, a, kw, _ in items]
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    todo = sorted(first.values())
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("fork")) as pool:
        compiled = dict(zip(todo, pool.map(compile_one, todo)))
    rows = []
    for i, (label, fn, a, kw, grid) in enumerate(items):
        consts, dtypes = describe(fn, a, kw)
        rows.append(dict(case=label, kernel=fn.fn.__name__, constexprs=consts, dtypes=dtypes, grid=list(grid),
                         grid_ok=all(g <= limit for g, limit in zip(grid, GRID_LIMITS)),
                         distinct=first[keys[i]] == i, **compiled[first[keys[i]]]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    text = report(rows)
    print(text)
    if not args.no_results:
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
        with open(os.path.join(here, f"triton_aot-sm{ARCH}.md"), "w") as f:
            f.write(text)


def report(rows):
    lines = [f"## Triton kernels compiled ahead of time for sm_{ARCH} (H100/H200)", "",
             "- command: python -m tools.triton_aot", f"- triton: {triton.__version__}, "
             f"ptxas of CUDA {knobs.nvidia.ptxas.version}, target {TARGET}", "",
             "Static figures from the compiled cubins, no GPU run: registers per thread, spill bytes per thread "
             "(ptxas), H100 occupancy (share of an SM's 64 warp slots), the largest grid recorded for that "
             "specialisation and whether every grid fits CUDA's limits.", "",
             "| kernel | constexprs | dtype | warps | regs | spill st/ld | occupancy | largest grid | grids ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["constexprs"], r["dtypes"]), []).append(r)
    for (kernel, consts, dtypes), rs in sorted(groups.items()):
        r = rs[0]
        grid = max((x["grid"] for x in rs), key=lambda g: g[0] * (g[1] if len(g) > 1 else 1))
        lines.append(f"| {kernel} | {consts} | {dtypes} | {r['num_warps']} | {r['regs']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['occupancy']:.2f} | {tuple(grid)} | "
                     f"{'yes' if all(x['grid_ok'] for x in rs) else '**no**'} |")
    spills = sum(1 for r in rows if r["distinct"] and (r["spill_stores"] or r["spill_loads"] or r["local"]))
    lines += ["", f"{sum(r['distinct'] for r in rows)} distinct compilations for {len(rows)} launches; "
              f"{spills} spill; {sum(not r['grid_ok'] for r in rows)} grids over CUDA's limits.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
