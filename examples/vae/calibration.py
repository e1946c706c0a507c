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
  overconfident, below 1 underconfident. Summarised by its median over images and by
  ``overconfident``, the share of images where it exceeds OVERCONFIDENT_MS: there the
  whitened residual is more than twice the model's own scale, and the image's NLL pays
  at least 1.5 nats per pixel for it. A median of 1 can hide a tail of such images (small
  sharp detail that mu misses, where a structured precision expects a smooth residual);
  the per-image NLL shows them as outliers, the noise ratio does not.
- ``coverage``: the share of residual pixels with |r_p| <= 1.96 sigma_p, sigma_p the model's exact
  marginal standard deviation (``StructuredNormal.stddev``: the band recurrence; sigma for a
  diagonal model). 0.95 when each pixel's spread is right; below, the model is overconfident
  pixel by pixel. Unlike mean u^2 it reads no correlation: a structured model can whiten its
  residual well and still put the wrong spread on single pixels, or the reverse.
- ``noise_ratio_z``: std(e) / std(r) again, at the decoder's output for one posterior
  sample z ~ q(z|x) instead of its mean: the residuals the likelihood is trained on.
  A model calibrated there is too noisy at mu wherever the posterior's spread, not the
  decoder's error, makes most of the residual (smooth crops above all).
"""
from __future__ import annotations

import torch
from torch.distributions import Independent

import structlik

MEASURES = ("noise_ratio", "clipped", "corr_e", "corr_r", "whitened_ms", "coverage", "noise_ratio_z")
Z_95 = 1.959963984540054        # the two-sided 95% point of N(0, 1)
# calibrated: mean u^2 = 1 +- 0.05 over 1,024 pixels; 4 is the residual at twice the model's scale
OVERCONFIDENT_MS = 4.0


def _neighbour_corr(t: torch.Tensor) -> torch.Tensor:
    """Per image: the correlation of (t[y, x], t[y, x+1]) over all such pairs; (B,)."""
    a, b = t[..., :, :-1].flatten(1), t[..., :, 1:].flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.square().sum(1) * b.square().sum(1)).sqrt().clamp_min(1e-30)


def whitened(luma, r: torch.Tensor) -> torch.Tensor:
    """u: U r for a structured luminance, r / sigma for a diagonal one."""
    if isinstance(luma, Independent):                                    # diagonal: r / sigma
        return r / luma.base_dist.scale
    return structlik.ops.apply_upper(r, luma.log_diag, luma.off_diag, luma.stencil)


def _noise_and_residual(dist, x: torch.Tensor, color: bool, seed: int):
    """(luma, e, r): one noise sample e = sample - mu and the residual r = x - mu of the luminance,
    the noise drawn from its own seed without touching the global random state (the evaluation's
    other draws stay as they were)."""
    luma, y = (dist.luma, dist.split(x)[0]) if color else (dist, x)
    mu = luma.mean
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        e = luma.sample() - mu
    return luma, e, y - mu


def _ratio(e: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return e.flatten(1).std(1) / r.flatten(1).std(1).clamp_min(1e-30)


@torch.no_grad()
def calibration(dist, x: torch.Tensor, color: bool, seed: int, dist_z=None) -> dict:
    """The measures above for a batch, each of shape (B,): ``dist`` is the decoder's output at the
    posterior mean, ``dist_z`` (optional) at one posterior sample, for ``noise_ratio_z``."""
    luma, e, r = _noise_and_residual(dist, x, color, seed)
    mu = luma.mean
    out = {
        "noise_ratio": _ratio(e, r),
        "clipped": ((mu + e < 0) | (mu + e > 1)).flatten(1).float().mean(1),
        "corr_e": _neighbour_corr(e),
        "corr_r": _neighbour_corr(r),
        "whitened_ms": whitened(luma, r).square().flatten(1).mean(1),
        "coverage": (r.abs() <= Z_95 * luma.stddev).flatten(1).float().mean(1),
    }
    if dist_z is not None:
        out["noise_ratio_z"] = _ratio(*_noise_and_residual(dist_z, x, color, seed + 1)[1:])
    return out


def _in_range(ratio: torch.Tensor) -> float:
    return float(((ratio >= 0.5) & (ratio <= 2)).double().mean())


def summarise(per_image: dict) -> dict:
    ratio = per_image["noise_ratio"].double()
    at_z = {}
    if "noise_ratio_z" in per_image:
        ratio_z = per_image["noise_ratio_z"].double()
        at_z = {"median_noise_ratio_z": float(ratio_z.median()), "share_ratio_z_in_0.5_2": _in_range(ratio_z)}
    return {
        "median_noise_ratio": float(ratio.median()),
        "share_ratio_in_0.5_2": _in_range(ratio),
        "clipped": float(per_image["clipped"].double().mean()),
        "corr_e": float(per_image["corr_e"].double().mean()),
        "corr_r": float(per_image["corr_r"].double().mean()),
        "whitened_ms": float(per_image["whitened_ms"].double().median()),
        "overconfident": float((per_image["whitened_ms"].double() > OVERCONFIDENT_MS).double().mean()),
        "coverage": float(per_image["coverage"].double().mean()),
        **at_z,
    }


def by_source(per_image: dict, sources: list[str]) -> dict:
    """{source: (test images, median std(e)/std(r), share in [0.5, 2])} over the images of each source:
    where a model's noise is off, not only how often (on the photo crops, a source is a photograph)."""
    ratio = per_image["noise_ratio"].double()
    out = {}
    for name in sorted(set(sources)):
        mask = torch.tensor([s == name for s in sources])
        out[name] = (int(mask.sum()), float(ratio[mask].median()), _in_range(ratio[mask]))
    return out


def source_table(rows: dict) -> str:
    """Markdown: one row per model, one column per source; each cell 'median ratio / share in [0.5, 2]'."""
    names = sorted({n for r in rows.values() for n in r})
    counts = {n: next(r[n][0] for r in rows.values() if n in r) for n in names}
    lines = ["| model | " + " | ".join(f"{n} ({counts[n]})" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for model, r in rows.items():
        cells = [f"{r[n][1]:.2f} / {r[n][2]:.2f}" if n in r else "-" for n in names]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: dict) -> str:
    """Markdown: one row per model."""
    lines = ["| model | median std(e)/std(r) | share with that in [0.5, 2] | share of mu+e outside [0, 1] | "
             "neighbour corr. of e / of r | median mean u^2 (1 = calibrated) | "
             f"share with mean u^2 > {OVERCONFIDENT_MS:g} (overconfident) | "
             "share of pixels with \\|r\\| <= 1.96 σ_p (0.95 = calibrated) | "
             "at z ~ q(z|x): median std(e)/std(r), share in [0.5, 2] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        at_z = (f"{s['median_noise_ratio_z']:.2f}, {s['share_ratio_z_in_0.5_2']:.2f}"
                if "median_noise_ratio_z" in s else "-")
        lines.append(f"| {name} | {s['median_noise_ratio']:.2f} | {s['share_ratio_in_0.5_2']:.2f} | "
                     f"{s['clipped']:.3f} | {s['corr_e']:.2f} / {s['corr_r']:.2f} | {s['whitened_ms']:.2f} | "
                     f"{s['overconfident']:.3f} | {s['coverage']:.3f} | {at_z} |")
    return "\n".join(lines)
