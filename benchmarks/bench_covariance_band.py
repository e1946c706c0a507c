"""Exact per-pixel variances diag(Lambda^-1): StructuredNormal.variance against the ways a user has.

    python -m benchmarks.bench_covariance_band           # 64x64 (B4) and 128x128 (B1), radius 2, one thread
    python -m benchmarks.bench_covariance_band --full    # also the dense inverse at 128x128 (148 s, 6.4 GB)
    python -m benchmarks.bench_covariance_band --quick   # 16x16: checks the script runs

float64, one CPU thread (torch, OpenMP and OpenBLAS: set before numpy loads), Lambda = U^T U of
``StructuredNormal.from_head`` of a random head (weights bound at 0.9 of the diagonal, as a
decoder's are). Times are per image (the batch's time over B). Each row's error is its largest
|variance - dense float64 variance| (at 128x128 without --full: against SelInv's).

Rows: structlik's ``.variance`` (C++ band recurrence) and its reference backend (block-Takahashi
in PyTorch); n solves U^-T e_p with structlik's own solve (one call, all n right-hand sides);
n scipy ``spsolve_triangular`` solves; a dense ``cholesky_inverse``; Monte Carlo over 1,000
samples; SelInv (``selinv``, selected inversion, MMD ordering, needs gfortran and LAPACK); and the
band recurrence in plain numpy (the C++ sweep, row by row).
"""
from __future__ import annotations

import os
import sys

if "--threads-inherit" not in sys.argv:        # one thread everywhere, before numpy or torch load
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

import datetime  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import harness  # noqa: E402
from structlik import Stencil, StructuredNormal, backends, ops, reference  # noqa: E402


def distribution(B, H, W, stencil, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = 0.5 * torch.randn(B, 2 + stencil.S, H, W, generator=g, dtype=torch.float64)
    return StructuredNormal.from_head(head, stencil)


def csr_upper(ld, od, stencil):
    """U of one plane as a scipy CSR matrix."""
    import scipy.sparse as sp
    U = ops.to_dense_upper(ld, od, stencil)[0, 0].numpy()
    return sp.csr_matrix(U)


def n_solves(dist):
    """diag(Sigma)_p = ||U^-T e_p||^2 with structlik's solve: n right-hand sides in one call."""
    ld, od = dist._flat_params()
    C, H, W = dist.event_shape
    n = H * W
    out = []
    for b in range(ld.shape[0]):
        e = torch.eye(n, dtype=ld.dtype).reshape(n, 1, H, W)
        v = ops.solve_upper_t(e, ld[b:b + 1].expand(n, -1, -1, -1), od[b:b + 1].expand(n, -1, -1, -1), dist.stencil)
        out.append(v.square().sum((1, 2, 3)).reshape(H, W))
    return torch.stack(out)


def scipy_solves(U):
    """n spsolve_triangular solves: U^T X = I, diag(Sigma) = column sums of X^2."""
    from scipy.sparse.linalg import spsolve_triangular
    X = spsolve_triangular(U.T.tocsr(), np.eye(U.shape[0]), lower=True)
    return (X * X).sum(0)


def dense_inverse(ld, od, stencil):
    U = ops.to_dense_upper(ld, od, stencil)[0, 0]
    return torch.cholesky_inverse(torch.linalg.cholesky(U.T @ U)).diagonal()


def selinv_diagonal(U):
    import scipy.sparse as sp
    import selinv
    lam = (U.T @ U).tocsc()
    return selinv.selinv(sp.tril(lam).tocsc())


def numpy_band(U_csr, b):
    """The band recurrence of csrc/covariance_band.cpp in numpy, one row of U at a time (the window
    indexed by pixel mod L)."""
    n, L = U_csr.shape[0], b + 1
    win = np.zeros((L, L))
    out = np.empty(n)
    indptr, indices, data = U_csr.indptr, U_csr.indices, U_csr.data
    for p in range(n - 1, -1, -1):
        cols, vals = indices[indptr[p]:indptr[p + 1]], data[indptr[p]:indptr[p + 1]]
        d = vals[cols == p][0]
        off = cols != p
        cols, vals = cols[off], vals[off]
        j = np.arange(p + 1, min(p + b, n - 1) + 1)
        acc = vals @ win[np.ix_(cols % L, j % L)] if len(cols) else np.zeros(len(j))
        row = -acc / d
        win[p % L, j % L] = row
        win[j % L, p % L] = row
        diag = (1 / d - (vals @ row[cols - p - 1] if len(cols) else 0.0)) / d
        win[p % L, p % L] = diag
        out[p] = diag
    return out


def timed(fn, repeat):
    """Median seconds of ``repeat`` calls (after one warm-up call) and the last result; with
    ``repeat`` 0, the one call's time (the slow ways)."""
    if repeat == 0:
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out
    out = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def run_size(B, H, W, stencil, full, quick):
    dist = distribution(B, H, W, stencil)
    ld, od = dist._flat_params()
    U0 = csr_upper(ld[:1], od[:1], stencil)
    big = H * W > 10_000
    rows = {}

    def add(name, fn, per, repeat=3):
        seconds, value = timed(fn, repeat)
        rows[name] = (seconds / per, torch.as_tensor(np.asarray(value), dtype=torch.float64).reshape(-1, H * W))

    add("structlik .variance (C++ band recurrence)", lambda: dist.variance, B, repeat=10)
    with backends.using("reference"):
        add("structlik reference backend (block recurrence, PyTorch)", lambda: dist.variance, B)
    if not big:
        add("n solves U^-T e_p (structlik's solve)", lambda: n_solves(dist), B, repeat=1)
        add("dense cholesky_inverse", lambda: dense_inverse(ld[:1], od[:1], stencil), 1, repeat=1)
    elif full:
        add("dense cholesky_inverse", lambda: dense_inverse(ld[:1], od[:1], stencil), 1, repeat=0)
    add("n spsolve_triangular solves (scipy)", lambda: scipy_solves(U0), 1, repeat=0 if big else 1)
    torch.manual_seed(0)
    add("Monte Carlo, 1,000 samples", lambda: dist.sample((1000,)).var(0), B, repeat=1)
    try:
        add("SelInv (selinv, MMD ordering)", lambda: selinv_diagonal(U0), 1, repeat=3)
    except ImportError as err:
        print(f"SelInv not timed: {err}", file=sys.stderr)
    b = reference.band_width(stencil, W)
    add("band recurrence in plain numpy", lambda: numpy_band(U0, b), 1, repeat=0 if quick else 1)
    exact = rows.get("dense cholesky_inverse") or rows.get("SelInv (selinv, MMD ordering)")
    reference_name = "dense" if "dense cholesky_inverse" in rows else "SelInv"
    ours = rows["structlik .variance (C++ band recurrence)"][0]
    out = []
    for name, (seconds, value) in rows.items():
        err = ((value[:1] - exact[1][:1]).abs() / exact[1][:1]).max().item()
        out.append({"size": f"{H}x{W} r{stencil.radius}", "B": B, "way": name, "s per image": f"{seconds:.3g}",
                    "over structlik": f"{seconds / ours:.3g}x", f"max rel. error vs {reference_name}": f"{err:.1e}"})
    L = b + 1
    return out, L * L * 8, b * b * 8


def main():
    p = harness_parser()
    args = p.parse_args()
    torch.set_num_threads(1)
    stencil = Stencil(2)
    sizes = [(2, 16, 16)] if args.quick else [(4, 64, 64), (1, 128, 128)]
    rows, windows = [], []
    for B, H, W in sizes:
        part, window, band_window = run_size(B, H, W, stencil, args.full, args.quick)
        rows += part
        windows.append(f"{H}x{W}: the C++ sweep's window is (b+1)^2 = {window / 2**10:.0f} KiB per plane in flight "
                       f"(band window b^2: {band_window / 2**10:.0f} KiB)")
    header = (f"## Exact marginal variances diag(Lambda^-1), radius 2, float64, one thread\n\n"
              f"- device: {harness.device_name(torch.device('cpu'))}\n- date: {datetime.date.today()}, torch "
              f"{torch.__version__}, {platform.machine()}\n- command: {harness.command()}\n\n"
              "Lambda = U^T U of StructuredNormal.from_head(random head) (weights bound at 0.9); seconds per image "
              "(median of the repeats; the batch's time over B); 'over structlik': that time over .variance's; "
              "error: largest |variance - exact| / exact on the first image (exact: a dense float64 inverse, "
              "or SelInv's "
              "where the dense one was not run). Monte Carlo's error is its sampling error.\n\n")
    text = header + harness.markdown(rows, list(rows[0])) + "\n\n" + "\n".join(f"- {w}" for w in windows) + "\n"
    print(text)
    if not args.quick:
        with open(os.path.join(harness.RESULTS_DIR, "covariance_band-cpu.md"), "w") as f:
            f.write(text)


def harness_parser():
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16x16: checks the script runs")
    p.add_argument("--full", action="store_true", help="also the dense inverse at 128x128 (148 s, 6.4 GB)")
    p.add_argument("--threads-inherit", action="store_true", help="keep the thread settings of the environment")
    return p


if __name__ == "__main__":
    main()
