"""Conditional samples (StructuredNormal.condition): iterations and time per sample against a dense solve.

    python -m benchmarks.bench_condition            # 64x64, radius 2: a 16x16 hole and a random half
    python -m benchmarks.bench_condition --quick    # 16x16: checks the script runs

One image, float64 (``--dtype``), two sets of parameters: ``StructuredNormal.from_head`` of a random head
(weights bound at 0.9 of the diagonal, as a decoder's are), and examples/denoise.py's structured denoiser
trained for ``--steps`` steps, on a noisy held-out crop (the clean crop conditioned on). Per mask:
the conjugate-gradient iterations, the time of one conditional sample, and that of the dense way
(Lambda_MM assembled from dense U, a Cholesky factor, two triangular solves), with the largest
deviation of the sample from the dense one for the same noise.
"""
from __future__ import annotations

import datetime
import os
import platform

import torch

from benchmarks import common, harness
from structlik import Stencil, StructuredNormal, ops


def masks(H, W, g):
    hole = torch.ones(1, 1, H, W, dtype=torch.bool)
    c, k = H // 2, max(2, H // 4)
    hole[..., c - k // 2: c + k // 2, c - k // 2: c + k // 2] = False
    half = torch.rand(1, 1, H, W, generator=g) < 0.5
    return {f"{k}x{k} hole": hole, "random half": half}


def dense_sample(U, loc, x, mask, z):
    """The same sample by dense linear algebra: Lambda_MM = A^T A, A = U[:, M]."""
    M, O = (~mask).flatten().nonzero().flatten(), mask.flatten().nonzero().flatten()
    A = U[:, M]
    L = torch.linalg.cholesky(A.T @ A)
    rhs = A.T @ (z - U[:, O] @ (x.flatten()[O] - loc.flatten()[O]))
    return loc.flatten()[M] + torch.cholesky_solve(rhs[:, None], L)[:, 0]


def random_head(H, W, stencil, g):
    """StructuredNormal.from_head of a random head, and an image drawn around its mean."""
    head = 0.5 * torch.randn(1, 2 + stencil.S, H, W, generator=g, dtype=torch.float64)
    dist = StructuredNormal.from_head(head, stencil)
    return dist, dist.loc + torch.randn(1, 1, H, W, generator=g, dtype=torch.float64)


def trained_denoiser(H, W, stencil, steps):
    """examples/denoise.py's structured denoiser, trained ``steps`` steps on 32x32 crops (its network is
    convolutional: it takes any size), on an H x W noisy test crop; and the clean crop."""
    from examples import denoise
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = denoise.Structured(32, stencil, 0.9)
    denoise.train(model, denoise.crops(2048, 32, False, g), steps, 32, 0.1, g)
    clean = denoise.crops(1, H, True, g)
    with torch.no_grad():
        dist = model.distribution(clean + 0.1 * torch.randn(clean.shape, generator=g))
    return dist, clean


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(dtype="float64")
    p.add_argument("--size", type=int, default=64, help="H = W")
    p.add_argument("--radius", type=int, default=2)
    p.add_argument("--steps", type=int, default=1500, help="training steps of the denoiser (examples/denoise.py)")
    args = p.parse_args()
    if args.sizes:
        raise SystemExit("--sizes: not used here; --size and --radius choose the image")
    H = W = 16 if args.quick else args.size
    stencil, device, dtype = Stencil(args.radius), torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    rows = []
    for source, (dist, x) in (("random head", random_head(H, W, stencil, g)),
                              ("trained denoiser", trained_denoiser(H, W, stencil, 20 if args.quick else args.steps))):
        dist = StructuredNormal(*(t.to(device, dtype) for t in (dist.loc, dist.log_diag, dist.off_diag)), stencil)
        x = x.to(device, dtype)
        U = ops.to_dense_upper(dist.log_diag, dist.off_diag, stencil)[0, 0]
        for name, mask in masks(H, W, g).items():
            mask = mask.to(device)
            cond = dist.condition(x, mask)
            torch.manual_seed(1)
            z = torch.randn(1, 1, H, W, dtype=dtype).to(device)
            got = cond._draw(z)
            iters = cond.iterations
            expected = dense_sample(U, dist.loc[0, 0], x[0, 0], mask[0, 0], z.flatten())
            error = (got.flatten()[(~mask).flatten()] - expected).abs().max().item()
            ours = harness.median_ms(cond.sample, device, args.min_run_time) / 1e3
            theirs = harness.median_ms(lambda: dense_sample(U, dist.loc[0, 0], x[0, 0], mask[0, 0], z.flatten()),
                                       device, args.min_run_time) / 1e3
            rows.append(dict(parameters=source, mask=name, missing=int((~mask).sum()), iterations=iters,
                             residual=f"{cond.residual:.1e}", ms=round(ours * 1e3, 2), dense_ms=round(theirs * 1e3, 2),
                             dense_over_ours=round(theirs / ours, 1), error=f"{error:.1e}"))
    header = (f"## Conditional samples, {H}x{W}, radius {args.radius}, {args.dtype}, one image\n\n"
              f"- device: {harness.device_name(device)}\n- date: {datetime.date.today()}, torch "
              f"{torch.__version__}, {platform.machine()}\n- command: {harness.command()}\n\n"
              "ms: one `cond.sample()` (conjugate gradients preconditioned by U_MM^T U_MM, to the default tol: "
              "1e-10 in float64, 1e-5 in float32); dense_ms: Lambda_MM = A^T A from dense U, its Cholesky factor "
              "and two triangular solves (the assembly included, as a user would write it); error: "
              "max |sample - dense sample| on the missing pixels for the same z.\n\n")
    table = harness.markdown(rows, list(rows[0]))
    print(header + table)
    if not args.quick:
        path = os.path.join(harness.RESULTS_DIR, f"condition-{device.type}.md")
        with open(path, "w") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
