"""NLL forward and forward+backward: the fused kernel against the reference and the peers.

    python benchmarks/bench_nll.py                 # the targets' sizes for the device (see common.DEFAULT_SIZES)
    python benchmarks/bench_nll.py --sizes B16-C1-256x256-r3
    python benchmarks/bench_nll.py --quick         # seconds: checks the script runs
"""
from __future__ import annotations

import torch

import common
import harness
import peers
import structlik
from structlik import reference


def contenders_for(nll_fns, inputs, mode):
    x, loc, log_diag, off_diag = inputs
    params = [t.detach().clone().requires_grad_() for t in (loc, log_diag, off_diag)]

    def wrap(fn):
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(x, *params)
            return run

        def run():
            # autograd.grad, not .backward(): no .grad kept between calls, so the peak
            # memory of one call counts its gradients
            out = fn(x, *params).sum()
            return (out, *torch.autograd.grad(out, params))
        return run

    return [harness.Contender(name, wrap(fn), note) for name, fn, note in nll_fns]


def main():
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fused_name, fused = common.fused_backend(device)
    cases = []
    for label, (B, C, H, W, stencil) in common.selected_sizes(args, "nll").items():
        inputs = common.make_inputs(B, C, H, W, stencil, dtype, device)
        filters = peers.onehot_filters(stencil, C, dtype, device)
        compiled = torch.compile(reference.nll, dynamic=False)
        nll_fns = [
            ("fused", lambda *a, st=stencil: fused.nll(*a, st), f"structlik {fused_name} kernel"),
            ("fused + checks", lambda *a, st=stencil: structlik.structured_gaussian_nll(*a, st, reduction="none"),
             "public API: shape and NaN/inf checks"),
            ("reference", lambda *a, st=stencil: reference.nll(*a, st), "padded shifts, autograd"),
            ("one-hot conv", lambda *a, st=stencil, f=filters: peers.onehot_conv_nll(*a, st, f),
             "SUPN / authors' method"),
            ("unfold + einsum", lambda *a, st=stencil: peers.unfold_einsum_nll(*a, st), ""),
            ("compiled reference", lambda *a, st=stencil, c=compiled: c(*a, st), "torch.compile (inductor)"),
        ]
        tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
        plane = B * C * H * W * common.element_bytes(dtype)
        inputs_bytes = (3 + stencil.S) * plane                     # x, loc, log_diag, off_diag
        nll_bytes = B * common.element_bytes(dtype)
        outputs_bytes = {"fwd": nll_bytes,
                         "fwd+bwd": nll_bytes + (2 + stencil.S) * plane}    # and the gradients but x's
        for mode in ("fwd", "fwd+bwd"):
            cases.append(harness.Case(
                label=label, mode=mode, contenders=contenders_for(nll_fns, inputs, mode),
                check=lambda got, exp, tol=tol: harness.assert_close_report(got, exp, **tol),
                fused="fused", reference="reference", input_bytes=inputs_bytes, output_bytes=outputs_bytes[mode]))
    harness.run("nll", cases, device, min_run_time=args.min_run_time)


if __name__ == "__main__":
    main()
