"""Coupled channels (cross weights): what they cost over independent channels, and against the peer's way.

    python -m benchmarks.bench_cross            # supn_base's client: B32, 2-channel 128x128, radius 4
    python -m benchmarks.bench_cross --quick    # seconds: checks the script runs

Four cases at each size, each checked against the reference on its own
inputs: the NLL forward+backward with cross weights and without, and the
sample (M^-1 z) with and without. "public" is what users run: loc, log_diag,
off_diag (and cross) views of one decoder head (``head.split``), default
validation, gradients with respect to the head. "one-hot conv + cross term"
is supn_base's method: a grouped convolution with one one-hot filter per
offset, then each pixel's weighted sum and the cross weights times the
other channels' residuals, autograd for the gradients.

The ratios the issue sets targets for, each of two timings of this run, are
added to the "public" rows: ``over_no_cross`` (with cross weights / the same
call without them) and ``onehot_over_public`` (the peer / public).
"""
from __future__ import annotations

import torch

from benchmarks import common, harness, peers
import structlik
from structlik import Stencil, reference

SIZES = {"B32-C2-128x128-r4": (32, 2, 128, 128, Stencil(4))}
QUICK = {"B2-C2-16x16-r1": (2, 2, 16, 16, Stencil(1)), "B2-C3-12x10-r2": (2, 3, 12, 10, Stencil(2))}


def make_cross(B, C, H, W, dtype, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (0.3 * torch.randn(B, C * (C - 1) // 2, H, W, generator=g, dtype=dtype)).to(device)


def onehot_conv_cross_nll(x, loc, log_diag, off_diag, cross, stencil, filters, pairs):
    """supn_base's NLL: one-hot convolution for the neighbours, the cross term added per pair."""
    B, C, H, W = x.shape
    r = x - loc
    ry, rx = peers._window(stencil)
    neighbours = torch.nn.functional.conv2d(r, filters, padding=(ry, rx), groups=C)
    u = log_diag.exp() * r + (off_diag * neighbours).view(B, C, stencil.S, H, W).sum(2)
    first, second = pairs                     # (c, j) of each plane of cross, c < j
    u = u.index_add(1, first, cross * r.index_select(1, second))
    return 0.5 * u.square().sum((1, 2, 3)) - log_diag.sum((1, 2, 3)) + 0.5 * C * H * W * peers.LOG_2PI


def _head(*parts):
    """One leaf head holding ``parts`` along channels, and a function giving them back as views."""
    sizes = [p.shape[1] for p in parts]
    head = torch.cat(parts, dim=1).detach().requires_grad_()
    return head, lambda h: h.split(sizes, dim=1)


def nll_cases(label, size, fused, dtype, device):
    B, C, H, W, stencil = size
    x, loc, s, w = common.make_inputs(B, C, H, W, stencil, dtype, device)
    xi = make_cross(B, C, H, W, dtype, device)
    filters = peers.onehot_filters(stencil, C, dtype, device)
    pairs = reference.cross_pairs(C, device)
    cases = []
    for coupled in (True, False):
        parts = (loc, s, w, xi) if coupled else (loc, s, w)
        params = [t.detach().clone().requires_grad_() for t in parts]
        head, split = _head(*parts)

        def grads_of(out, leaves):
            return (out, *torch.autograd.grad(out, leaves))

        def on_views(fn, head=head, split=split):
            def run():
                out = fn(*split(head)).sum()
                return (out, *split(torch.autograd.grad(out, head)[0]))
            return run

        def on_params(fn, params=params):
            return lambda: grads_of(fn(*params).sum(), params)

        def public(*p, coupled=coupled):
            return structlik.structured_gaussian_nll(x, *p[:3], stencil, reduction="none",
                                                     cross=p[3] if coupled else None)
        contenders = [
            harness.Contender("fused", on_params(lambda *p: fused.nll(x, *p[:3], stencil, *p[3:])),
                              "structlik cpu kernel, contiguous inputs"),
            harness.Contender("public", on_views(public), "structured_gaussian_nll on split-head views, default "
                              "validation", validated=True),
            harness.Contender("reference", on_params(lambda *p: reference.nll(x, *p[:3], stencil, *p[3:])),
                              "padded shifts, autograd"),
        ]
        if coupled:
            contenders.append(harness.Contender(
                "one-hot conv + cross term",
                on_views(lambda *p: onehot_conv_cross_nll(x, *p, stencil, filters, pairs)),
                "supn_base's method, on split-head views"))
        plane = B * C * H * W * common.element_bytes(dtype)
        n_cross = C * (C - 1) // 2 if coupled else 0
        tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
        cases.append(harness.Case(
            label=label, mode="fwd+bwd" if coupled else "fwd+bwd no cross", contenders=contenders,
            check=lambda got, exp, tol=tol: harness.assert_close_report(got, exp, **tol),
            fused="fused", reference="reference",
            input_bytes=(3 + stencil.S) * plane + n_cross * plane // C,
            output_bytes=B * common.element_bytes(dtype) + (2 + stencil.S) * plane + n_cross * plane // C))
    return cases


def sample_cases(label, size, fused, dtype, device):
    B, C, H, W, stencil = size
    _, _, s, w = common.make_inputs(B, C, H, W, stencil, dtype, device)
    xi = make_cross(B, C, H, W, dtype, device)
    z = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
    cases = []
    for coupled in (True, False):
        cross = xi if coupled else None
        head = torch.cat([s, w] + ([xi] if coupled else []), dim=1)
        views = head.split([C, C * stencil.S] + ([xi.shape[1]] if coupled else []), dim=1)
        plane = B * C * H * W * common.element_bytes(dtype)
        tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
        cases.append(harness.Case(
            label=label, mode="sample" if coupled else "sample no cross", contenders=[
                harness.Contender("fused", lambda cross=cross: fused.solve_upper(z, s, w, stencil, cross),
                                  "structlik cpu kernel"),
                harness.Contender("public", lambda v=views: structlik.ops.solve_upper(z, *v[:2], stencil, *v[2:]),
                                  "structlik.ops.solve_upper on split-head views, default validation",
                                  validated=True),
                harness.Contender("reference", lambda cross=cross: reference.solve_upper(z, s, w, stencil, cross),
                                  "wavefronts in Python"),
            ],
            check=lambda got, exp, tol=tol: harness.assert_close_report(got, exp, **tol),
            fused="fused", reference="reference",
            input_bytes=(2 + stencil.S) * plane + (C * (C - 1) // 2 if coupled else 0) * plane // C,
            output_bytes=plane))
    return cases


def ratios(rows):
    """over_no_cross and onehot_over_public on the coupled cases' "public" rows."""
    by = {(r["case"], r["mode"], r["contender"]): r for r in rows}
    for (label, mode, name), row in by.items():
        if name != "public" or "no cross" in mode or "ms" not in row:
            continue
        plain = by.get((label, f"{mode} no cross", "public"), {}).get("ms")
        if plain:
            row["over_no_cross"] = row["ms"] / plain
        peer = by.get((label, mode, "one-hot conv + cross term"), {}).get("ms")
        if peer:
            row["onehot_over_public"] = peer / row["ms"]


def main():
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fused_name, fused = common.fused_backend(device)
    sizes = QUICK if args.quick else SIZES
    cases = []
    for label, size in sizes.items():
        cases += nll_cases(label, size, fused, dtype, device) + sample_cases(label, size, fused, dtype, device)
    harness.run("cross", cases, device, min_run_time=args.min_run_time, derive_all=ratios,
                notes="Each case is checked against the reference on its own inputs (with or without cross "
                      "weights). On the coupled cases' \"public\" rows: over_no_cross = that time / the same call "
                      "without cross weights; onehot_over_public = supn_base's one-hot convolution + cross term / "
                      "public, both on split-head views. \"public\" ran with Distribution validation on (asserted).")


if __name__ == "__main__":
    main()
