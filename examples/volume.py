"""A structured Gaussian over 3-D volumes (MRI, CT, microscopy stacks), on synthetic data.

    python -m examples.volume            # ~10 s on a 2-core CPU; prints the table below

No volume ships offline in the packages structlik's examples use (skimage's cells3d downloads), so
the data are synthetic: smooth random "tissue" (B, 1, 24, 24, 24) plus noise correlated across
neighbouring voxels and slices (white noise through a 3x3x3 smoothing filter, as a scanner's
reconstruction correlates it). The noise model is fitted by maximum likelihood on training volumes
and scored on held-out ones, as a diagonal Gaussian (one sigma) and as structlik's StructuredNormal
with a radius-1 3-D stencil (13 weights a voxel, shared over the volume here: a decoder would
predict them per voxel, as a head of (2 + S) channels), with the default weight bound and with raw
weights. Printed: each fit's exact correlations of the centre voxel with its neighbours (from the
covariance, not sampled) and its exact standard deviation, against the noise's empirical ones.
The bound (sum_i |w| < 0.9 d, diagonal dominance) caps how strongly a radius-1 factor correlates
neighbours: noise this correlated (0.67 next door) is matched only without it.
"""
from __future__ import annotations

import math

import torch

import structlik
from structlik import Stencil, StructuredNormal

SIZE, TRAIN, TEST = 24, 16, 8


def volumes(n: int, generator: torch.Generator):
    """(clean, noisy), each (n, 1, SIZE, SIZE, SIZE): blobs, and noise correlated over 3x3x3 voxels."""
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, SIZE)] * 3, indexing="ij"))
    clean = torch.zeros(n, 1, SIZE, SIZE, SIZE)
    for _ in range(6):
        centre = torch.rand(n, 3, 1, 1, 1, generator=generator) * 1.6 - 0.8
        width = 0.15 + 0.3 * torch.rand(n, 1, 1, 1, 1, generator=generator)
        clean += torch.exp(-((grid[None] - centre) ** 2).sum(1, keepdim=True) / (2 * width ** 2))
    white = torch.randn(n, 1, SIZE + 2, SIZE + 2, SIZE + 2, generator=generator)
    smooth = torch.nn.functional.conv3d(white, torch.full((1, 1, 3, 3, 3), 1 / 27 ** 0.5))
    return clean, clean + 0.1 * smooth


def fit(residual: torch.Tensor, stencil: Stencil, bound, steps: int = 300):
    """log_diag and off_diag, one value each over the volume, maximising the likelihood of ``residual``;
    the weights through ``bound_weights`` (``bound`` a number) or as ``raw * d`` (``bound`` None)."""
    shape = residual.shape[2:]
    log_diag = torch.zeros(1, 1, 1, 1, 1, requires_grad=True)
    raw = torch.zeros(1, stencil.S, 1, 1, 1, requires_grad=True)
    opt = torch.optim.Adam([log_diag, raw], lr=0.05)

    def params():
        ld = log_diag.expand(residual.shape[0], 1, *shape) + math.log(10.0)     # sigma 0.1 to start
        w = raw.expand(residual.shape[0], stencil.S, *shape)
        return ld, structlik.bound_weights(ld, w, bound) if bound is not None else w * ld.exp()
    for _ in range(steps):
        opt.zero_grad()
        loss = structlik.structured_gaussian_nll(residual, torch.zeros_like(residual), *params(), stencil)
        loss.backward()
        opt.step()
    return [t.detach() for t in params()]


def main():
    g = torch.Generator().manual_seed(0)
    clean, noisy = volumes(TRAIN + TEST, g)
    residual = noisy - clean
    train, test = residual[:TRAIN], residual[TRAIN:]
    stencil = Stencil(1, ndim=3)
    n = SIZE ** 3

    sigma = train.std()
    diagonal = -torch.distributions.Normal(0, sigma).log_prob(test).sum((1, 2, 3, 4)).mean() / n
    print(f"held-out NLL per voxel: diagonal Gaussian {diagonal:.4f} nats")
    c = SIZE // 2
    near = ((0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 0, 0))
    centre = residual[:, 0, c, c, c]
    empirical = [(centre * residual[:, 0, c + dz, c + dy, c + dx]).mean()
                 / (centre.std() * residual[:, 0, c + dz, c + dy, c + dx].std()) for dz, dy, dx in near]
    print("correlation with the centre voxel      next x   next y   next slice   two slices   std at the centre")
    print(f"  the noise (empirical, {TRAIN + TEST} volumes)    " + "".join(f"{v:9.3f}" for v in empirical)
          + f"     {centre.std():9.4f}")
    for bound in (0.9, None):
        ld, od = fit(train, stencil, bound)
        dist = StructuredNormal(torch.zeros_like(test), ld[:1].expand_as(test),
                                od[:1].expand(TEST, -1, -1, -1, -1), stencil)
        structured = -dist.log_prob(test).mean() / n
        one = StructuredNormal(dist.loc[:1], dist.log_diag[:1], dist.off_diag[:1], stencil)     # one volume's
        corr = one.correlation((c, c, c))[0, 0]
        std = one.stddev[0, 0, c, c, c]
        name = f"weight_bound={bound}" if bound is not None else "raw weights"
        print(f"  structured, {name:<22}" + "".join(f"{corr[c + dz, c + dy, c + dx]:9.3f}" for dz, dy, dx in near)
              + f"     {std:9.4f}   held-out NLL {structured:.4f} nats a voxel")
    samples = one.sample((4,))
    print(f"4 samples of the last fit's noise: shape {tuple(samples.shape)}, std {samples.std():.4f}")


if __name__ == "__main__":
    main()
