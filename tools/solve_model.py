"""The parallel solve's step model, with figures from its sm_90 SASS (no GPU run).

    python -m tools.solve_model        # prints the table docs/kernels.md quotes

For each size: the wavefront steps a(H-1)+W that follow each other in one
program (its critical path), the lanes (threads) per program, the pixels a
wavefront holds at most and on average (H*W / steps), so the share of lanes
with work; the SMs with work at B*C = 16 and 1,024 planes (one program per
plane, 132 SMs on an H100); and, from the compiled kernel's SASS
(``cuobjdump -sass``), the block barriers (BAR.SYNC) and instructions in the
loop body that each step runs. ``before`` is the previous design (one lane per
row, next_power_of_2(H) lanes, 4 warps), computed from the same formulas.
"""
from __future__ import annotations

from tools import triton_aot  # noqa: E402  (sets up ahead-of-time compilation; imports triton without the interpreter)

import triton  # noqa: E402

from structlik import Stencil  # noqa: E402
from structlik.kernels import solve_upper  # noqa: E402

SMS = 132
# volumes (D, H, W): the native 3-D wavefront against the same volume stacked into one tall image
VOLUME_CASES = [("64x64x64 r1", 64, 64, 64, Stencil(1, ndim=3)), ("32x32x32 r2", 32, 32, 32, Stencil(2, ndim=3)),
                ("128x128x128 r1", 128, 128, 128, Stencil(1, ndim=3))]
CASES = [("64x64 r1", 64, 64, Stencil(1)), ("64x64 r3", 64, 64, Stencil(3)),
         ("256x256 r3", 256, 256, Stencil(3)), ("512x512 r3", 512, 512, Stencil(3))]


def compile_solve(H, W, stencil):
    triton_aot._recorded.clear()
    triton.runtime.jit.JITFunction.run = triton_aot._record
    z = triton_aot.meta(16, 1, H, W, dtype=triton_aot.torch.float32)
    solve_upper.launch(z, z, triton_aot.meta(16, stencil.S, H, W, dtype=z.dtype), stencil.flat_offsets, False)
    fn, args, kwargs, _ = triton_aot._recorded[-1]
    return triton_aot.compile_launch(fn, args, kwargs), kwargs


def compile_volume_solve(D, H, W, stencil):
    triton_aot._recorded.clear()
    triton.runtime.jit.JITFunction.run = triton_aot._record
    z = triton_aot.meta(4, 1, D * H, W, dtype=triton_aot.torch.float32)
    solve_upper.launch(z, z, triton_aot.meta(4, stencil.S, D * H, W, dtype=z.dtype), stencil.op_offsets(H), False)
    fn, args, kwargs, _ = triton_aot._recorded[-1]
    return triton_aot.compile_launch(fn, args, kwargs), kwargs, args


def volume_rows():
    """steps b(D-1) + a(H-1) + W against a(D*H-1) + W stacked (the tall image's own slope: the
    offsets (dz*H + dy, dx) need no larger a), voxels per step, lanes and passes, SASS."""
    import numpy as np
    rows = ["| volume | steps, native b(D-1)+a(H-1)+W | steps, stacked a(DH-1)+W | voxels per step, max / mean | "
            "lanes a pass x passes | warps | SASS: BAR.SYNC per step, instructions per pass | registers |",
            "|---|---|---|---|---|---|---|---|"]
    for label, D, H, W, stencil in VOLUME_CASES:
        a, b = stencil.wavefront_slope, stencil.depth_slope
        tall = Stencil.from_flat_offsets(stencil.op_offsets(H))
        a_tall = max([1] + [-(-(1 - dx) // dy) for i, (dy, dx) in enumerate(tall.tall_offsets)
                            if dy > 0 and tall.reachable(i)])
        steps, stacked = b * (D - 1) + a * (H - 1) + W, a_tall * (D * H - 1) + W
        z, y, x = np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij")
        per_step = np.bincount((b * (D - 1 - z) + a * (H - 1 - y) + (W - 1 - x)).ravel())
        kernel, kwargs, args = compile_volume_solve(D, H, W, stencil)
        passes = args[11]
        loops = triton_aot.sass_loops(kernel.asm["cubin"])
        barriers, inner = loops[-1][0], loops[0][1]       # the step loop's barriers, a pass's body
        regs = triton_aot._resources(kernel.asm["cubin"])["reg"]
        rows.append(f"| {label} | {steps} | {stacked} ({stacked / steps:.1f}x) | {per_step.max()} / {per_step.mean():.1f} | "
                    f"{kwargs['LANES']} x {passes} | {kernel.metadata.num_warps} | {barriers}, {inner} | {regs} |")
    return rows


def main():
    rows = ["| size | steps a(H-1)+W | lanes per program, before -> now | pixels per step, max / mean | "
            "lanes with work, before -> now | warps per barrier, before -> now | SMs with work at B*C = 16 / 1,024 | "
            "SASS per step: BAR.SYNC, instructions | registers |",
            "|---|---|---|---|---|---|---|---|---|"]
    for label, H, W, stencil in CASES:
        a = stencil.wavefront_slope
        steps = a * (H - 1) + W
        kernel, kwargs = compile_solve(H, W, stencil)
        lanes = kwargs["LANES"]
        warps = kernel.metadata.num_warps
        threads_now = max(lanes, 32 * warps)
        before = max(16, triton.next_power_of_2(H))
        threads_before = max(before, 128)
        peak, mean = min(H, -(-W // a)), H * W / steps
        barriers, instructions = triton_aot.sass_loops(kernel.asm["cubin"])[-1]   # its one loop
        regs = triton_aot._resources(kernel.asm["cubin"])["reg"]
        rows.append(f"| {label} | {steps} | {before} -> {lanes} | {peak} / {mean:.1f} | "
                    f"{mean / threads_before:.0%} -> {mean / threads_now:.0%} | 4 -> {warps} | "
                    f"{min(16, SMS)} / {min(1024, SMS)} | {barriers}, {instructions} | {regs} |")
    print("\n".join(rows))
    print()
    print("\n".join(volume_rows()))


if __name__ == "__main__":
    main()
