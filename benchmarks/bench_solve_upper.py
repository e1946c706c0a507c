"""Sampling x = loc + U^-1 z: the fused solve against the reference, scipy and dense solves.

    python -m benchmarks.bench_solve_upper
    python -m benchmarks.bench_solve_upper --dtype float64 --sizes B16-C1-64x64-r2   # the public-path target
    python -m benchmarks.bench_solve_upper --quick

"fused" is the kernel alone on contiguous tensors; "public solve_upper" and
"public rsample" are ``structlik.ops.solve_upper`` and
``StructuredNormal(...).rsample()`` with their default validation (asserted
on), their parameters views of one decoder head (``head.split``). rsample
returns loc + eps; its loc is 0 here and its z is drawn from the seed z came
from, so it equals the others' eps.

Before timing, the fused solve is checked in float64 against a dense
``torch.linalg.solve_triangular`` at a small size (the "exact" row), and every
contender against the reference at each size. ``of_nll_fwd`` is each time over
the fused NLL forward's at the same size, timed in the same run: a sample
should cost a small multiple of evaluating the density.
"""
from __future__ import annotations

import torch

from benchmarks import common, harness, peers
import structlik
from structlik import Stencil, reference
from structlik.distribution import standard_normal


def exactness(fused, device):
    """Max relative residual of the fused solves, |U eps - z| and |U^T a - g| over |z|, float64, U and
    U^T applied by the reference (shifts of the image in plain PyTorch, no BLAS: MKL's float64
    solve_triangular was off by 1e-9 once in three runs). On a 2-core Xeon VM the first float64
    computations of about one process in three (a reference solve, a dense matmul, whichever came
    first) were off by 1e-8 relative while the fused solve was exact; never with one thread
    (OMP_NUM_THREADS=1 or taskset to one CPU), never when repeated in that process. The smoke test
    (tests/test_benchmarks.py) runs the scripts with one thread."""
    stencil = Stencil(2, (1, 2))
    _, _, s, w = common.make_inputs(4, 2, 19, 23, stencil, torch.float64, device)
    z = torch.randn(4, 2, 19, 23, dtype=torch.float64, device=device)

    def residual(apply, sol):
        return ((apply(sol, s, w, stencil) - z).abs().max() / z.abs().max()).item()
    return max(residual(reference.apply_upper, fused.solve_upper(z, s, w, stencil)),
               residual(reference.apply_upper_t, fused.solve_upper_t(z, s, w, stencil)))


SEED = 1234


def contenders_for(size, fused_name, fused, dtype, device):
    B, C, H, W, stencil = size
    _, loc, s, w = common.make_inputs(B, C, H, W, stencil, dtype, device)
    torch.manual_seed(SEED)
    z = standard_normal((B, C, H, W), dtype, device)               # what rsample draws after manual_seed(SEED)
    # loc = 0, so that the sample is eps itself (no subtraction in the timed call)
    head = torch.cat([torch.zeros_like(loc), s, w], dim=1)
    loc_v, s_v, w_v = head.split([C, C, C * stencil.S], dim=1)
    dist = structlik.StructuredNormal(loc_v, s_v, w_v, stencil)

    checked = []

    def rsample_eps():
        if not checked:                  # the first call is the one checked: rsample's z must be z above.
            checked.append(True)         # Later, timed calls are dist.rsample() alone (manual_seed costs
            torch.manual_seed(SEED)      # 0.1 ms, and users do not reseed before every sample)
        return dist.rsample()

    n = H * W
    dense_gib = B * C * n * n * z.element_size() / 2**30
    out = [
        harness.Contender("fused", lambda: fused.solve_upper(z, s, w, stencil), f"structlik {fused_name} kernel"),
        harness.Contender("public solve_upper", lambda: structlik.ops.solve_upper(z, s_v, w_v, stencil),
                          "structlik.ops.solve_upper on split-head views, default validation", validated=True),
        harness.Contender("public rsample", rsample_eps,
                          "StructuredNormal(...).rsample() on split-head views, default validation", validated=True),
        harness.Contender("reference", lambda: reference.solve_upper(z, s, w, stencil), "wavefronts in Python"),
    ]
    pattern = peers.CSRPattern(stencil, H, W)
    out.append(harness.Contender("torch sparse CSR solve", lambda: peers.torch_csr_sample(z, s, w, stencil, pattern),
                                 "torch.triangular_solve on sparse CSR, per image" +
                                 (" (cuSPARSE)" if device.type == "cuda" else "")))
    if device.type == "cpu":
        out.append(harness.Contender("scipy spsolve_triangular", lambda: peers.scipy_sample(z, s, w, stencil, pattern),
                                     "CSR per image (authors' method)"))
    out.append(harness.Contender(
        "dense solve_triangular", lambda: peers.dense_sample(z, s, w, stencil),
        f"to_dense_upper + torch.linalg.solve_triangular in chunks of <= 1 GiB (all of U: {dense_gib:.1f} GiB)"))
    return out


def main():
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fused_name, fused = common.fused_backend(device)
    rel = exactness(fused, device)
    exact = (f"Exactness: the fused solves (U^-1 z and U^-T g) against dense float64 U, B4 C2 19x23, radius 2, "
             f"dilations (1, 2): max residual {rel:.2e} relative to the largest entry of z.")
    print(exact)
    assert rel < 1e-13, rel
    sizes = common.selected_sizes(args, "solve_upper")
    cases, nll_fwd_ms = [], {}
    for label, size in sizes.items():
        B, C, H, W, stencil = size
        x, loc, s, w = common.make_inputs(B, C, H, W, stencil, dtype, device)
        with torch.no_grad():
            nll_fwd_ms[label] = harness.median_ms(lambda: fused.nll(x, loc, s, w, stencil), device,
                                                  args.min_run_time)
        plane = B * C * H * W * common.element_bytes(dtype)
        tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
        cases.append(harness.Case(
            label=label, mode="sample", contenders=contenders_for(size, fused_name, fused, dtype, device),
            check=lambda got, exp, tol=tol: harness.assert_close_report(got, exp, **tol),
            fused="fused", reference="reference",
            input_bytes=(2 + stencil.S) * plane, output_bytes=plane))   # read z, log_diag, off_diag; write the sample

    def per_image(case, contender, ms):
        B, C = sizes[case.label][:2]
        return {"ms_per_image": ms / (B * C), "of_nll_fwd": ms / nll_fwd_ms[case.label]}

    def scipy_over(rows):
        scipy_ms = rows.get("scipy spsolve_triangular", {}).get("ms")
        for name in ("public solve_upper", "public rsample", "fused"):
            if scipy_ms and rows.get(name, {}).get("ms"):
                rows[name]["scipy_over"] = scipy_ms / rows[name]["ms"]

    family = "solve_upper" if dtype == torch.float32 else f"solve_upper_{args.dtype}"
    harness.run(family, cases, device, min_run_time=args.min_run_time, extra_columns=per_image, notes=exact,
                derive=scipy_over)


if __name__ == "__main__":
    main()
