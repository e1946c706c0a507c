"""Low-rank modes (cov_factor): what rank R costs over the structured likelihood alone, and against torch's
LowRankMultivariateNormal (diagonal + rank R).

    python -m benchmarks.bench_low_rank            # B32 64x64 r2, rank 10 (issue #43's target size)
    python -m benchmarks.bench_low_rank --quick    # seconds: checks the script runs

log_prob forward+backward, the public path: ``StructuredNormal.from_head(head, stencil, rank=R,
weight_bound=None)`` on one decoder head, default validation, gradients with respect to the head.
"rank R" is checked against the same call on the reference backend; "rank 0" (the structured part
alone, the fused NLL kernel) and "LowRankMultivariateNormal" (torch's diagonal + rank R over the
flattened image, its head split the same way) compute other models and are timed only.

Added to the "rank R" row: ``over_rank0`` (its time / rank 0's) and ``lowrank_mvn_over`` (torch's
diagonal + rank R / its time), each of two timings of this run.
"""
from __future__ import annotations

import torch
from torch.distributions import LowRankMultivariateNormal

from benchmarks import common, harness
import structlik
from structlik import Stencil, backends

SIZES = {"B32-C1-64x64-r2": (32, 1, 64, 64, Stencil(2))}
QUICK = {"B2-C1-16x16-r1": (2, 1, 16, 16, Stencil(1))}
RANK, QUICK_RANK = 10, 3


def _head(B, C, H, W, stencil, rank, dtype, device):
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(B, C, H, W, generator=g), 0.3 * torch.randn(B, C, H, W, generator=g),
             (0.3 / stencil.S ** 0.5) * torch.randn(B, C * stencil.S, H, W, generator=g)]
    if rank:
        parts.append(0.3 * torch.randn(B, rank * C, H, W, generator=g))
    return torch.cat(parts, 1).to(dtype=dtype, device=device).requires_grad_()


def cases_of(label, size, rank, dtype, device):
    B, C, H, W, stencil = size
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
    head, head0 = _head(B, C, H, W, stencil, rank, dtype, device), _head(B, C, H, W, stencil, 0, dtype, device)
    n = C * H * W
    mvn_head = torch.cat([x.reshape(B, n), 0.3 * torch.randn(B, n, dtype=dtype, device=device),
                          0.3 * torch.randn(B, n * rank, dtype=dtype, device=device)], 1).requires_grad_()

    def structured(h, r):
        def run():
            out = structlik.StructuredNormal.from_head(h, stencil, rank=r, weight_bound=None).log_prob(x).sum()
            return (out, torch.autograd.grad(out, h)[0])
        return run

    def on_reference():
        with backends.using("reference"):
            return structured(head, rank)()

    def low_rank_mvn():
        loc, log_scale, factor = mvn_head.split([n, n, n * rank], 1)
        d = LowRankMultivariateNormal(loc, factor.reshape(B, n, rank), (2 * log_scale).exp())
        out = d.log_prob(x.reshape(B, n)).sum()
        return (out, torch.autograd.grad(out, mvn_head)[0])

    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
    plane = B * C * H * W * common.element_bytes(dtype)
    per = 2 + stencil.S + rank
    return [harness.Case(
        label=label, mode="log_prob fwd+bwd", contenders=[
            harness.Contender(f"rank {rank}", structured(head, rank), "from_head(rank=R) on one head, default "
                              "validation", validated=True),
            harness.Contender("reference", on_reference, "the same on the reference backend", validated=True),
            harness.Contender("rank 0", structured(head0, 0), "the structured part alone (fused NLL)",
                              validated=True, checked=False),
            harness.Contender("LowRankMultivariateNormal", low_rank_mvn, f"torch: diagonal + rank {rank}",
                              checked=False),
        ],
        check=lambda got, exp, tol=tol: harness.assert_close_report(got, exp, **tol),
        fused=f"rank {rank}", reference="reference",
        input_bytes=(1 + per) * plane, output_bytes=per * plane)]


def ratios(rank):
    def derive(rows):
        row, zero, mvn = rows[f"rank {rank}"], rows["rank 0"].get("ms"), rows["LowRankMultivariateNormal"].get("ms")
        if "ms" in row and zero:
            row["over_rank0"] = row["ms"] / zero
        if "ms" in row and mvn:
            row["lowrank_mvn_over"] = mvn / row["ms"]
    return derive


def main():
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sizes, rank = (QUICK, QUICK_RANK) if args.quick else (SIZES, RANK)
    cases = []
    for label, size in sizes.items():
        cases += cases_of(label, size, rank, dtype, device)
    harness.run("low_rank", cases, device, min_run_time=args.min_run_time, derive=ratios(rank),
                notes=f"log_prob forward+backward with rank {rank} (checked against the reference backend), "
                      "rank 0 and torch's LowRankMultivariateNormal (other models, timed only). over_rank0 = rank R "
                      "/ rank 0; lowrank_mvn_over = LowRankMultivariateNormal / rank R. Validation on (asserted).")


if __name__ == "__main__":
    main()
