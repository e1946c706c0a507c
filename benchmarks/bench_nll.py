"""NLL forward and forward+backward: the fused kernel against the public API, the reference and the peers.

    python -m benchmarks.bench_nll                 # the targets' sizes for the device (see common.DEFAULT_SIZES)
    python -m benchmarks.bench_nll --sizes B16-C1-256x256-r3
    python -m benchmarks.bench_nll --quick         # seconds: checks the script runs

"fused" is the kernel alone on contiguous tensors. Every other contender gets
what users have: loc, log_diag and off_diag as views of one decoder head
(``head.split([C, C, C*S], dim=1)``), gradients taken with respect to the head.
"public" is ``structlik.structured_gaussian_nll`` with its default validation,
timed while validation is on (asserted; the torch.compile contender runs last,
since dynamo turns validation off for the whole process). "split backward
alone" is what autograd's backward of ``head.split`` (a cat of the three
gradients) would cost by itself: the public path never runs it (the NLL takes
the head whole, ``structlik.ops.head_of``), so its ratio is compared with the
fused kernel's as it is, nothing subtracted.
"""
from __future__ import annotations

import torch

from benchmarks import common, harness, peers
import structlik
from structlik import reference


def split_head(loc, log_diag, off_diag):
    """The decoder head these came from (a leaf), and a function splitting it back into views."""
    C, CS = loc.shape[1], off_diag.shape[1]
    head = torch.cat([loc, log_diag, off_diag], dim=1).detach().requires_grad_()
    return head, lambda h: h.split([C, C, CS], dim=1)


def from_head_contender(x, head, stencil, mode):
    """The quick start's path: StructuredNormal.from_head with its default weight bound (0.9), the
    head's off_diag channels taken as raw weights. A different function of the head than the
    others (bounded weights), so not compared with the reference here: tests/test_bound_fused.py
    checks it against a dense float64 NLL."""
    def run():
        if mode == "fwd":
            with torch.no_grad():
                return structlik.StructuredNormal.from_head(head, stencil).log_prob(x)
        out = -structlik.StructuredNormal.from_head(head, stencil).log_prob(x).sum()
        return out, torch.autograd.grad(out, head)[0]
    return harness.Contender("from_head (bound 0.9)", run, "the quick start: from_head's default bound, in the kernel",
                             validated=True, checked=False)


def bound_over_public(rows):
    """from_head's default bound against the unbounded split views (issue #41: at most 1.15x)."""
    public, bounded = (rows.get(n, {}).get("ms") for n in ("public", "from_head (bound 0.9)"))
    if public and bounded:
        rows["from_head (bound 0.9)"]["over_public"] = bounded / public


def contenders_for(nll_fns, inputs, mode, stencil):
    x, loc, log_diag, off_diag = inputs
    params = [t.detach().clone().requires_grad_() for t in (loc, log_diag, off_diag)]
    head, split = split_head(loc, log_diag, off_diag)

    def wrap(fn, on_views):
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(x, *(split(head) if on_views else params))
            return run

        def run():
            # autograd.grad, not .backward(): no .grad kept between calls, so the peak
            # memory of one call counts its gradients
            if on_views:
                out = fn(x, *split(head)).sum()
                return (out, *split(torch.autograd.grad(out, head)[0]))
            out = fn(x, *params).sum()
            return (out, *torch.autograd.grad(out, params))
        return run

    out = [harness.Contender(name, wrap(fn, name != "fused"), note, validated=name == "public",
                             compiles=name == "compiled reference") for name, fn, note in nll_fns]
    out.append(from_head_contender(x, head, stencil, mode))
    if mode == "fwd+bwd":
        grads = [torch.randn_like(t) for t in (loc, log_diag, off_diag)]
        out.append(harness.Contender(
            "split backward alone", lambda: torch.autograd.grad(split(head), head, grads)[0],
            "autograd's backward of head.split by itself", checked=False))
    return out


def onehot_over_public(rows):
    """How many times slower the one-hot convolution is than the public path, both on split views;
    and from_head's bound against the public path."""
    public, onehot = (rows.get(n, {}).get("ms") for n in ("public", "one-hot conv"))
    if public and onehot:
        rows["public"]["onehot_over_public"] = onehot / public
    bound_over_public(rows)


def main():
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fused_name, fused = common.fused_backend(device)
    cases = []
    for label, (B, C, H, W, stencil) in common.selected_sizes(args, "nll").items():
        inputs = common.make_inputs(B, C, H, W, stencil, dtype, device)
        filters = peers.onehot_filters(stencil, C, dtype, device)
        compiled = common.compiled_lazily(reference.nll)
        nll_fns = [
            ("fused", lambda *a, st=stencil: fused.nll(*a, st), f"structlik {fused_name} kernel, contiguous inputs"),
            ("public", lambda *a, st=stencil: structlik.structured_gaussian_nll(*a, st, reduction="none"),
             "structured_gaussian_nll, default validation"),
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
                label=label, mode=mode, contenders=contenders_for(nll_fns, inputs, mode, stencil),
                check=lambda got, exp, tol=tol: harness.assert_close_report(got, exp, **tol),
                fused="fused", reference="reference", input_bytes=inputs_bytes, output_bytes=outputs_bytes[mode]))
    harness.run("nll", cases, device, min_run_time=args.min_run_time, derive=onehot_over_public,
                notes="Every contender but \"fused\" reads loc, log_diag and off_diag as views of one head "
                      "(head.split); \"public\" ran with Distribution validation on (asserted); its ratio is to the "
                      "fused kernel on contiguous inputs, nothing subtracted. onehot_over_public: one-hot conv / "
                      "public. \"from_head (bound 0.9)\": the quick start's StructuredNormal.from_head(head, stencil) "
                      "with its default weight bound, bounded inside the kernel; over_public: its time / public's.")


if __name__ == "__main__":
    main()
