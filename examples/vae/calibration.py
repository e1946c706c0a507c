"""Is the decoder's noise calibrated? Per-image measures on the luminance (Y for colour models).

At the posterior-mean reconstruction mu, one noise sample e = sample - mu is
compared with the true residual r = x - mu:

- ``noise_ratio``: std(e) / std(r). 1 when the model's noise has the size of its
  errors; above 1 its samples are noisier than the data around mu.
- ``clipped``: the share of mu + e pixels outside [0, 1]: noise that would be
  saturated on display (the data never leaves [0, 1]).
- ``corr_e`` / ``corr_r``: the correlation of horizontally adjacent pixels of e and
  of r. A diagonal model's noise has 0; structured noise should look like r.
- ``whitened_ms``: the mean of u^2 over pixels, u the whitened residual (U r for the
  structured model, r / sigma for the diagonal one). The likelihood's own check:
  1 when the precision matches the residuals on average; far above 1 the model is
  overconfident, below 1 underconfident.
"""
from __future__ import annotations

import torch
from torch.distributions import Independent

import structlik

MEASURES = ("noise_ratio", "clipped", "corr_e", "corr_r", "whitened_ms")


def _neighbour_corr(t: torch.Tensor) -> torch.Tensor:
    """Per image: the correlation of (t[y, x], t[y, x+1]) over all such pairs; (B,)."""
    a, b = t[..., :, :-1].flatten(1), t[..., :, 1:].flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.square().sum(1) * b.square().sum(1)).sqrt().clamp_min(1e-30)


def _whitened(luma, r: torch.Tensor) -> torch.Tensor:
    if isinstance(luma, Independent):                                    # diagonal: r / sigma
        return r / luma.base_dist.scale
    return structlik.ops.apply_upper(r, luma.log_diag, luma.off_diag, luma.stencil)


@torch.no_grad()
def calibration(dist, x: torch.Tensor, color: bool, seed: int) -> dict:
    """The measures above for a batch, each of shape (B,). The noise is drawn from its own
    seed without touching the global random state (the evaluation's other draws stay as they were)."""
    luma, y = (dist.luma, dist.split(x)[0]) if color else (dist, x)
    mu = luma.mean
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        e = luma.sample() - mu
    r = y - mu
    return {
        "noise_ratio": e.flatten(1).std(1) / r.flatten(1).std(1).clamp_min(1e-30),
        "clipped": ((mu + e < 0) | (mu + e > 1)).flatten(1).float().mean(1),
        "corr_e": _neighbour_corr(e),
        "corr_r": _neighbour_corr(r),
        "whitened_ms": _whitened(luma, r).square().flatten(1).mean(1),
    }


def summarise(per_image: dict) -> dict:
    ratio = per_image["noise_ratio"].double()
    return {
        "median_noise_ratio": float(ratio.median()),
        "share_ratio_in_0.5_2": float(((ratio >= 0.5) & (ratio <= 2)).double().mean()),
        "clipped": float(per_image["clipped"].double().mean()),
        "corr_e": float(per_image["corr_e"].double().mean()),
        "corr_r": float(per_image["corr_r"].double().mean()),
        "whitened_ms": float(per_image["whitened_ms"].double().median()),
    }


def table(rows: dict) -> str:
    """Markdown: one row per model."""
    lines = ["| model | median std(e)/std(r) | share with that in [0.5, 2] | share of mu+e outside [0, 1] | "
             "neighbour corr. of e / of r | median mean u^2 (1 = calibrated) |",
             "|---|---|---|---|---|---|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['median_noise_ratio']:.2f} | {s['share_ratio_in_0.5_2']:.2f} | "
                     f"{s['clipped']:.2f} | {s['corr_e']:.2f} / {s['corr_r']:.2f} | {s['whitened_ms']:.2f} |")
    return "\n".join(lines)
