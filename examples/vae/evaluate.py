"""The paper's Tables 1 and 2: importance-weighted NLL, KL, mutual information, marginal KL, MSE.

Every quantity is per test image, so tables report mean and std over the
test set. ELBO surgery (Hoffman & Johnson, 2016): the average KL splits into
the mutual information I(x; z) under q(x, z) = q(z|x) p_data(x) and the
marginal KL(q(z) || p(z)), with q(z) the mixture of the N test posteriors
(the paper's S = N); so I <= log N.
"""
from __future__ import annotations

import math

import torch
from torch.distributions import Normal

from . import calibration as calib
from .data import dequantise
from .model import ConvVAE


@torch.no_grad()
def iwae_nll(model: ConvVAE, x: torch.Tensor, q: Normal, samples: int, chunk: int) -> torch.Tensor:
    """-log (1/S sum_s p(x|z_s) p(z_s) / q(z_s|x)), z_s ~ q(z|x): an upper bound on -log p(x), (B,)."""
    B = x.shape[0]
    log_w = []
    for start in range(0, samples, chunk):
        s = min(chunk, samples - start)
        z = q.sample((s,))                                             # (s, B, L)
        p_x = model.decode(z.flatten(0, 1))
        log_px = p_x.log_prob(x.repeat(s, 1, 1, 1)).view(s, B)
        log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = q.log_prob(z).sum(-1)
        log_w.append(log_px + log_pz - log_qz)
    return -(torch.logsumexp(torch.cat(log_w), 0) - math.log(samples))


@torch.no_grad()
def mutual_information(mu: torch.Tensor, std: torch.Tensor, samples: int, generator: torch.Generator,
                       chunk: int = 64) -> torch.Tensor:
    """Per image E_{q(z|x_n)}[log q(z|x_n) - log q(z)], q(z) = 1/N sum_m q(z|x_m); (N,). Mean = I(x; z)."""
    N = mu.shape[0]
    out = []
    for start in range(0, N, chunk):
        m, s = mu[start:start + chunk], std[start:start + chunk]
        eps = torch.randn((samples,) + m.shape, generator=generator, dtype=m.dtype).to(m.device)
        z = m + s * eps                                                  # (M, n, L)
        own = Normal(m, s).log_prob(z).sum(-1)                                       # (M, n)
        all_ = Normal(mu, std).log_prob(z[..., None, :]).sum(-1)                     # (M, n, N)
        marginal = torch.logsumexp(all_, -1) - math.log(N)
        out.append((own - marginal).mean(0))
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: ConvVAE, test_uint8: torch.Tensor, cfg, seed: int, device: torch.device) -> dict:
    """Per-image metrics on the test set (tensors of shape (N,)) plus the reconstructions' inputs."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x_all = dequantise(test_uint8, g)                     # one fixed dequantisation for every model
    torch.manual_seed(seed)
    nll, kl, mse, mus, stds = [], [], [], [], []
    cal = {k: [] for k in calib.MEASURES}
    # decode ~250 images at once: larger batches only add page faults on a CPU
    chunk = max(1, 250 // cfg.eval_batch)
    for start in range(0, len(x_all), cfg.eval_batch):
        x = x_all[start:start + cfg.eval_batch].to(device)
        q = model.encode(x)
        mus.append(q.mean)
        stds.append(q.stddev)
        kl.append(torch.distributions.kl_divergence(q, Normal(0.0, 1.0)).sum(1))
        nll.append(iwae_nll(model, x, q, cfg.iwae_samples, chunk))
        # reconstruction from the posterior mean, in [0, 255] (RGB for colour)
        p_mean = model.decode(q.mean)
        recon = p_mean.mean.clamp(0, 1)
        mse.append(((recon - x) * 255).square().flatten(1).mean(1))
        # and from one posterior sample z (its own seed: the global random state stays as it was)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + 11 + start)
            p_z = model.decode(q.sample())
        for k, v in calib.calibration(p_mean, x, model.likelihood.color, seed + 7 + start, p_z).items():
            cal[k].append(v)
    mu, std = torch.cat(mus), torch.cat(stds)
    mi = mutual_information(mu, std, cfg.mi_samples, torch.Generator().manual_seed(seed + 1))
    kl = torch.cat(kl)
    H, W = x_all.shape[-2:]
    dims = model.likelihood.dims(H, W)
    nll = torch.cat(nll)
    return {
        "nll": nll.cpu(),
        # bits/dim on the 8-bit scale: -log2 p(x) / D + 8 (each dequantised [0,1) variable has 256 bins)
        "bits_per_dim": (nll.cpu() / (dims * math.log(2)) + 8.0),
        "kl": kl.cpu(),
        "mutual_info": mi.cpu(),
        "marginal_kl": (kl - mi).cpu(),     # per image: KL_n - MI_n, whose mean is KL(q(z) || p(z))
        "mse": torch.cat(mse).cpu(),
        "dims": dims,
        "log_n": math.log(len(x_all)),
        "calibration": {k: torch.cat(v).cpu() for k, v in cal.items()},
    }


METRICS = (("nll", "NLL (nats/image)", 1), ("bits_per_dim", "bits/dim", 3), ("kl", "avg KL", 2),
           ("mutual_info", "mutual info", 2), ("marginal_kl", "marginal KL", 2), ("mse", "MSE [0,255]", 1))


def summarise(per_image: dict) -> dict:
    return {key: {"mean": float(per_image[key].double().mean()), "std": float(per_image[key].double().std())}
            for key, _, _ in METRICS}


def table(rows: dict) -> str:
    """Markdown table: one row per model, mean ± std over the test set."""
    head = "| model | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for name, summary in rows.items():
        cells = [f"{summary[k]['mean']:.{d}f} ± {summary[k]['std']:.{d}f}" for k, _, d in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
