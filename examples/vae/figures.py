"""The paper's figures: reconstructions (Fig. 1, 7), prior samples (Fig. 8), NLL distribution (Fig. 6),
residual correlations (Fig. 3); and what the covariance says: exact per-pixel standard deviations and a
pixel's correlation map beside the samples."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import structlik  # noqa: E402
from structlik.color import rgb_to_ycbcr  # noqa: E402

from .data import dequantise  # noqa: E402


def _show(ax, image: torch.Tensor, title: str | None = None):
    image = image.detach().clamp(0, 1).cpu()
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)


def _grid(rows: list, path: Path, title: str):
    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.6, 1.1 * len(rows) + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            _show(axes[r, c], images[c], label if c == 0 else None)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def reconstructions(models: dict, test_uint8: torch.Tensor, n: int, path: Path, seed: int, device):
    """Input, then per model the mean mu(z) and mu(z) + eps, eps a sample of the (correlated) noise."""
    spread = torch.linspace(0, len(test_uint8) - 1, n).long()    # across the test set, not its first n
    x = dequantise(test_uint8[spread], torch.Generator().manual_seed(seed)).to(device)
    torch.manual_seed(seed)
    rows = [("input", x)]
    for name, model in models.items():
        p = model.decode(model.encode(x).mean)
        rows += [(f"{name} μ", p.mean), (f"{name} μ+ε", p.sample())]
    _grid(rows, path, "Reconstructions: mean and mean + a noise sample")


def _luma(p):
    """The luminance distribution of a decoder output (the image itself for grayscale models)."""
    return p.luma if hasattr(p, "luma") else p


def _correlation_map(luma, y: int, x: int) -> torch.Tensor:
    """Corr(x_q, x_(y, x)) of every pixel q: the structured model's column of Sigma, scaled
    (StructuredNormal.correlation); a diagonal model's is 1 at (y, x) and 0 elsewhere."""
    if isinstance(luma, structlik.StructuredNormal):
        return luma.correlation((y, x))
    out = torch.zeros_like(luma.mean)
    out[..., y, x] = 1
    return out


@torch.no_grad()
def uncertainty(models: dict, test_uint8: torch.Tensor, n: int, path: Path, seed: int, device):
    """Per model, for n test images: a sample mu + e (the means are in the reconstructions), the exact
    per-pixel standard deviation sigma_p of the (luminance) noise (one colour scale per model: dark =
    certain), and the correlation of every pixel with the image's centre pixel (marked), -1 to 1."""
    spread = torch.linspace(0, len(test_uint8) - 1, n).long()
    x = dequantise(test_uint8[spread], torch.Generator().manual_seed(seed)).to(device)
    torch.manual_seed(seed)
    H, W = x.shape[-2:]
    cy, cx = H // 2, W // 2
    rows = [("input", "image", x)]
    for name, model in models.items():
        p = model.decode(model.encode(x).mean)
        luma = _luma(p)
        rows += [(f"{name} μ+ε", "image", p.sample()), (f"{name} σ_p", "std", luma.stddev),
                 (f"{name} corr.", "corr", _correlation_map(luma, cy, cx))]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 2.6, 1.1 * len(rows) + 0.5), squeeze=False,
                             layout="constrained")
    for r, (label, kind, images) in enumerate(rows):
        # the row's 99.5th percentile: a few saturated pixels (sigma 11 on a digit's stroke end) would
        # otherwise darken every other map of the row
        vmax = float(images.float().flatten().quantile(0.995)) if kind == "std" else None
        for c in range(n):
            ax = axes[r, c]
            if kind == "image":
                _show(ax, images[c], label if c == 0 else None)
                continue
            m = images[c, 0].detach().cpu().numpy()
            im = ax.imshow(m, cmap="magma" if kind == "std" else "coolwarm", vmin=0 if kind == "std" else -1,
                           vmax=vmax if kind == "std" else 1)
            if kind == "corr":
                ax.plot([cx], [cy], marker="+", color="k", markersize=4)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        if kind != "image":
            cbar = fig.colorbar(im, ax=axes[r, :].tolist(), fraction=0.03, pad=0.01, aspect=8,
                                extend="max" if kind == "std" else "neither")
            cbar.ax.tick_params(labelsize=6)
    fig.suptitle("What the covariance says: exact per-pixel σ (luminance) and the centre pixel's correlations",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def prior_samples(models: dict, n: int, path: Path, seed: int, device):
    """z ~ N(0, I): the decoded mean and a full sample, per model."""
    rows = []
    for name, model in models.items():
        z = torch.randn(n, model.latent, generator=torch.Generator().manual_seed(seed)).to(device)
        torch.manual_seed(seed)
        p = model.decode(z)
        rows += [(f"{name} μ", p.mean), (f"{name} μ+ε", p.sample())]
    _grid(rows, path, "Samples from the prior")


def nll_histogram(per_image: dict, path: Path, title: str):
    fig, ax = plt.subplots(figsize=(6, 3.2))
    values = {k: v["nll"].numpy() for k, v in per_image.items()}
    lo = min(v.min() for v in values.values())
    hi = max(v.max() for v in values.values())
    bins = np.linspace(lo, hi, 50)
    for name, v in values.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{name} (mean {v.mean():.0f})")
    ax.set_xlabel("test NLL (nats/image, importance-weighted bound), lower is better")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spatial_correlation(r: torch.Tensor, k: int = 3) -> np.ndarray:
    """(2k+1)^2 map: correlation of r_p with r_{p+d}, pooled over pixels and images. r: (N, H, W)."""
    r = r - r.mean((1, 2), keepdim=True)
    N, H, W = r.shape
    out = np.zeros((2 * k + 1, 2 * k + 1))
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            a = r[:, max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)]
            b = r[:, max(0, dy):H + min(0, dy), max(0, dx):W + min(0, dx)]
            out[dy + k, dx + k] = float((a * b).sum() / (a.square().sum() * b.square().sum()).sqrt())
    return out


def _channel_correlation(r: torch.Tensor) -> np.ndarray:
    """3x3 correlation between the channels of r (N, 3, H, W)."""
    flat = r.transpose(0, 1).flatten(1)
    return np.corrcoef(flat.double().numpy())


@torch.no_grad()
def residual_correlations(models: dict, test_uint8: torch.Tensor, path: Path, seed: int, device,
                          n: int = 200):
    """Fig. 3 as statistics. Row 1: the luminance residual x - mu of one test image. Row 2: how a
    residual pixel correlates with its neighbours (7x7, pooled over the test set). Structured models get a
    third row: the same for the whitened residual U(x - mu), which should be white if the model
    explains the correlation. Colour runs add the channel correlation of residuals in RGB and YCbCr."""
    x = dequantise(test_uint8[:n], torch.Generator().manual_seed(seed)).to(device)
    names = list(models)
    color = x.shape[1] == 3
    n_rows = 3 + (2 if color else 0)
    fig, axes = plt.subplots(n_rows, len(names), figsize=(2.6 * len(names), 2.4 * n_rows), squeeze=False)
    for c, name in enumerate(names):
        model = models[name]
        p = model.decode(model.encode(x).mean)
        rgb_res = x - p.mean
        if color:
            luma = p.luma
            y = rgb_to_ycbcr(x)[:, :1]
            res = y - luma.mean
        else:
            luma, res = p, rgb_res
        ax = axes[0, c]
        lim = float(res[0].abs().max())
        ax.imshow(res[0, 0].cpu().numpy(), cmap="coolwarm", vmin=-lim, vmax=lim)
        ax.set_title(f"{name}\nresidual (Y)" if color else f"{name}\nresidual", fontsize=9)
        corr = _spatial_correlation(res[:, 0].cpu())
        _heat(axes[1, c], corr, "neighbour corr. of x-μ")
        if isinstance(luma, structlik.StructuredNormal):
            white = structlik.ops.apply_upper(res, luma.log_diag, luma.off_diag, luma.stencil)
            _heat(axes[2, c], _spatial_correlation(white[:, 0].cpu()), "… of U(x-μ) (whitened)")
        else:
            white = res / luma.base_dist.scale
            _heat(axes[2, c], _spatial_correlation(white[:, 0].cpu()), "… of (x-μ)/σ (diagonal)")
        if color:
            ycc_res = rgb_to_ycbcr(x) - rgb_to_ycbcr(p.mean)
            _heat(axes[3, c], _channel_correlation(rgb_res.cpu()), "channel corr. RGB", ticks="RGB")
            _heat(axes[4, c], _channel_correlation(ycc_res.cpu()), "channel corr. YCbCr", ticks=("Y", "Cb", "Cr"))
        for ax in axes[:, c]:
            if not ax.images:
                ax.axis("off")
        axes[0, c].set_xticks([])
        axes[0, c].set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heat(ax, m: np.ndarray, title: str, ticks=None):
    ax.imshow(m, cmap="coolwarm", vmin=-1, vmax=1)
    for (i, j), v in np.ndenumerate(m):
        if m.shape[0] <= 3 or (i == m.shape[0] // 2 and abs(j - m.shape[1] // 2) <= 1):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=8)
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), list(ticks), fontsize=7)
        ax.set_yticks(range(len(ticks)), list(ticks), fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
