"""Inpainting with a finished run's models: a hole in held-out photo crops, filled by each model's
conditional distribution given the pixels around it.

    python -m examples.vae.inpaint runs/vae                 # photos, a 12x12 hole, 64 test crops
    python -m examples.vae.inpaint runs/vae --data mnist --hole 8

Both models see the crop with its hole filled by the mean of the pixels around it (so neither
encoder knows what the hole held) and decode a distribution at the posterior mean. The
structured model's luminance is then conditioned on the observed luminance
(``StructuredNormal.condition``: its covariance carries the rim into the hole); the diagonal
model's conditional is its own marginal (its pixels are independent). Chroma is diagonal at a
quarter of the resolution in both, so its conditional is its marginal in both; the hole is
placed on the chroma grid. Reported over the test crops: the hole's mean squared error in RGB
(the conditional mean against the truth) and the hole's NLL in nats (luminance and chroma, in
YCbCr, the space both models share). The figure goes to OUT/<data>_inpainting.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from . import figures
from .tail import structured_at_test

MODELS = ("diagonal", "structured")


def hole_mask(H: int, W: int, size: int, grid: int) -> torch.Tensor:
    """(1, 1, H, W), True where observed: a size x size hole near the centre, on multiples of ``grid``."""
    top, left = ((H - size) // 2) // grid * grid, ((W - size) // 2) // grid * grid
    mask = torch.ones(1, 1, H, W, dtype=torch.bool)
    mask[..., top:top + size, left:left + size] = False
    return mask


@torch.no_grad()
def inpaint(model, x: torch.Tensor, mask: torch.Tensor, samples: int):
    """(conditional mean RGB, conditional samples RGB, hole NLL per image, hole MSE per image, the
    conjugate-gradient iterations of the structured model's samples (None for the diagonal's))."""
    observed_mean = (x * mask).sum((-2, -1), keepdim=True) / mask.sum()
    filled = torch.where(mask, x, observed_mean)
    p = model.decode(model.encode(filled).mean)
    color = model.likelihood.color
    luma = p.luma if color else p
    y = p.split(x)[0] if color else x
    hole = ~mask
    if isinstance(luma, torch.distributions.Independent):          # diagonal: the conditional is the marginal
        normal = luma.base_dist
        y_mean = torch.where(mask, y, normal.mean)
        y_samples = torch.where(mask, y, normal.sample((samples,)))
        nll = -(normal.log_prob(y) * hole).sum((-3, -2, -1))
        iterations = None
    else:
        cond = luma.condition(y, mask)
        y_mean, y_samples = cond.mean, cond.sample((samples,))
        iterations = cond.iterations
        nll = -cond.log_prob(y)
    if not color:
        rgb_mean, rgb_samples = y_mean, y_samples
    else:
        chroma = p.split(x)[1]
        low = torch.nn.functional.max_pool2d(hole.float(), p.factor) > 0      # the chroma pixels in the hole
        c_mean = torch.where(low, p.chroma.mean, chroma)
        c_samples = torch.where(low, p.chroma.sample((samples,)), chroma)
        nll = nll - (p.chroma.log_prob(chroma) * low).sum((-3, -2, -1))
        rgb_mean = p._to_rgb(y_mean, c_mean)
        B, _, H, W = x.shape
        rgb_samples = p._to_rgb(y_samples.reshape(-1, 1, H, W), c_samples.reshape(-1, *c_samples.shape[-3:]))
        rgb_samples = rgb_samples.reshape(samples, B, 3, H, W)
    # the observed pixels as they are (the colour model's chroma is at a quarter of the resolution)
    rgb_mean, rgb_samples = torch.where(mask, x, rgb_mean), torch.where(mask, x, rgb_samples)
    mse = ((rgb_mean - x).square() * hole).sum((-3, -2, -1)) / (hole.sum() * x.shape[1])
    return rgb_mean, rgb_samples, nll, mse, iterations


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.vae.inpaint", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished run's folder (results.json and checkpoints/)")
    p.add_argument("--data", default="photos", choices=["photos", "mnist"])
    p.add_argument("--hole", type=int, default=12)
    p.add_argument("--images", type=int, default=64, help="test crops in the table")
    p.add_argument("--show", type=int, default=4, help="of which the figure shows")
    p.add_argument("--out", type=Path, default=None, help="figure folder (default: the run's)")
    args = p.parse_args(argv)
    report = json.loads((args.run / "results.json").read_text())
    torch.manual_seed(0)
    rows, table = [], []
    for kind in MODELS:
        model, test, _ = structured_at_test(args.run, report, args.data, kind)
        x = test[:args.images]
        factor = model.likelihood.factor if model.likelihood.color else 1
        mask = hole_mask(*x.shape[-2:], args.hole, factor)
        mean, samples, nll, mse, iterations = inpaint(model, x, mask, samples=2)
        if not rows:
            shown = x[:args.show]
            rows += [("truth", list(shown)), ("masked", list(torch.where(mask, shown, 0.5)))]
        rows += [(f"{kind} mean", list(mean[:args.show])), (f"{kind} sample", list(samples[0, :args.show])),
                 (f"{kind} sample", list(samples[1, :args.show]))]
        table.append((kind, statistics.median(mse.tolist()), statistics.median(nll.tolist()), iterations))
    out = args.out or args.run
    path = out / f"{args.data}_inpainting.png"
    figures._grid([(label, images) for label, images in rows], path,
                  f"{args.data}: a {args.hole}x{args.hole} hole, each model's conditional given the rest")
    print(f"{args.data}, a {args.hole}x{args.hole} hole, {len(x)} test crops (medians over crops); figure {path}\n")
    print("| model | hole MSE (RGB) | hole NLL (nats) | iterations |\n|---|---|---|---|")
    for kind, mse, nll, iterations in table:
        print(f"| {kind} | {mse:.4f} | {nll:.1f} | {'-' if iterations is None else iterations} |")


if __name__ == "__main__":
    main()
