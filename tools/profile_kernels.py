"""Run the Triton kernels at the GPU targets' sizes a few times each, for a profiler (ncu) to read.

    ncu --kernel-name regex:'nll|solve' --launch-skip 6 --launch-count 6 python -m tools.profile_kernels

Each op runs ``--repeats`` times after one warm-up, so the profiler can skip
the compilations and read steady-state launches (the Triton NLL backward is
two kernels per call). Prints each op and size as it finishes.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks import common


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda")
    _, fused = common.fused_backend(device)
    runs = []
    for label in ("B16-C1-256x256-r3", "B64-C1-64x64-r1", "B64-C1-64x64-r3"):
        B, C, H, W, stencil = common.SIZES[label]
        x, loc, s, w = common.make_inputs(B, C, H, W, stencil, torch.float32, device)
        grad = torch.ones(B, device=device)
        ops = fused._ops
        runs.append((f"nll {label}", lambda x=x, loc=loc, s=s, w=w, st=stencil: ops.nll(x, loc, s, w, st.flat_offsets)))
        runs.append((f"nll_backward {label}", lambda g=grad, x=x, loc=loc, s=s, w=w, st=stencil:
                     ops.nll_backward(g, x, loc, s, w, st.flat_offsets)))
    B, C, H, W, stencil = common.SIZES["B64-C1-64x64-r2"]
    z, _, s, w = common.make_inputs(B, C, H, W, stencil, torch.float32, device)
    runs.append(("solve_upper B64-C1-64x64-r2", lambda: fused.solve_upper(z, s, w, stencil)))
    for name, fn in runs:
        for _ in range(1 + args.repeats):
            fn()
        torch.cuda.synchronize()
        print(name, flush=True)


if __name__ == "__main__":
    main()
