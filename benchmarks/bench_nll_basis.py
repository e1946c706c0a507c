"""The NLL with a learned basis (paper section 4.3): fused vs materialise-then-NLL.

    python -m benchmarks.bench_nll_basis            # radius 3, n_b = 6, B=64, 64x64
    python -m benchmarks.bench_nll_basis --quick

Forward + backward, gradients for loc, log_diag, the coefficients and the basis.
"""
from __future__ import annotations

import torch

from benchmarks import common, harness
from structlik import Stencil, expand_basis, reference

SIZES = {"B64-C1-64x64-r3-nb6": (64, 1, 64, 64, Stencil(3), 6)}
QUICK = {"B4-C2-16x12-r2-nb4": (4, 2, 16, 12, Stencil(2), 4)}


def main():
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fused_name, fused = common.fused_backend(device)
    cases = []
    for label, (B, C, H, W, stencil, n_b) in (QUICK if args.quick else SIZES).items():
        x, loc, log_diag, _ = common.make_inputs(B, C, H, W, stencil, dtype, device)
        g = torch.Generator(device="cpu").manual_seed(1)
        coeffs = (0.2 * torch.randn(B, C * n_b, H, W, generator=g, dtype=dtype)).to(device)
        basis = (torch.randn(stencil.S, n_b, generator=g, dtype=dtype) / n_b ** 0.5).to(device)
        params = [t.clone().requires_grad_() for t in (loc, log_diag, coeffs, basis)]

        def fwd_bwd(nll_fn):
            def run():
                out = nll_fn(x, *params).sum()
                return (out, *torch.autograd.grad(out, params))
            return run

        contenders = [
            harness.Contender("fused", fwd_bwd(lambda x, m, s, c, b: fused.nll_basis(x, m, s, c, b, stencil)),
                              f"structlik {fused_name} nll_basis: weights formed in the kernel"),
            harness.Contender("materialise + fused NLL",
                              fwd_bwd(lambda x, m, s, c, b: fused.nll(x, m, s, expand_basis(c, b), stencil)),
                              "expand_basis (B, C*S, H, W), then the fused NLL"),
            harness.Contender("reference", fwd_bwd(lambda x, m, s, c, b: reference.nll_basis(x, m, s, c, b, stencil)),
                              "expand_basis, then the reference NLL"),
        ]
        tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
        esize = common.element_bytes(dtype)
        plane = B * C * H * W * esize
        basis_bytes = basis.numel() * esize
        inputs_bytes = (3 + n_b) * plane + basis_bytes                      # x, loc, log_diag, coeffs, basis
        outputs_bytes = B * esize + (2 + n_b) * plane + basis_bytes         # the NLL, the gradients but x's
        cases.append(harness.Case(label=label, mode="fwd+bwd", contenders=contenders,
                                  check=lambda got, exp, tol=tol: harness.assert_close_report(got, exp, **tol),
                                  fused="fused", reference="reference", input_bytes=inputs_bytes,
                                  output_bytes=outputs_bytes))
    harness.run("nll_basis", cases, device, min_run_time=args.min_run_time)


if __name__ == "__main__":
    main()
