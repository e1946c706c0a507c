"""Volumes (B, C, D, H, W): the NLL against supn_base's one-hot conv3d, the solve against scipy.

    python -m benchmarks.bench_volume            # B4 C1 32^3 r1 and B2 C1 24^3 r2 (the issue's sizes)
    python -m benchmarks.bench_volume --quick    # seconds: checks the script runs

"fwd+bwd": the NLL and its gradients. "public" is what users run: loc, log_diag and off_diag views
of one decoder head (``head.split``), default validation, gradients with respect to the head.
"one-hot conv3d" is supn_base's method for volumes (``use_3d``): a grouped conv3d with one one-hot
filter per offset, then each voxel's weighted sum, autograd for the gradients (on split-head views
too). "sample": M^-1 z per volume in float64; "scipy" builds each volume's CSR U and calls
``scipy.sparse.linalg.spsolve_triangular``, as the authors' code samples. Every contender is
checked against the reference on its own inputs before timing (the solve to 1e-10).

Ratios on the "public" rows: ``onehot_over_public`` (fwd+bwd) and ``scipy_over_public`` (sample),
each of two timings of this run.
"""
from __future__ import annotations

import numpy as np
import torch

from benchmarks import common, harness, peers
import structlik
from structlik import Stencil

SIZES = {"B4-C1-32x32x32-r1": (4, 1, 32, 32, 32, Stencil(1, ndim=3)),
         "B2-C1-24x24x24-r2": (2, 1, 24, 24, 24, Stencil(2, ndim=3))}
SAMPLE_SIZES = {"B4-C1-32x32x32-r1": (4, 1, 32, 32, 32, Stencil(1, ndim=3)),
                "B2-C1-24x24x24-r2": (2, 1, 24, 24, 24, Stencil(2, ndim=3))}
QUICK = {"B2-C1-6x5x4-r1": (2, 1, 6, 5, 4, Stencil(1, ndim=3)), "B1-C2-4x4x3-r2": (1, 2, 4, 4, 3, Stencil(2, ndim=3))}


def make_inputs(B, C, D, H, W, stencil, dtype, device, seed=0):
    """x (data) and loc, log_diag, off_diag (a decoder's outputs), well conditioned."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (B, C, D, H, W)
    loc = torch.randn(shape, generator=g, dtype=dtype)
    x = loc + torch.randn(shape, generator=g, dtype=dtype)
    log_diag = 0.3 * torch.randn(shape, generator=g, dtype=dtype)
    off_diag = (0.3 / stencil.S ** 0.5) * torch.randn(B, C * stencil.S, D, H, W, generator=g, dtype=dtype)
    return tuple(t.to(device) for t in (x, loc, log_diag, off_diag))


def onehot_filters_3d(stencil: Stencil, C: int, dtype, device) -> torch.Tensor:
    """(C*S, 1, kd, kh, kw): filter i of each channel picks the voxel at offset i (supn_base's use_3d)."""
    rz, ry, rx = (max(abs(o[a]) for o in stencil.offsets) for a in range(3))
    f = torch.zeros(stencil.S, 1, 2 * rz + 1, 2 * ry + 1, 2 * rx + 1, dtype=dtype)
    for i, (dz, dy, dx) in enumerate(stencil.offsets):
        f[i, 0, rz + dz, ry + dy, rx + dx] = 1
    return f.repeat(C, 1, 1, 1, 1).to(device), (rz, ry, rx)


def onehot_conv3d_nll(x, loc, log_diag, off_diag, stencil, filters):
    """supn_base's NLL for volumes: a grouped conv3d of one-hot filters, then the weighted sum."""
    weights, padding = filters
    B, C, D, H, W = x.shape
    r = x - loc
    neighbours = torch.nn.functional.conv3d(r, weights, padding=padding, groups=C)
    u = log_diag.exp() * r + (off_diag * neighbours).view(B, C, stencil.S, D, H, W).sum(2)
    return 0.5 * u.square().sum((1, 2, 3, 4)) - log_diag.sum((1, 2, 3, 4)) + 0.5 * C * D * H * W * peers.LOG_2PI


def nll_case(label, size, fused, dtype, device):
    B, C, D, H, W, stencil = size
    x, loc, s, w = make_inputs(B, C, D, H, W, stencil, dtype, device)
    filters = onehot_filters_3d(stencil, C, dtype, device)
    params = [t.detach().clone().requires_grad_() for t in (loc, s, w)]
    sizes = [C, C, C * stencil.S]
    head = torch.cat([loc, s, w], dim=1).detach().requires_grad_()

    def on_views(fn):
        def run():
            out = fn(*head.split(sizes, dim=1)).sum()
            return (out, *torch.autograd.grad(out, head)[0].split(sizes, dim=1))
        return run

    def on_params(fn):
        def run():
            out = fn(*params).sum()
            return (out, *torch.autograd.grad(out, params))
        return run

    plane = B * C * D * H * W * common.element_bytes(dtype)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
    return harness.Case(
        label=label, mode="fwd+bwd", contenders=[
            harness.Contender("fused", on_params(lambda *p: fused.nll(x, *p, stencil)),
                              "structlik cpu kernel, contiguous inputs"),
            harness.Contender("public", on_views(lambda *p: structlik.structured_gaussian_nll(
                x, *p, stencil, reduction="none")), "structured_gaussian_nll on split-head views, default "
                "validation", validated=True),
            harness.Contender("reference", on_params(lambda *p: backends_reference().nll(x, *p, stencil)),
                              "padded shifts of the tall view, autograd"),
            harness.Contender("one-hot conv3d", on_views(lambda *p: onehot_conv3d_nll(x, *p, stencil, filters)),
                              "supn_base's method (use_3d), on split-head views"),
        ],
        check=lambda got, exp: harness.assert_close_report(got, exp, **tol), fused="fused", reference="reference",
        input_bytes=(3 + stencil.S) * plane, output_bytes=B * common.element_bytes(dtype) + (2 + stencil.S) * plane)


def backends_reference():
    return structlik.backends.get("reference")


class CSRPattern3d:
    """Row pointers and column indices of a volume's U (its neighbours inside the volume only)."""

    def __init__(self, stencil: Stencil, D: int, H: int, W: int):
        n = D * H * W
        zs, rest = np.divmod(np.arange(n), H * W)
        ys, xs = np.divmod(rest, W)
        rows, cols, src = [np.arange(n)], [np.arange(n)], [np.arange(n)]
        for i, (dz, dy, dx) in enumerate(stencil.offsets):
            ok = (zs + dz < D) & (ys + dy >= 0) & (ys + dy < H) & (xs + dx >= 0) & (xs + dx < W)
            p = np.nonzero(ok)[0]
            rows.append(p), cols.append(p + (dz * H + dy) * W + dx), src.append(n + i * n + p)
        rows, cols, src = map(np.concatenate, (rows, cols, src))
        order = np.lexsort((cols, rows))
        self.n, self.cols, self.src = n, cols[order], src[order]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])

    def matrix(self, d, w):
        import scipy.sparse
        values = np.concatenate([d, w.reshape(-1)])[self.src]
        return scipy.sparse.csr_matrix((values, self.cols, self.indptr), shape=(self.n, self.n))


def scipy_sample(z, log_diag, off_diag, stencil, pattern: CSRPattern3d):
    from scipy.sparse.linalg import spsolve_triangular
    B, C = z.shape[:2]
    n, S = pattern.n, stencil.S
    d = log_diag.exp().reshape(B * C, n).numpy()
    w = off_diag.reshape(B * C, S, n).numpy()
    zz = z.reshape(B * C, n).numpy()
    out = np.empty_like(zz)
    for k in range(B * C):
        out[k] = spsolve_triangular(pattern.matrix(d[k], w[k]), zz[k], lower=False)
    return torch.from_numpy(out).reshape(z.shape)


def sample_case(label, size, fused, device):
    B, C, D, H, W, stencil = size
    dtype = torch.float64                   # the comparison: float64, exact to 1e-10
    _, _, s, w = make_inputs(B, C, D, H, W, stencil, dtype, device)
    z = torch.randn(B, C, D, H, W, generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
    views = torch.cat([s, w], dim=1).split([C, C * stencil.S], dim=1)
    pattern = CSRPattern3d(stencil, D, H, W)
    plane = B * C * D * H * W * common.element_bytes(dtype)
    return harness.Case(
        label=label, mode="sample", contenders=[
            harness.Contender("fused", lambda: fused.solve_upper(z, s, w, stencil), "structlik cpu kernel"),
            harness.Contender("public", lambda: structlik.ops.solve_upper(z, *views, stencil),
                              "structlik.ops.solve_upper on split-head views, default validation", validated=True),
            harness.Contender("reference", lambda: backends_reference().solve_upper(z, s, w, stencil),
                              "native 3-D wavefronts in Python"),
            harness.Contender("scipy", lambda: scipy_sample(z, s, w, stencil, pattern),
                              "scipy.sparse.linalg.spsolve_triangular per volume (CSR)"),
        ],
        check=lambda got, exp: harness.assert_close_report(got, exp, rtol=1e-10, atol=1e-10),
        fused="fused", reference="reference", input_bytes=(2 + stencil.S) * plane, output_bytes=plane)


def ratios(rows):
    """onehot_over_public (fwd+bwd) and scipy_over_public (sample) on the "public" rows."""
    by = {(r["case"], r["mode"], r["contender"]): r for r in rows}
    for (label, mode, name), row in by.items():
        if name != "public" or "ms" not in row:
            continue
        peer = "one-hot conv3d" if mode == "fwd+bwd" else "scipy"
        other = by.get((label, mode, peer), {}).get("ms")
        if other:
            row["onehot_over_public" if mode == "fwd+bwd" else "scipy_over_public"] = other / row["ms"]


def main():
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fused_name, fused = common.fused_backend(device)
    cases = []
    for label, size in (QUICK if args.quick else SIZES).items():
        cases.append(nll_case(label, size, fused, dtype, device))
    if device.type == "cpu":                # scipy runs on the host only
        for label, size in (QUICK if args.quick else SAMPLE_SIZES).items():
            cases.append(sample_case(label, size, fused, device))
    harness.run("volume", cases, device, min_run_time=args.min_run_time, derive_all=ratios,
                notes="Each case is checked against the reference on its own inputs. On the \"public\" rows: "
                      "onehot_over_public = supn_base's one-hot conv3d / public (NLL fwd+bwd, both on split-head "
                      "views); scipy_over_public = scipy's spsolve_triangular per volume / public (the solve, "
                      "float64). \"public\" ran with Distribution validation on (asserted).")


if __name__ == "__main__":
    main()
