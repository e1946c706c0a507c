"""The covariance band's level model on the GPU, with figures from its sm_90 SASS (no GPU run).

    python -m tools.band_model        # prints the table docs/kernels.md §4 quotes

For each size: the levels T = t(i) + t(j) that follow each other in one program (its critical path,
2 (a(H-1) + W - 1) + 1), the band length L = b + 1, the lanes a level enumerates (2 L rows: offset k,
wrap, row of the wavefront), the lanes per chunk (LANES) and chunks per level, the band entries and
so the share of enumerated lanes that hold one, the band's memory per plane (float32), and from the
compiled kernels' SASS (``cuobjdump -sass``): barriers and instructions in the chunk loop (each chunk
runs it) and registers, for the forward and the adjoint sweep.
"""
from __future__ import annotations

import math

from tools import triton_aot  # noqa: E402  (imports triton without the interpreter)

import triton  # noqa: E402

from structlik import Stencil  # noqa: E402
from structlik.kernels import covariance_band  # noqa: E402

CASES = [("64x64 r1", 64, 64, Stencil(1)), ("64x64 r2", 64, 64, Stencil(2)), ("128x128 r2", 128, 128, Stencil(2)),
         ("256x256 r3", 256, 256, Stencil(3))]


def compiled(kernel_index: int, H, W, stencil):
    """The recorded launch ``kernel_index`` of the band's forward (0) or backward (1: the adjoint sweep)."""
    triton_aot._recorded.clear()
    triton.runtime.jit.JITFunction.run = triton_aot._record
    f32 = triton_aot.torch.float32
    s, w = triton_aot.meta(16, 1, H, W, dtype=f32), triton_aot.meta(16, stencil.S, H, W, dtype=f32)
    if kernel_index == 0:
        covariance_band.launch(s, w, stencil.flat_offsets, True)
    else:
        band = triton_aot.meta(16, covariance_band.band_length(stencil.flat_offsets, W), H, W, dtype=f32)
        covariance_band.launch_backward(band, s, w, band, stencil.flat_offsets)
    fn, args, kwargs, _ = triton_aot._recorded[0]
    return triton_aot.compile_launch(fn, args, kwargs)


def main():
    rows = ["| size | levels | L | lanes a level enumerates | LANES x chunks | entries per level, mean | "
            "enumerated lanes with an entry | band per plane (float32) | forward: chunk loop BAR.SYNC, "
            "instructions; registers | adjoint: the same |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for label, H, W, stencil in CASES:
        n = H * W
        slope, L, rows_per_front, per_level, lanes, levels = covariance_band._schedule(H, W, stencil.flat_offsets)
        entries = sum(max(0, n - k) for k in range(L))
        chunks = math.ceil(per_level / lanes)
        cells = []
        for index in (0, 1):
            kernel = compiled(index, H, W, stencil)
            barriers, instructions = triton_aot.sass_loops(kernel.asm["cubin"])[0]
            regs = triton_aot._resources(kernel.asm["cubin"])["reg"]
            cells.append(f"{barriers}, {instructions}; {regs}")
        rows.append(f"| {label} | {levels} | {L} | {per_level} | {lanes} x {chunks} | {entries / levels:.0f} | "
                    f"{entries / (levels * chunks * lanes):.0%} | {4 * L * n / 2**20:.1f} MB | {cells[0]} | "
                    f"{cells[1]} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
