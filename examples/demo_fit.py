"""Fit a structured and a diagonal Gaussian to correlated noise; compare held-out log-likelihoods.

The noise is white noise blurred by a small kernel, so neighbouring pixels are
correlated. A diagonal Gaussian can only learn per-pixel variances; the
structured one (one weight per neighbour and pixel, here shared over the image)
captures the correlation and assigns the held-out images a much higher
log-likelihood. Runs in seconds on a CPU:

    python examples/demo_fit.py
"""
import argparse
import math

import torch
import torch.nn.functional as F

import structlik


def correlated_noise(n, size, generator):
    white = torch.randn(n, 1, size + 2, size + 2, generator=generator)
    kernel = torch.tensor([[0.5, 1.0, 0.5], [1.0, 2.0, 1.0], [0.5, 1.0, 0.5]]).div(4).view(1, 1, 3, 3)
    return F.conv2d(white, kernel)


def fit(data, stencil, steps, structured):
    H, W = data.shape[-2:]
    loc = torch.zeros(1, 1, H, W, requires_grad=True)
    log_diag = torch.zeros(1, 1, H, W, requires_grad=True)
    off_diag = torch.zeros(1, stencil.S, H, W, requires_grad=structured)
    params = [loc, log_diag] + ([off_diag] if structured else [])
    opt = torch.optim.Adam(params, lr=0.05)
    loss_fn = structlik.StructuredGaussianNLLLoss(stencil)
    B = data.shape[0]
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(data, loc.expand_as(data), log_diag.expand_as(data), off_diag.expand(B, -1, -1, -1))
        loss.backward()
        opt.step()
    return structlik.StructuredNormal(loc.detach(), log_diag.detach(), off_diag.detach(), stencil)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--radius", type=int, default=2)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    train, test = correlated_noise(512, args.size, g), correlated_noise(256, args.size, g)
    stencil = structlik.Stencil(args.radius)
    n = args.size ** 2
    print(f"correlated noise {args.size}x{args.size}, {stencil}, backend: {structlik.backends.name_of(train.device)}")
    print("| model | held-out log-likelihood (nats/image) | bits/dim |")
    print("|---|---|---|")
    for name, structured in (("diagonal Gaussian", False), ("structured Gaussian", True)):
        model = fit(train, stencil, args.steps, structured)
        ll = model.expand((test.shape[0],)).log_prob(test).mean().item()
        print(f"| {name} | {ll:.1f} | {-ll / n / math.log(2):.3f} |")


if __name__ == "__main__":
    main()
